"""examples/: every YAML goes through the real parser with the paper's hyperparameters, its layout
splits the real Qwen3 shapes, and examples/launch.sh turns every method into valid flags."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest
from opd_setup import load_script

from megatron_opd.models import gpt
from megatron_opd.training import arguments

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CONFIGS = sorted(EXAMPLES.glob("*.yaml"))

# Shapes from the models' Hugging Face config.json files (all share the 151,936-token vocabulary)
QWEN3 = {
    "qwen3-0.6b-base": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                            num_attention_heads=16, num_key_value_heads=8),
    "qwen3-1.7b-base": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                            num_attention_heads=16, num_key_value_heads=8),
    "qwen3-4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8),
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8),
}  # fmt: skip
PAIRS = {f"{s}_from_{t}": (s, t) for s in QWEN3 if "base" in s for t in QWEN3 if "base" not in t}
# method -> (reward kind, the flags that must come out of launch.sh)
METHODS = {
    "power_a0.5": ("power", {"opd_alpha": 0.5}),
    "power_a5": ("power", {"opd_alpha": 5.0}),
    "power_a500": ("power", {"opd_alpha": 500.0}),
    "log_ratio": ("log_ratio", {}),
    "clip": ("clip", {"opd_clip_min": -1.0, "opd_clip_max": 1.0}),
    "tanh": ("tanh", {"opd_tanh_temperature": 5.0}),
    "zscore": ("zscore", {}),
    "full_vocab_kl": ("full_vocab_kl", {}),
}


def test_one_config_per_paper_pair():
    assert {c.stem for c in CONFIGS} == set(PAIRS)


def _arch(name: str) -> gpt.ArchConfig:
    return gpt.ArchConfig(model_type="qwen3", vocab_size=151936, head_dim=128, **QWEN3[name])


def _types_match(parser: argparse.ArgumentParser, loaded: dict) -> list[str]:
    """Values from YAML bypass argparse's type conversion: they must already have the type."""
    bad = []
    for action in parser._actions:
        if action.dest not in loaded:
            continue
        value = loaded[action.dest]
        if action.nargs in ("+", "*"):  # a list of the flag's type
            if not isinstance(value, list) or not value:
                bad.append(f"{action.dest}: {value!r} is not a list")
                continue
            value = value[0]
        if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):
            want = (bool,)
        elif action.type is float:
            want = (float, int)
        elif action.type is not None:
            want = (action.type,)
        else:
            want = (str,)
        if not isinstance(value, want) or (want != (bool,) and isinstance(value, bool)):
            bad.append(f"{action.dest}: {value!r} is not {want[0].__name__}")
        if action.choices is not None and value not in action.choices:
            bad.append(f"{action.dest}: {value!r} not in {action.choices}")
    return bad


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_parses_with_the_paper_hyperparameters(config, tmp_path, monkeypatch):
    parser = arguments.build_parser()
    loaded = arguments.load_config(str(config), parser)  # unknown keys raise
    assert not _types_match(parser, loaded)
    args = arguments.parse_args(["--config", str(config)])
    for dest, value in loaded.items():
        assert getattr(args, dest) == value, dest

    assert args.lr == 5e-7 and args.lr_warmup_fraction == 0.05
    assert args.lr_decay_style == "constant" and args.train_iters == 1500
    assert args.global_batch_size == 32 and args.bf16 and args.opd_teacher_bf16
    assert args.rollout_temperature == 1.0 and args.rollout_top_p == 1.0
    assert args.rollout_top_k == 0 and args.rollout_samples_per_prompt == 1
    assert args.rollout_max_new_tokens == 1024 and args.opd_mask_terminal_stop
    assert args.prompt_data == "data/deepscaler_math.json"
    assert args.save_interval and args.use_distributed_optimizer

    student, teacher = PAIRS[config.stem]
    assert args.load == f"ckpt/{student}" and args.opd_teacher_load == [f"ckpt/{teacher}"]
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    gpt.validate_layout(_arch(student), tp, pp)
    gpt.validate_layout(_arch(teacher), tp, pp)
    context = args.max_prompt_length + args.rollout_max_new_tokens
    assert context <= 32768  # both models' max_position_embeddings

    # one node of 8 GPUs and two nodes of 8: batch sizes divide, paths checked for real; the YAMLs
    # leave --save to the command line (launch.sh gives runs/PAIR/METHOD)
    args.save = "runs/test"
    monkeypatch.chdir(tmp_path)
    for path in (args.load, *args.opd_teacher_load):
        Path(path).mkdir(parents=True)
    for world in (8, 16):
        arguments.validate_args(args, world)


