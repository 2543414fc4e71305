"""One OPD step with the PowerOPD reward vs exact full-vocabulary OPD, on the same tiny models.

    python scripts/bench_opd_step.py [--vocab 151936] [--batch 8] [--new-tokens 64] [--nproc 1]

Builds a tiny Qwen3 teacher (4 layers) and student (2 layers) with Qwen3's 151,936-token vocabulary,
then runs ``scripts/pretrain_opd.py`` once per method, each in its own torchrun (peak memory is per
process), with the same seed and prompts; random tiny models rarely stop, so every response has the
full length and both methods score the same number of tokens. Prints time per phase (median over the
steps after the first) and peak memory, as ratios power / full_vocab_kl. The paper reports 0.408x
time and 0.769x peak memory (Qwen3-0.6B <- 4B, GPU); the target here is <= 0.40x and <= 0.70x.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PHASES = ("time/rollout", "time/teacher", "time/train", "time/step")


def build_checkpoints(root: Path, vocab: int) -> tuple[Path, Path]:
    from megatron_opd.models.tiny import convert_hf_checkpoint, save_bpe_tokenizer, save_hf_qwen3

    tok = root / "tokenizer"
    save_bpe_tokenizer(tok)
    for name, layers, seed in (("teacher", 4, 1), ("student", 2, 2)):
        hf = root / f"hf_{name}"
        save_hf_qwen3(hf, layers=layers, seed=seed, vocab=vocab, scale=0.25)
        convert_hf_checkpoint(hf, root / name, tok)
    return root / "student", root / "teacher"


def run_method(kind: str, student: Path, teacher: Path, out: Path, args) -> list[dict]:
    metrics = out / f"{kind}.jsonl"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}",
        ROOT / "scripts/pretrain_opd.py",
        "--load", student, "--opd-teacher-load", teacher,
        "--opd-reward", kind, "--opd-alpha", "0.5",
        "--tensor-model-parallel-size", args.nproc,
        "--global-batch-size", args.batch, "--micro-batch-size", args.micro_batch,
        "--train-iters", args.steps, "--lr", "1e-4", "--lr-warmup-fraction", "0",
        "--rollout-max-new-tokens", args.new_tokens,
        "--no-opd-mask-terminal-stop",
        "--prompt-data", "builtin:256", "--seed", "3", "--max-prompt-length", "256",
        "--metrics-file", metrics,
    ]  # fmt: skip
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--nproc", type=int, default=1, help="TP size (one process per rank)")
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()

    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench_opd_step_"))
    if not (root / "teacher").exists():
        print(f"building tiny checkpoints (vocab {args.vocab:,}) in {root}", flush=True)
        student, teacher = build_checkpoints(root, args.vocab)
    else:
        student, teacher = root / "student", root / "teacher"
    results = {}
    for kind in ("full_vocab_kl", "power"):
        rows = run_method(kind, student, teacher, root, args)[1:]  # drop the warm-up step
        results[kind] = {k: statistics.median(r[k] for r in rows) for k in PHASES}
        results[kind]["memory/peak_gib"] = max(r["memory/peak_gib"] for r in rows)
        results[kind]["tokens"] = statistics.median(r["response/mean_len"] for r in rows)

    base, power = results["full_vocab_kl"], results["power"]
    print(
        f"\nOPD step, vocab {args.vocab:,}, batch {args.batch} x {args.new_tokens} new tokens, "
        f"TP{args.nproc}, median of steps 2..{args.steps}\n"
    )
    print("| phase | full_vocab_kl | power | power / full_vocab_kl |")
    print("|---|---:|---:|---:|")
    for key in (*PHASES, "memory/peak_gib"):
        unit = "GiB" if "memory" in key else "s"
        print(
            f"| {key} | {base[key]:.3f} {unit} | {power[key]:.3f} {unit} | "
            f"{power[key] / base[key]:.3f}x |"
        )
    print(
        f"\nmean response length: full_vocab_kl {base['tokens']:.1f}, power {power['tokens']:.1f}"
    )


if __name__ == "__main__":
    main()
