"""Reproduce the PowerOPD paper's five claims at toy scale on CPU, in one command.

    python examples/toy_reproduction/run.py                 # the whole sweep, ~21 min on 2 cores
    python examples/toy_reproduction/run.py --quick         # a 2-method miniature, ~40 s

1. ``make_models.py`` trains a teacher and a weaker student from scratch on worked solutions of a
   toy addition task (cached in ``--out/models``; its held-out scores are the starting point);
2. every method x seed runs ``scripts/pretrain_opd.py`` with identical flags (data, seed, steps,
   learning rate, batch, rollout and evaluation settings) except the reward flags: vanilla
   log-ratio, clip(+-1), tanh(tau=5), z-score, full-vocabulary reverse KL, PowerOPD at each alpha;
3. the report: ``results.json`` and ``results.md`` (Avg@8 / Pass@8 on held-out problems, response
   length, grad norm max and median, mean |reward| at the first 16 positions vs the rest, seconds
   per step, peak memory; each a mean over seeds with every seed's value in the JSON), the five
   claims checked against the numbers, and PNG plots under ``plots/`` (``report.py``).

Runs that finished are reused (delete a run's directory to redo it); a run that fails is reported
as failed with its log's tail, never dropped. Every file is written under a temporary name first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(HERE), str(ROOT)]

import report  # noqa: E402

from megatron_opd.runtime.checkpointing import write_json_atomic, write_text_atomic  # noqa: E402

ALPHAS = (0.1, 0.5, 1.0, 5.0, 50.0)
BASELINES = {
    "vanilla": ["--opd-reward", "log_ratio"],
    "clip": ["--opd-reward", "clip", "--opd-clip-min", "-1", "--opd-clip-max", "1"],
    "tanh": ["--opd-reward", "tanh", "--opd-tanh-temperature", "5"],
    "zscore": ["--opd-reward", "zscore"],
    "full_vocab_kl": ["--opd-reward", "full_vocab_kl"],
}
METHODS = dict(BASELINES)
METHODS.update({f"power_{a:g}": ["--opd-reward", "power", "--opd-alpha", f"{a:g}"] for a in ALPHAS})
EARLY = 16  # "the first 16 positions" of claim (2)


@dataclass
class SweepConfig:
    """Everything every run shares. One learning rate for every method, fixed before the sweep
    (docs/reproduction.md says how it was chosen)."""

    steps: int = 100
    lr: float = 3e-4
    global_batch_size: int = 32
    micro_batch_size: int = 16
    max_new_tokens: int = 64
    eval_interval: int = 25
    eval_samples: int = 8
    eval_limit: int = 64
    seeds: tuple[int, ...] = (1, 2)
    methods: tuple[str, ...] = tuple(METHODS)
    # teacher and student share their end-of-turn token, so the paper's reason to leave the final
    # stop token out of the loss (students and teachers that end differently) does not apply, and
    # masking it would leave when to stop untrained (see docs/reproduction.md: pilot runs)
    mask_terminal_stop: bool = False
    model_args: list[str] = field(default_factory=list)

    def flags(self, models: Path, run_dir: Path, seed: int) -> list[str]:
        from make_models import eval_config

        ev = eval_config(self.eval_samples)
        mask = (
            "--opd-mask-terminal-stop" if self.mask_terminal_stop else "--no-opd-mask-terminal-stop"
        )
        return [
            "--load", str(models / "student"),
            "--opd-teacher-load", str(models / "teacher"),
            "--prompt-data", str(models / "train.jsonl"),
            "--max-prompt-length", str(ev.max_prompt_length),
            "--global-batch-size", str(self.global_batch_size),
            "--micro-batch-size", str(self.micro_batch_size),
            "--train-iters", str(self.steps),
            "--lr", f"{self.lr:g}",
            "--lr-warmup-fraction", "0.05",
            "--lr-decay-style", "constant",
            "--clip-grad", "1.0",
            "--rollout-max-new-tokens", str(self.max_new_tokens),
            "--rollout-temperature", "1.0",
            "--seed", str(seed),
            "--eval-interval", str(self.eval_interval),
            "--eval-data", str(models / "heldout.jsonl"),
            "--eval-samples", str(ev.samples),
            "--eval-limit", str(self.eval_limit),
            "--eval-temperature", f"{ev.temperature:g}",
            "--eval-max-new-tokens", str(ev.max_new_tokens),
            "--metrics-file", str(run_dir / "metrics.jsonl"),
            "--opd-dump-tokens", str(run_dir / "tokens"),
            mask,
        ]  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "toy_reproduction")
    p.add_argument("--methods", nargs="+", choices=tuple(METHODS), default=None)
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one CPU thread each)")
    p.add_argument(
        "--mask-terminal-stop",
        action="store_true",
        help="leave each response's final stop token out of the loss, as the paper does",
    )
    p.add_argument(
        "--quick", action="store_true", help="a miniature: 2 methods, 1 seed, tiny models"
    )
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    return args


def sweep_config(args) -> SweepConfig:
    cfg = SweepConfig()
    if args.quick:
        cfg = SweepConfig(
            steps=4,
            global_batch_size=8,
            micro_batch_size=4,
            max_new_tokens=48,
            eval_interval=2,
            eval_samples=2,
            eval_limit=8,
            seeds=(1,),
            methods=("vanilla", "power_5"),
            model_args=["--teacher-steps", "30", "--student-steps", "10", "--eval-samples", "2"]
            + ["--heldout-problems", "8", "--train-problems", "200"],
        )
    if args.methods:
        cfg.methods = tuple(args.methods)
    if args.seeds:
        cfg.seeds = tuple(args.seeds)
    cfg.mask_terminal_stop = args.mask_terminal_stop
    if args.steps:
        cfg.steps = args.steps
        cfg.eval_interval = min(cfg.eval_interval, args.steps)
    if cfg.steps % cfg.eval_interval:
        raise SystemExit(f"--steps {cfg.steps} must be a multiple of {cfg.eval_interval}")
    return cfg


# --------------------------------------------------------------------------------------------
# Running


def _env(threads: int) -> dict[str, str]:
    from megatron_opd.runtime.distributed import standalone_env

    return dict(
        standalone_env(),
        OMP_NUM_THREADS=str(threads),
        PYTHONWARNINGS="ignore",
        PYTHONPATH=str(ROOT),
    )


def _run(cmd: list[str], log: Path, threads: int) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(threads)).returncode


def _tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


def make_models(cfg: SweepConfig, models: Path, threads: int) -> dict:
    scores = models / "models.json"
    if not scores.exists():
        print(f"training the teacher and the student -> {models}", flush=True)
        cmd = [sys.executable, str(HERE / "make_models.py"), "--out", str(models), *cfg.model_args]
        log = models.parent / "logs" / "make_models.log"
        if _run(cmd, log, threads) != 0:
            raise SystemExit(f"make_models.py failed; see {log}\n{_tail(log)}")
    return json.loads(scores.read_text())


def run_one(cfg: SweepConfig, models: Path, out: Path, method: str, seed: int, threads: int):
    """One pretrain_opd.py run; returns its summary (or the failure), cached in result.json."""
    name = f"{method}_seed{seed}"
    run_dir = out / "runs" / name
    result_file = run_dir / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    if run_dir.exists():  # an unfinished attempt: start clean
        import shutil

        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    flags = cfg.flags(models, run_dir, seed) + METHODS[method]
    cmd = [sys.executable, str(ROOT / "scripts" / "pretrain_opd.py"), *flags]
    start = time.perf_counter()
    rc = _run(cmd, run_dir / "train.log", threads)
    result = {"method": method, "seed": seed, "flags": flags, "returncode": rc}
    result["wall_seconds"] = time.perf_counter() - start
    if rc == 0:
        result.update(summarize_run(run_dir, flags, cfg))
    else:
        result["error"] = _tail(run_dir / "train.log")
    write_json_atomic(result_file, result)
    status = "ok" if rc == 0 else f"FAILED (exit {rc})"
    print(f"  {name}: {status} in {result['wall_seconds']:.0f} s", flush=True)
    return result


# --------------------------------------------------------------------------------------------
# Per-run numbers


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def reward_by_position(run_dir: Path, flags: list[str], width: int) -> dict[str, list[float]]:
    """Mean reward and mean |reward| at each response position over every step's tokens, from
    the per-token log-probs the run dumped (``--opd-dump-tokens``). For full_vocab_kl, which has
    no sampled-token reward, the log-ratio."""
    import torch

    from megatron_opd.reward.rewards import compute_reward, masked_moments, response_positions
    from megatron_opd.training import arguments

    cfg = arguments.reward_config(arguments.parse_args(flags))  # the formula the run trained with
    total = torch.zeros(width, dtype=torch.float64)
    total_abs = torch.zeros(width, dtype=torch.float64)
    count = torch.zeros(width, dtype=torch.float64)
    for path in sorted((run_dir / "tokens").glob("step*.pt")):
        mbs = torch.load(path)["micro_batches"]
        lp_t = torch.cat([m["lp_t"] for m in mbs])
        lp_s = torch.cat([m["lp_s"] for m in mbs])
        mask = torch.cat([m["mask"] for m in mbs]).bool()
        moments = masked_moments(lp_t - lp_s, mask) if cfg.kind == "zscore" else None
        r = compute_reward(cfg, lp_t, lp_s, mask, moments).double()
        pos = response_positions(mask)[mask].clamp(max=width - 1)
        total.index_add_(0, pos, r[mask])
        total_abs.index_add_(0, pos, r[mask].abs())
        count.index_add_(0, pos, torch.ones_like(r[mask]))
    safe = count.clamp(min=1)
    return {
        "mean": (total / safe).tolist(),
        "mean_abs": (total_abs / safe).tolist(),
        "tokens": count.tolist(),
    }


def _ratio_early_late(by_pos: dict[str, list[float]]) -> tuple[float, float]:
    """Token-weighted mean |reward| at positions < EARLY and at the rest."""
    sums = [a * n for a, n in zip(by_pos["mean_abs"], by_pos["tokens"], strict=True)]
    n_early, n_late = sum(by_pos["tokens"][:EARLY]), sum(by_pos["tokens"][EARLY:])
    early = sum(sums[:EARLY]) / n_early if n_early else float("nan")
    late = sum(sums[EARLY:]) / n_late if n_late else float("nan")
    return early, late


def summarize_run(run_dir: Path, flags: list[str], cfg: SweepConfig) -> dict:
    rows = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in rows if "grad_norm" in r]
    evals = [r for r in rows if "eval/mean/avg_at_k" in r]
    if len(train) != cfg.steps or not evals:
        raise RuntimeError(f"{run_dir}: {len(train)} training steps and {len(evals)} evaluations")
    grad = [r["grad_norm"] for r in train]
    final = evals[-1]
    by_pos = reward_by_position(run_dir, flags, cfg.max_new_tokens)
    early, late = _ratio_early_late(by_pos)
    return {
        "avg_at_k": final["eval/mean/avg_at_k"],
        "pass_at_k": final["eval/mean/pass_at_k"],
        "eval_response_len": final["eval/mean/mean_response_tokens"],
        "rollout_response_len": statistics.fmean(r["response/mean_len"] for r in train),
        "grad_norm_max": max(grad),
        "grad_norm_median": statistics.median(grad),
        "abs_reward_first16": early,
        "abs_reward_rest": late,
        # the first step pays one-time costs (allocations, engine set-up)
        "seconds_per_step": statistics.fmean(r["time/step"] for r in train[1:] or train),
        "peak_memory_gib": max(r["memory/peak_gib"] for r in train),
        "skipped_steps": train[-1]["skipped_steps"],
        "curve": {
            "step": [r["step"] for r in train],
            "grad_norm": grad,
            "response_len": [r["response/mean_len"] for r in train],
            "eval_step": [r["step"] for r in evals],
            "avg_at_k": [r["eval/mean/avg_at_k"] for r in evals],
            "eval_response_len": [r["eval/mean/mean_response_tokens"] for r in evals],
        },
        "reward_by_position": by_pos,
    }


# --------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = sweep_config(args)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 2) // args.jobs)
    start = make_models(cfg, out / "models", threads=os.cpu_count() or 1)
    print(
        f"teacher Avg@{cfg.eval_samples} {start['teacher']['avg_at_k']:.1f}, student "
        f"{start['student']['avg_at_k']:.1f}; {len(cfg.methods)} methods x {len(cfg.seeds)} seeds",
        flush=True,
    )
    t0 = time.perf_counter()
    jobs = [(m, s) for s in cfg.seeds for m in cfg.methods]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda job: run_one(cfg, out / "models", out, *job, threads), jobs))
    wall = time.perf_counter() - t0
    table = report.aggregate(results, cfg)
    claims = report.check_claims(table)
    plots = report.make_plots(results, start, cfg, out / "plots")
    summary = {
        "config": {k: v for k, v in vars(cfg).items() if k != "model_args"},
        "start": start,
        "this_invocation_wall_seconds": wall,
        "methods": table,
        "claims": claims,
        "runs": [
            {k: v for k, v in r.items() if k not in ("curve", "reward_by_position")}
            for r in results
        ],  # fmt: skip
    }
    write_json_atomic(out / "results.json", summary)
    text = report.report_markdown(table, claims, start, cfg, results)
    write_text_atomic(out / "results.md", text)
    print("\n" + text)
    print("plots: " + ", ".join(str(p) for p in plots))
    failed = [f"{r['method']}_seed{r['seed']}" for r in results if r["returncode"] != 0]
    if failed:
        print(f"failed runs (reported above, logs under {out / 'runs'}): {', '.join(failed)}")
    return summary


if __name__ == "__main__":
    main()
