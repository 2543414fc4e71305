"""Rollouts on ranks of their own (``--rollout-ranks``) at lag 0 and 1, on gloo under torchrun:
lag 0 equals the colocated run token for token; at lag 1 each step's batch is what the weights
one step old generate with that step's seed (regenerated from the saved checkpoints); a lag-1 run
killed and resumed equals a straight one; impossible layouts and lags are one-line errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from opd_setup import ROOT, SHORT_RUN, load_script, make_pair, read_metrics, torchrun

from megatron_opd.runtime.distributed import standalone_env
from megatron_opd.runtime.spawn import free_port

pytestmark = pytest.mark.slow

ITERS = 4


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("async") / "models")


def _flags(pair, tmp: Path, name: str, *extra: str) -> list[str]:
    return [
        "--load", str(pair["student"]), "--opd-teacher-load", str(pair["teacher"]), *SHORT_RUN,
        "--prompt-data", "builtin:64", "--train-iters", str(ITERS),
        "--metrics-file", str(tmp / f"{name}.jsonl"), "--opd-dump-tokens", str(tmp / name),
        *extra,
    ]  # fmt: skip


def _steps(tmp: Path, name: str) -> list[dict]:
    return [r for r in read_metrics(tmp / f"{name}.jsonl") if "loss" in r]


def _tokens(tmp: Path, name: str, step: int) -> torch.Tensor:
    return torch.load(tmp / name / f"step{step:07d}_dp0.pt", weights_only=False)["tokens"]


def _same_steps(a: list[dict], b: list[dict], iters: int = ITERS) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, iters + 1))
    for x, y in zip(a, b, strict=True):
        for key in ("response/mean_len", "response/max_len", "response/truncated_frac"):
            assert y[key] == x[key], (x["step"], key)
        for key in ("loss", "grad_norm", "reward/mean", "reward/log_ratio_mean"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7), (x["step"], key)


def test_lag0_on_rollout_ranks_equals_the_colocated_run(pair, tmp_path):
    """1 training rank + 1 rollout rank at lag 0 draws the tokens of a one-rank run (the same
    prompts, seeds and weights: every refit carried the update) and trains the same steps."""
    torchrun(1, _flags(pair, tmp_path, "colocated"))
    torchrun(2, _flags(pair, tmp_path, "remote", "--rollout-ranks", "1"))
    for step in range(1, ITERS + 1):
        assert torch.equal(_tokens(tmp_path, "remote", step), _tokens(tmp_path, "colocated", step))
    a, b = _steps(tmp_path, "colocated"), _steps(tmp_path, "remote")
    _same_steps(a, b)
    assert len({round(r["loss"], 6) for r in a}) == ITERS  # fresh rollouts, a moving student
    for row in b:
        assert row["rollout/lag"] == 0.0
        assert row["pool/train_idle_s"] >= 0 and row["pool/rollout_busy_s"] > 0


REGENERATE = textwrap.dedent(
    """
    import sys
    from megatron_opd.runtime import cli
    cli.quiet()
    from megatron_opd.models import convert
    from megatron_opd.rollout import generation, sources
    from megatron_opd.runtime import checkpointing, distributed
    from megatron_opd.training import data
    from megatron_opd.rollout.remote import global_prompts
    from megatron_opd.models.tokenizer import load_tokenizer
    import torch

    grid = distributed.initialize(seed=7).grid
    for job in sys.argv[1:]:  # checkpoint@step@output: step's batch from that checkpoint
        ckpt, step, out = job.split("@")
        step = int(step)
        chunks, _ = convert.load_checkpoint_model(ckpt, grid)
        tokenizer = load_tokenizer(ckpt)
        problems = data.load_prompt_source("builtin:64", seed=7)
        prompts = data.PromptSet.build(problems, tokenizer, 160, None)
        stream = data.PromptStream(len(prompts), seed=7)
        for _ in range(step):
            global_prompts(prompts, stream, 8, 1)
        batch = global_prompts(prompts, stream, 8, 1)
        gens = generation.generate(chunks, tokenizer, batch, max_new_tokens=10, temperature=1.0,
                                   seed=sources.step_seed(7, step), return_logprobs=False)
        torch.save([list(p) + list(g.tokens) for p, g in zip(batch, gens)], out)
        torch.save([len(p) for p in batch], out + ".prompts")
    distributed.teardown()
    """
)


def _regenerate(jobs: list[tuple[Path, int, Path]]) -> None:
    """Each (checkpoint, step, output): step's batch as that checkpoint generates it, in one
    process (each launch is mostly the interpreter importing Megatron)."""
    env = dict(standalone_env(), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    argv = [f"{ckpt}@{step}@{out}" for ckpt, step, out in jobs]
    proc = subprocess.run([sys.executable, "-c", REGENERATE, *argv], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_lag1_batches_come_from_the_weights_one_step_old(pair, tmp_path):
    """Step k's batch (k >= 1, counted from 0) is what θ_{k-1}, the checkpoint saved after step
    k-1, generates with step k's seed and prompts; steps 0 and 1 both sample from the start.
    The negative control: θ_k, one step newer, generates other tokens for each step k >= 1 at
    this learning rate, so the match above tells θ_{k-1} from θ_k."""
    save = tmp_path / "run"
    flags = _flags(pair, tmp_path, "lag1", "--rollout-ranks", "1", "--rollout-lag", "1",
                   "--save", str(save), "--save-interval", "1")  # fmt: skip
    torchrun(2, flags)
    rows = _steps(tmp_path, "lag1")
    assert [r["rollout/lag"] for r in rows] == [1.0] * ITERS

    def weights(k: int) -> Path:  # θ_k: the weights after k steps
        return pair["student"] if k == 0 else save / f"iter_{k:07d}"

    lagged = [(weights(max(k - 1, 0)), k, tmp_path / f"regen{k}.pt") for k in range(ITERS)]
    newer = [(weights(k), k, tmp_path / f"newer{k}.pt") for k in range(1, ITERS)]
    _regenerate(lagged + newer)
    for k in range(ITERS):
        out = tmp_path / f"regen{k}.pt"
        regenerated = torch.load(out)
        dumped = torch.load(tmp_path / "lag1" / f"step{k + 1:07d}_dp0.pt", weights_only=False)
        for row, seq in enumerate(regenerated):
            assert dumped["tokens"][row, : len(seq)].tolist() == seq, (k, row)
        assert dumped["response_lengths"].tolist() == [
            len(seq) - n for seq, n in zip(regenerated, _prompt_lengths(k, out), strict=True)
        ]
        if k >= 1:  # θ_k samples differently: the lag is visible in the tokens
            newer_seqs = torch.load(tmp_path / f"newer{k}.pt")
            assert newer_seqs != regenerated, f"θ_{k} and θ_{k - 1} sample the same tokens"


def _prompt_lengths(k: int, out: Path) -> list[int]:
    return torch.load(str(out) + ".prompts")


LAG1_ITERS = 6
LAG1 = ("--rollout-ranks", "1", "--rollout-lag", "1", "--train-iters", str(LAG1_ITERS))


@pytest.fixture(scope="module")
def straight_lag1(pair, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight_lag1")
    torchrun(2, _flags(pair, tmp, "straight", *LAG1, "--save", str(tmp / "s")))
    return tmp


@pytest.mark.parametrize("how", ["kill -9", "SIGTERM"])
def test_lag1_stopped_and_resumed_equals_a_straight_run(pair, straight_lag1, tmp_path, how):
    """kill -9 of every rank once a lag-1 run saving every step has saved step 2; or SIGTERM to
    torchrun with --exit-signal-handler and no periodic save, once step 2 is logged (the rollout
    rank ignores it and keeps sampling until the training rank has saved). Then the same command
    again: the checkpoint holds the batch in flight, so the resumed run trains on the straight
    run's batches and ends with its losses and grad norms. Under SIGTERM the signal's save is
    the only checkpoint there is: a lost save (the rollout rank killed by the signal) fails the
    exit code, the exit-signal line, or the resume."""
    iters = LAG1_ITERS
    save = tmp_path / "k"
    if how == "SIGTERM":
        flags = _flags(pair, tmp_path, "stopped", *LAG1, "--exit-signal-handler", "--save",
                       str(save))  # fmt: skip
    else:
        flags = _flags(pair, tmp_path, "stopped", *LAG1, "--save-interval", "1", "--save",
                       str(save))  # fmt: skip
    proc = _start(flags)
    latest = save / "latest_checkpointed_iteration.txt"
    metrics = tmp_path / "stopped.jsonl"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if how == "SIGTERM" and metrics.exists() and len(_steps(tmp_path, "stopped")) >= 2:
            assert not latest.exists(), "a save before the signal: the test could resume from it"
            proc.send_signal(signal.SIGTERM)  # torchrun forwards it to every rank
            break
        saved = latest.read_text().strip() if latest.exists() else ""
        if how == "kill -9" and saved not in ("", "0", "1"):
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    out, _ = proc.communicate(timeout=120)
    stopped_at = int(latest.read_text())
    assert 2 <= stopped_at < iters, (proc.returncode, stopped_at)
    if how == "kill -9":
        assert proc.returncode == -signal.SIGKILL, proc.returncode
    else:
        # torchrun itself exits 1 on the SIGTERM it forwarded; its summary lists every rank that
        # did not exit 0, and here none may
        assert "got signal: 15" in out and "exitcode" not in out, out[-3000:]
        said = [line for line in out.splitlines() if "exit signal" in line]
        assert len(said) == 1, out[-3000:]
        assert said[0].startswith(f"exit signal: saved iteration {stopped_at}"), said
        assert [p.name for p in save.glob("iter_*")] == [f"iter_{stopped_at:07d}"]
    torchrun(2, flags)  # the same command: resumes from the latest checkpoint
    _same_steps(_steps(straight_lag1, "straight"), _steps(tmp_path, "stopped"), iters)
    for step in range(1, iters + 1):
        assert torch.equal(
            _tokens(tmp_path, "stopped", step), _tokens(straight_lag1, "straight", step)
        )


def _start(flags: list[str]) -> subprocess.Popen:
    script = str(ROOT / "scripts/pretrain_opd.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           f"--master-port={free_port()}", script, *flags]  # fmt: skip
    env = dict(standalone_env(), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)  # fmt: skip


@pytest.mark.parametrize(
    "world, extra, message",
    [
        (2, ["--rollout-lag", "2"], "--rollout-lag"),
        (1, ["--rollout-lag", "1"], "--rollout-lag 1 needs --rollout-ranks"),
        (2, ["--rollout-ranks", "2"], "--rollout-ranks 2 leaves no training rank in a world of 2"),
        (4, ["--rollout-ranks", "3", "--rollout-tensor-model-parallel-size", "2"],
         "--rollout-ranks 3 is not divisible by --rollout-tensor-model-parallel-size 2"),
        (4, ["--rollout-ranks", "1", "--tensor-model-parallel-size", "2"],
         "the 3 training ranks (world 4 - --rollout-ranks 1) are not divisible"),
        (2, ["--rollout-ranks", "1", "--rollout-engine", "dynamic"],
         "--rollout-engine dynamic with --rollout-ranks"),
    ],
)  # fmt: skip
def test_impossible_layouts_and_lags_are_one_line(pair, tmp_path, monkeypatch, capsys, world,
                                                  extra, message):  # fmt: skip
    """Before any process group or model: one line naming the flag, exit code 2."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    script = load_script("pretrain_opd")
    with pytest.raises(SystemExit) as exc:
        script.main(_flags(pair, tmp_path, "bad", *extra))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err, err
