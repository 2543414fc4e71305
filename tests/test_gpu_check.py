"""scripts/gpu_check.sh, the one command for a lent GPU, run here at small shapes on the CPU: every
section runs, the table has its rows and its numbers are finite and plausible, so that the device
minutes are not spent finding out that the script breaks."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _parameters(arch) -> int:
    """Parameters of a Qwen3 with tied embeddings, counted from its shapes."""
    h, hd, layers = arch.hidden_size, arch.head_dim, arch.num_hidden_layers
    q, kv = arch.num_attention_heads * hd, arch.num_key_value_heads * hd
    attention = h * (q + 2 * kv) + q * h + 2 * hd  # qkv, output projection, q/k norms
    mlp = 3 * h * arch.intermediate_size  # gate, up, down
    return arch.vocab_size * h + layers * (attention + mlp + 2 * h) + h


def test_full_shapes_are_qwen3_0_6b_and_4b():
    shapes = _module().full_shapes()
    assert round(_parameters(shapes.student) / 1e6) == 596  # Qwen3-0.6B: 0.6B, 0.44B non-embedding
    assert round(_parameters(shapes.teacher) / 1e6) == 4022  # Qwen3-4B
    assert shapes.student.tie_word_embeddings and shapes.teacher.tie_word_embeddings
    assert shapes.student.vocab_size == shapes.teacher.vocab_size == shapes.op_vocab == 151_936
    assert (shapes.prompts, shapes.new_tokens, shapes.op_tokens) == (8, 1024, (1024, 8))


def test_wheels_are_fetched_at_the_newest_tested_megatron_core():
    from megatron_opd.compat import versions

    env = {k: v for k, v in os.environ.items() if k != "MEGATRON_CORE_VERSION"}
    script = ROOT / "scripts" / "fetch_gpu_wheels.sh"
    proc = subprocess.run(
        ["bash", str(script), "--print-version"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == versions.NEWEST_TESTED


def test_budget_spent_skips_and_fails(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--out-dir", str(tmp_path),
         "--small", "--only", "a", "--budget", "0"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore"),
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["failed"] == ["a: skipped: the budget of 0 s (--budget) is spent"]
    assert result["rows"] == []
    assert "skip dynamic inference engine" in proc.stdout  # env runs whatever the budget


@pytest.mark.slow
def test_gpu_check_small_on_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "PYTHONPATH")}
    env.update(PYTHON=sys.executable, OUT_DIR=str(tmp_path), GPU_CHECK_SMALL="1")
    env["GPU_CHECK_SITE"] = str(tmp_path / "site")  # where carried wheels for this Python would go
    env["GPU_CHECK_MOE_TIMEOUT_S"] = "600"  # toy shapes on a shared CPU: no cut here
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["failed"] == [] and result["mode"] == "small shapes"
    assert (tmp_path / "gpu_check.log").read_text().count("| section | quantity |") == 1
    assert "| c | power: step |" in (tmp_path / "gpu_check.txt").read_text()
    assert (tmp_path / "gpu_check_moe.json").exists()  # the MoE section ran after the table
    rows = {(r["section"], r["quantity"]): r["value"] for r in result["rows"]}
    assert all(math.isfinite(v) for v in rows.values()), rows

    def value(section, quantity):
        assert (section, quantity) in rows, sorted(rows)
        return rows[section, quantity]

    # (a) bf16 against fp32 of the same weights: rounding-sized errors, not zero, not garbage
    for tensor in ("logits", "grad embedding", "grad layer 0 qkv", "grad layer 1 fc2",
                   "grad final norm"):  # fmt: skip
        for kind in ("max", "mean"):
            assert 1e-5 < value("a", f"{tensor}: {kind} rel err") < 0.05, tensor
    assert abs(value("a", "loss bf16 - fp32")) < 0.01
    # (b) bandwidths: positive and under the copy's (a pass over the logits is no faster than
    # a copy), with a factor for timing noise on a shared machine
    copy = value("b", "copy bandwidth (read + write)")
    for op in ("log-prob fwd", "log-prob fwd+bwd", "full-vocab KL fwd+bwd"):
        assert 0 < value("b", f"{op}, chunk 16 (default)") < 3 * copy, op
    # (c) both methods, phases adding up to the step
    for kind in ("power", "full_vocab_kl"):
        phases = sum(value("c", f"{kind}: {p}") for p in ("rollout", "teacher", "train"))
        step = value("c", f"{kind}: step")
        assert step > 0 and phases == pytest.approx(step, rel=1e-6), kind
        assert value("c", f"{kind}: response tokens/s") == pytest.approx(4 * 16 / step, rel=1e-6)
        assert value("c", f"{kind}: peak memory") > 0
    # (d) the decode step, and the weight-reading bound from the copy bandwidth
    step_ms = value("d", "decode step, batch 4")
    assert 0 < step_ms < 5000
    assert value("d", "decode tokens/s") == pytest.approx(4 / (step_ms / 1e3), rel=1e-6)
    assert any(q.startswith("bound: weights once per step at copy") for _, q in rows)
    # the graph engine beside it: its (eager here) step gives the eager step's greedy rows
    assert value("d", "graph: greedy rows equal to eager") == 4
    assert 0 <= value("d", "graph: greedy tokens equal to static") <= 1
    graph_ms = value("d", "graph engine: decode step, batch 4")
    assert 0 < graph_ms < 5000
    assert value("d", "graph engine: decode step / static") == pytest.approx(graph_ms / step_ms)
    # device-only parts: skipped with the reason, one line each
    optional = {"transformer-engine": "transformer_engine", "flash-attn": "flash_attn"}
    for name, module in optional.items():
        if importlib.util.find_spec(module) is None:
            assert f"skip {name}: not importable" in log
    assert "skip dynamic inference engine: " in log  # no CUDA here, or no flash-attn