def _launch_flags(pair: str, method: str, *extra: str) -> list[str]:
    proc = subprocess.run(
        ["bash", str(EXAMPLES / "launch.sh"), pair, method, *extra],
        env=dict(os.environ, LAUNCHER="print"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    return shlex.split(proc.stdout)


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_launch_sh_gives_every_method_valid_flags(pair, monkeypatch):
    monkeypatch.chdir(ROOT)  # launch.sh prints --config relative to the checkout
    for method, (kind, expected) in METHODS.items():
        args = arguments.parse_args(_launch_flags(pair, method))
        assert args.opd_reward == kind, method
        for dest, value in expected.items():
            assert getattr(args, dest) == value, (method, dest)
        arguments.reward_config(args).validate()
        assert args.save == f"runs/{pair}/{method}"
        assert args.metrics_file == f"runs/{pair}/{method}/metrics.jsonl"
        assert args.lr == 5e-7  # the YAML still applies
    # flags after METHOD win over the YAML and the method
    flags = _launch_flags(pair, "power_a5", "--opd-alpha", "50", "--lr", "1e-6")
    args = arguments.parse_args(flags)
    assert args.opd_alpha == 50.0 and args.lr == 1e-6


def test_launch_sh_refuses_unknown_method_and_pair():
    for argv in (["qwen3-0.6b-base_from_qwen3-4b", "kl"], ["qwen3-14b_from_qwen3-32b", "clip"]):
        proc = subprocess.run(
            ["bash", str(EXAMPLES / "launch.sh"), *argv],
            env=dict(os.environ, LAUNCHER="print"),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == 2 and proc.stderr, argv


# ---------------------------------------------------------------------------------------------
# scripts/demo.py: every method gets the same settings through the real parser, the held-out
# prompts are held out, and the summary's verdict follows the numbers


def test_demo_gives_every_method_the_same_settings(tmp_path):
    demo = load_script("demo")
    args = demo.parse_args(["--out", str(tmp_path), "--nproc", "1"])
    for name in ("student", "teacher"):
        (tmp_path / name).mkdir()
    heldout = demo.write_heldout(tmp_path / "heldout.jsonl", 4)
    parsed = {}
    for method in demo.METHODS:
        cmd = demo.train_command(
            method, args, tmp_path / "student", tmp_path / "teacher", heldout, tmp_path / method
        )
        script = cmd.index(ROOT / "scripts/pretrain_opd.py")
        ns = arguments.parse_args([str(c) for c in cmd[script + 1 :]])
        arguments.validate_args(ns, world_size=1)
        parsed[method] = vars(ns)
    per_run = {"opd_reward", "save", "metrics_file", "tensorboard_dir"}
    first = parsed["power"]
    for method, values in parsed.items():
        assert values["opd_reward"] == method
        assert {k: v for k, v in values.items() if k not in per_run} == {
            k: v for k, v in first.items() if k not in per_run
        }, method
    assert first["lr"] == args.lr and first["eval_temperature"] == 1.0
    assert first["eval_interval"] == args.eval_interval and first["eval_gap"]


def test_demo_heldout_problems_are_not_training_prompts(tmp_path):
    from megatron_opd.training import data

    demo = load_script("demo")
    path = demo.write_heldout(tmp_path / "h.jsonl", 16)
    held = data.load_problems(path)
    train = {p.problem for p in data.load_prompt_source(demo.TRAIN_PROMPTS)}
    assert len(held) == len({p.problem for p in held}) == 16
    assert not train & {p.problem for p in held}


def test_demo_summary_states_the_change_and_the_verdict(tmp_path):
    demo = load_script("demo")
    args = demo.parse_args(["--out", str(tmp_path)])

    def rows(*kls):
        return [
            {"step": 4 * i, "gap/mean/kl_per_token": kl, "gap/mean/teacher_nll_per_token": kl + 1}
            for i, kl in enumerate(kls)
        ]

    curves = {"power": rows(2.0, 1.9, 1.8), "log_ratio": rows(2.0, 2.2), "full_vocab_kl": rows(2.0)}
    runs = {}
    for method, r in curves.items():
        runs[method] = tmp_path / f"{method}.jsonl"
        extra = [{"step": 1, "loss": 1.0}]  # training lines are not evaluations
        runs[method].write_text("".join(json.dumps(x) + "\n" for x in r[:1] + extra + r[1:]))
    got = demo.gap_curves({m: p for m, p in runs.items()})
    assert [r["step"] for r in got["log_ratio"]] == [0, 4]
    text = demo.summary(got, args)
    assert "**-10.0%**" in text and "**+10.0%**" in text and "**+0.0%**" in text
    assert "PowerOPD closed the held-out gap by 10.0%" in text
    assert "did NOT reach the target" in text
    assert f"lr {args.lr:g}" in text
    assert "PowerOPD reached the target" in demo.verdict({"power": -0.25, "log_ratio": 0.1})

    from megatron_opd.evaluation.plots import plot_gap

    png = plot_gap(got, tmp_path / "plots" / "gap.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
