"""The reward comparison with confidence intervals over seeds and held-out problems (issue 22).

    python examples/toy_reproduction/compare.py --seeds 8 --heldout 256 --jobs 2   # the full run
    python examples/toy_reproduction/compare.py --quick      # the pipeline in miniature (CI)

1. ``make_models.py`` trains the teacher and the student, setting aside max(M, 256) held-out
   problems (cached in ``--out/models``); the comparison uses the first M (``--heldout``), so M
   can change without retraining. ``scripts/evaluate.py`` scores the student once: the start.
2. Every method x seed (seeds 1..N) trains through ``scripts/pretrain_opd.py`` with the sweep's
   flags (``run.SweepConfig``: steps, lr, batch, rollouts) and the method's reward flags, saves its
   final checkpoint, and ``scripts/evaluate.py`` scores it on all M problems with the same
   evaluation seed as the start: Avg@k at temperature 0.6, and the held-out gap against the teacher
   on k fresh temperature-1 samples per problem (KL(pi_S || pi_T), total variation, the power
   divergence at alpha 1, 5 and 50: the same yardsticks for every method).
3. For each method and yardstick, the change from the start: the mean over seeds and problems of
   ``y[s, i]`` = the run's value on problem ``i`` minus the start's, with a 95% interval over seeds
   and problems (``stats.crossed_mean_interval``: two-way crossed random effects, Satterthwaite
   degrees of freedom). Paired differences against vanilla and against full-vocab KL use the
   same seed's baseline run on the same problem. A method is called better or worse only when the
   interval excludes 0. Divergences per problem are token means over its samples; the reported
   number is the mean over problems.

4. Holm-adjusted conclusions beside the raw ones (``multiplicity.py``), and the head-to-head
   paired differences among the bounded rewards (PowerOPD alpha 1, 5, 50, TROPD, sign, clip).

Runs that finished are reused (``result.json``) only when they were made with the same training
and evaluation flags; a run made with others (another ``--steps``, ``--heldout``, ...) is refused
in one line naming it. A failed run is reported, never dropped. Every run's per-problem numbers
are kept in ``runs.json.gz`` beside ``results.json`` (with the start's), so that every interval
can be recounted from them (``recount``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import combinations
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(HERE), str(ROOT)]

import multiplicity  # noqa: E402
import run as sweep  # noqa: E402
import stats  # noqa: E402

from megatron_opd.runtime.checkpointing import write_json_atomic, write_text_atomic  # noqa: E402

METHODS = {
    **sweep.METHODS,
    "tropd": ["--opd-reward", "tropd", "--opd-tropd-alpha", "0.2"],
    "sign": ["--opd-reward", "sign"],
}
DEFAULT_METHODS = ("vanilla", "clip", "full_vocab_kl", "power_1", "power_5", "power_50")
DEFAULT_METHODS += ("tropd", "sign")
BASELINES = ("vanilla", "full_vocab_kl")
GAP_ALPHAS = (1.0, 5.0, 50.0)
HELDOUT_POOL = 256  # held-out problems the models set aside
# yardstick -> (label, scale, higher is better)
YARDSTICKS = {
    "accuracy": ("Avg@k (points)", 100.0, True),
    "kl": ("KL(π_S‖π_T) / token", 1.0, False),
    "tv": ("TV / token", 1.0, False),
    **{f"power_div_{a:g}": (f"D_α={a:g} / token", 1.0, False) for a in GAP_ALPHAS},
}
# the sweep's own flags that this comparison replaces: evaluation happens once, after training
_IN_RUN_ONLY = ("--eval-interval", "--eval-data", "--eval-samples", "--eval-limit",
                "--eval-temperature", "--eval-max-new-tokens", "--opd-dump-tokens")  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "compare")
    p.add_argument("--seeds", type=int, default=None, help="seeds 1..N per method (8; quick 2)")
    p.add_argument("--heldout", type=int, default=None, help="held-out problems M (256; quick 8)")
    p.add_argument("--methods", nargs="+", choices=tuple(METHODS), default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="every method's learning rate (3e-4)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one CPU thread each)")
    p.add_argument("--quick", action="store_true", help="a miniature: the 2 baselines, tiny models")
    args = p.parse_args(argv)
    for flag, value, low in (("--seeds", args.seeds, 1), ("--heldout", args.heldout, 2),
                             ("--jobs", args.jobs, 1), ("--steps", args.steps, 1),
                             ("--lr", args.lr, 1e-12)):  # fmt: skip
        if value is not None and value < low:
            p.error(f"{flag} must be >= {low}, got {value}")
    args.seeds = args.seeds or (2 if args.quick else 8)
    args.heldout = args.heldout or (8 if args.quick else 256)
    return args


def config(args) -> tuple[sweep.SweepConfig, tuple[str, ...]]:
    cfg = sweep.sweep_config(sweep.parse_args(["--quick"] if args.quick else []))
    methods = BASELINES if args.quick else DEFAULT_METHODS
    if args.methods:
        methods = tuple(args.methods)
    missing = [b for b in BASELINES if b not in methods]
    if missing:
        raise SystemExit(f"compare.py: error: --methods must include {', '.join(missing)}")
    if args.steps:
        cfg.steps = args.steps
    if args.lr:
        cfg.lr = args.lr
    cfg.seeds = tuple(range(1, args.seeds + 1))
    cfg.methods = methods
    cfg.model_args = list(cfg.model_args)
    if "--heldout-problems" in cfg.model_args:
        i = cfg.model_args.index("--heldout-problems")
        del cfg.model_args[i : i + 2]
    pool = args.heldout if args.quick else max(args.heldout, HELDOUT_POOL)
    cfg.model_args += ["--heldout-problems", str(pool)]
    return cfg, methods


def _drop(flags: list[str], names: tuple[str, ...]) -> list[str]:
    out, i = [], 0
    while i < len(flags):
        if flags[i] in names:
            i += 2
        else:
            out.append(flags[i])
            i += 1
    return out


def evaluate_cmd(cfg, models: Path, load: Path, out: Path, heldout: int) -> list[str]:
    from make_models import eval_config

    ev = eval_config(cfg.eval_samples)
    return [sys.executable, str(ROOT / "scripts" / "evaluate.py"),
            "--load", str(load), "--teacher", str(models / "teacher"),
            "--data", str(models / "heldout.jsonl"), "--limit", str(heldout),
            "--samples", str(ev.samples),
            "--temperature", f"{ev.temperature:g}", "--max-new-tokens", str(ev.max_new_tokens),
            "--max-prompt-length", str(ev.max_prompt_length), "--seed", str(ev.seed),
            "--micro-batch-size", "16", "--gap-alpha", *(f"{a:g}" for a in GAP_ALPHAS),
            "--output", str(out), "--no-progress"]  # fmt: skip


def per_problem(eval_dir: Path) -> dict[str, list[float]]:
    """Per held-out problem (in index order): the fraction of correct samples, and each
    divergence's token mean over the problem's gap samples."""
    completions = sweep.read_jsonl(eval_dir / "completions.jsonl")
    gap_rows = sweep.read_jsonl(eval_dir / "gap.jsonl")
    n = 1 + max(r["index"] for r in completions)
    correct, samples = [0.0] * n, [0] * n
    for r in completions:
        correct[r["index"]] += float(r["correct"])
        samples[r["index"]] += 1
    out = {"accuracy": [c / k for c, k in zip(correct, samples, strict=True)]}
    keys = {"kl": "kl_sum", "tv": "tv_sum"}
    keys.update({f"power_div_{a:g}": f"power_div_{a:g}_sum" for a in GAP_ALPHAS})
    tokens = [0] * n
    sums = {k: [0.0] * n for k in keys}
    for r in gap_rows:
        tokens[r["index"]] += r["tokens"]
        for k, src in keys.items():
            sums[k][r["index"]] += r[src]
    for k in keys:
        out[k] = [s / max(t, 1) for s, t in zip(sums[k], tokens, strict=True)]
    return out


def _run(cmd: list[str], log: Path, threads: int) -> int:
    with open(log, "a") as f:
        env = sweep._env(threads)
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode


def run_one(cfg, models: Path, out: Path, method: str, seed: int, threads: int, heldout: int):
    name = f"{method}_seed{seed}"
    run_dir = out / "runs" / name
    result_file = run_dir / "result.json"
    flags = _drop(cfg.flags(models, run_dir, seed), _IN_RUN_ONLY)
    flags += ["--save", str(run_dir / "ckpt"), "--save-interval", str(cfg.steps)]
    flags += METHODS[method]
    evaluate = evaluate_cmd(cfg, models, run_dir / "ckpt", run_dir / "eval", heldout)
    if result_file.exists():
        cached = json.loads(result_file.read_text())
        check_cached(result_file, cached, flags, evaluate[1:])
        return cached
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    log = run_dir / "train.log"
    # the interpreter left out: the same run from another venv is the same run
    result = {"method": method, "seed": seed, "flags": flags, "evaluate": evaluate[1:]}
    t0 = time.perf_counter()
    rc = _run([sys.executable, str(ROOT / "scripts" / "pretrain_opd.py"), *flags], log, threads)
    result["train_seconds"] = time.perf_counter() - t0
    if rc == 0:
        t1 = time.perf_counter()
        rc = _run(evaluate, log, threads)
        result["eval_seconds"] = time.perf_counter() - t1
    result["returncode"] = rc
    if rc == 0:
        result["per_problem"] = per_problem(run_dir / "eval")
        rows = [r for r in sweep.read_jsonl(run_dir / "metrics.jsonl") if "grad_norm" in r]
        result["grad_norm_median"] = statistics.median(r["grad_norm"] for r in rows)
        result["grad_norm_max"] = max(r["grad_norm"] for r in rows)
        import shutil

        shutil.rmtree(run_dir / "ckpt")  # 1-2 MB a run; the numbers are what is kept
    else:
        result["error"] = sweep._tail(log)
    write_json_atomic(result_file, result)
    took = result["train_seconds"] + result.get("eval_seconds", 0.0)
    print(f"  {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {took:.0f} s", flush=True)
    return result


def check_cached(result_file: Path, cached: dict, flags: list[str], evaluate: list[str]) -> None:
    """Refuse a finished run made with other training or evaluation flags than this
    invocation's: reusing it would mix two configurations in one table."""
    for what, want in (("flags", flags), ("evaluate", evaluate)):
        got = cached.get(what)
        if got == want:
            continue
        if got is None:
            detail = f"it records no {what} (made before issue 30)"
        else:
            differ = [
                f"{got[i - 1] + ' ' if i and str(got[i - 1]).startswith('--') else ''}{a} vs {b}"
                for i, (a, b) in enumerate(zip(got, want, strict=False))
                if a != b
            ][:3]
            if len(got) != len(want):
                differ.append(f"{len(got)} vs {len(want)} arguments")
            detail = f"its {what} differ from this run's: {'; '.join(differ)}"
        raise SystemExit(
            f"compare.py: error: {result_file} was made with other flags ({detail}); "
            f"delete {result_file.parent} to redo it, or use another --out"
        )


def start_scores(cfg, models: Path, out: Path, threads: int, heldout: int):
    eval_dir = out / f"start_{heldout}"
    if not (eval_dir / "gap.jsonl").exists():
        eval_dir.mkdir(parents=True, exist_ok=True)
        cmd = evaluate_cmd(cfg, models, models / "student", eval_dir, heldout)
        if _run(cmd, out / "logs" / "start_eval.log", threads) != 0:
            raise SystemExit(f"evaluating the start failed; see {out / 'logs' / 'start_eval.log'}")
    return per_problem(eval_dir)


# --------------------------------------------------------------------------------------------
# The statistics


def _table(runs: list[dict], key: str, reference, scale: float) -> list[list[float]]:
    """Rows: seeds (in order); columns: problems; the run's value minus ``reference`` (one
    per-problem list, or ``{seed: list}``), times ``scale``."""
    rows = []
    for r in sorted(runs, key=lambda r: r["seed"]):
        ref = reference[r["seed"]] if isinstance(reference, dict) else reference
        rows.append([(a - b) * scale for a, b in zip(r["per_problem"][key], ref, strict=True)])
    return rows


def compare(results: list[dict], start: dict, methods) -> dict:
    """Per method and yardstick: the change from the start and the paired differences against
    each baseline, each an interval (in the yardstick's unit: points for accuracy)."""
    ok = [r for r in results if r["returncode"] == 0]
    by_method = {m: [r for r in ok if r["method"] == m] for m in methods}
    out = {}
    for m in methods:
        runs = by_method[m]
        entry = {"seeds": sorted(r["seed"] for r in runs)}
        entry["failed"] = sorted(r["seed"] for r in results if r["method"] == m and r not in ok)
        if not runs:
            out[m] = entry
            continue
        for key, (_, scale, _) in YARDSTICKS.items():
            table = _table(runs, key, start[key], scale)
            e = {"change": stats.crossed_mean_interval(table).as_dict()}
            e["start"] = statistics.fmean(start[key]) * scale
            for b in BASELINES:
                base = {r["seed"]: r["per_problem"][key] for r in by_method[b]}
                paired = [r for r in runs if r["seed"] in base]
                if m == b or not paired:
                    continue
                table = _table(paired, key, base, scale)
                iv = stats.crossed_mean_interval(table)
                e[f"vs_{b}"] = iv.as_dict()
                if key == "accuracy" and iv.seeds > 1:
                    # with these components and problems, the seeds for a half-width of 3 points
                    e[f"vs_{b}"]["seeds_for_3_points"] = stats.seeds_needed(
                        iv.sd_seed, iv.sd_problem, iv.problems, 3.0, iv.sd_residual
                    )
            entry[key] = e
        entry["grad_norm_median"] = statistics.fmean(r["grad_norm_median"] for r in runs)
        out[m] = entry
    return out


def head_to_head(results: list[dict], methods) -> dict:
    """Accuracy ``a - b`` (points) for every pair of bounded rewards present, paired over seeds
    and problems: row s is seed s's run of a minus seed s's run of b, problem by problem."""
    scale = YARDSTICKS["accuracy"][1]
    ok = [r for r in results if r["returncode"] == 0]
    by = {
        m: {r["seed"]: r["per_problem"]["accuracy"] for r in ok if r["method"] == m}
        for m in methods
    }
    present = [m for m in multiplicity.BOUNDED if by.get(m)]
    out = {}
    for a, b in combinations(present, 2):
        seeds = sorted(set(by[a]) & set(by[b]))
        if not seeds:
            continue
        table = [[(x - y) * scale for x, y in zip(by[a][s], by[b][s], strict=True)] for s in seeds]
        out[f"{a} - {b}"] = stats.crossed_mean_interval(table).as_dict()
    return {"accuracy": out}


def save_runs(path: Path, results: list[dict], start: dict, methods) -> None:
    """Every run's result (per-problem numbers included) and the start's per-problem numbers,
    gzipped JSON, byte-stable for the same content."""
    payload = {"methods": list(methods), "start": start, "runs": results}
    data = gzip.compress(json.dumps(payload).encode(), mtime=0)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def load_runs(path: Path) -> dict:
    return json.loads(gzip.decompress(Path(path).read_bytes()))


def recount(runs_file: Path) -> dict:
    """Every interval of the results, recomputed from ``runs.json.gz`` alone."""
    payload = load_runs(runs_file)
    methods = payload["methods"]
    return {
        "methods": compare(payload["runs"], payload["start"], methods),
        "head_to_head": head_to_head(payload["runs"], methods),
    }


def verdict(interval: dict, higher_is_better: bool) -> str:
    if interval["low"] <= 0 <= interval["high"]:
        return "not resolved"
    return "better" if (interval["mean"] > 0) == higher_is_better else "worse"


def _fmt(iv: dict, digits: int) -> str:
    return f"{iv['mean']:+.{digits}f} ± {iv['half_width']:.{digits}f}"


def markdown(table: dict, start_info: dict, cfg, wall: float) -> str:
    k = cfg.eval_samples
    lines = [
        f"# Reward comparison: {len(cfg.methods)} methods x {len(cfg.seeds)} seeds x "
        f"{start_info['problems']} held-out problems, {cfg.steps} steps each",
        "",
        f"Start (student): Avg@{k} {start_info['accuracy']:.1f}. Values: mean ± 95% half-width "
        "over seeds and problems (two-way crossed random effects, Satterthwaite df); paired "
        "differences use the same seed's baseline run on the same problems. A method is "
        "better/worse only when the interval excludes 0. "
        f"The runs took {wall / 60:.1f} min in all.",
        "",
        *(
            [
                "**One seed: the intervals cover the held-out problems only, not the variation "
                "between training seeds, which the earlier sweeps put at about 4 Avg@k points.**",
                "",
            ]
            if len(cfg.seeds) == 1
            else []
        ),  # fmt: skip
        f"| method | seeds | Avg@{k} change | vs vanilla | vs full_vocab_kl | verdict vs vanilla "
        "| verdict vs full_vocab_kl | seeds for ±3 vs vanilla |",
        "|---|---:|---:|---:|---:|---|---|---:|",
    ]
    for m, e in table.items():
        if "accuracy" not in e:
            lines.append(f"| {m} | failed | | | | | |")
            continue
        a = e["accuracy"]
        cells = [_fmt(a["change"], 1)]
        verdicts = []
        for b in BASELINES:
            iv = a.get(f"vs_{b}")
            cells.append(_fmt(iv, 1) if iv else "—")
            verdicts.append(verdict(iv, True) if iv else "—")
        need = a.get("vs_vanilla", {}).get("seeds_for_3_points", "—")
        need = "no: the problems' share alone is wider" if need is None else need
        lines.append(
            f"| {m} | {len(e['seeds'])} | " + " | ".join(cells + verdicts) + f" | {need} |"
        )
    lines += ["", "Divergence yardsticks (change from the start per token; lower is closer):", ""]
    keys = [key for key in YARDSTICKS if key != "accuracy"]
    lines.append("| method | " + " | ".join(YARDSTICKS[key][0] for key in keys) + " |")
    lines.append("|---|" + "---:|" * len(keys))
    start_row = [f"start {table[next(iter(table))][key]['start']:.4g}" for key in keys]
    lines.append("| (start) | " + " | ".join(start_row) + " |")
    for m, e in table.items():
        if "accuracy" in e:
            lines.append(f"| {m} | " + " | ".join(_fmt(e[key]["change"], 4) for key in keys) + " |")
    for b in BASELINES:
        lines += ["", f"Paired differences against {b} on each divergence (negative: closer to "
                  "the teacher than the baseline; **better** / *worse* only where the interval "
                  "excludes 0):", ""]  # fmt: skip
        lines.append("| method | " + " | ".join(YARDSTICKS[key][0] for key in keys) + " |")
        lines.append("|---|" + "---:|" * len(keys))
        for m, e in table.items():
            if "accuracy" not in e or m == b:
                continue
            cells = []
            for key in keys:
                iv = e[key].get(f"vs_{b}")
                if not iv:
                    cells.append("—")
                    continue
                v = verdict(iv, False)
                text = _fmt(iv, 4)
                marks = {"better": "**", "worse": "*"}.get(v, "")
                cells.append(f"{marks}{text}{marks}")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(
    table: dict,
    out: Path,
    k: int,
    note: str = "95% interval over seeds and problems",
    name: str = "compare.png",
) -> Path:
    from megatron_opd.evaluation.plots import pyplot, save_figure

    plt = pyplot()
    methods = [m for m in table if "accuracy" in table[m]]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.5), sharey=True)
    panels = (("change", f"Avg@{k} change from the start"),
              ("vs_vanilla", "paired difference vs vanilla"),
              ("vs_full_vocab_kl", "paired difference vs full-vocab KL"))  # fmt: skip
    for ax, (key, title) in zip(axes, panels, strict=True):
        for y, m in enumerate(methods):
            iv = table[m]["accuracy"].get(key)
            if iv:
                color = f"C{y % 10}"  # a method's colour in every panel
                ax.errorbar(iv["mean"], y, xerr=iv["half_width"], fmt="o", capsize=4, color=color)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(f"Avg@{k} points ({note})")
    axes[0].set_yticks(range(len(methods)), methods)
    axes[0].invert_yaxis()
    out.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, out / name)


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg, methods = config(args)
    out: Path = args.out
    (out / "logs").mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 2) // args.jobs)
    t0 = time.perf_counter()
    models_info = sweep.make_models(cfg, out / "models", threads=os.cpu_count() or 1)
    n_pool = len((out / "models" / "heldout.jsonl").read_text().splitlines())
    if n_pool < args.heldout:
        raise SystemExit(f"compare.py: error: --heldout {args.heldout}: the models in "
                         f"{out / 'models'} set aside only {n_pool} problems")  # fmt: skip
    start = start_scores(cfg, out / "models", out, os.cpu_count() or 1, args.heldout)
    print(f"start: Avg@{cfg.eval_samples} {100 * statistics.fmean(start['accuracy']):.1f} on "
          f"{len(start['accuracy'])} problems; {len(methods)} methods x {len(cfg.seeds)} seeds",
          flush=True)  # fmt: skip
    jobs = [(m, s) for s in cfg.seeds for m in methods]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(
            pool.map(lambda j: run_one(cfg, out / "models", out, *j, threads, args.heldout), jobs)
        )
    wall = time.perf_counter() - t0
    table = compare(results, start, methods)
    start_info = {"accuracy": 100 * statistics.fmean(start["accuracy"])}
    start_info["problems"] = len(start["accuracy"])
    text = markdown(table, start_info, cfg, wall)
    summary = {
        "config": {k: v for k, v in vars(cfg).items() if k != "model_args"},
        "heldout": args.heldout,
        "models": models_info,
        "start": start,
        "wall_seconds": wall,
        "run_seconds": {
            f"{r['method']}_seed{r['seed']}": r.get("train_seconds", 0.0)
            + r.get("eval_seconds", 0.0)
            for r in results
        },  # fmt: skip
        "methods": table,
        "head_to_head": head_to_head(results, methods),
    }
    summary["multiplicity"] = multiplicity.conclusions(summary)
    text += "\n" + multiplicity.markdown(summary["multiplicity"])
    save_runs(out / "runs.json.gz", results, start, methods)
    write_json_atomic(out / "results.json", summary)
    write_text_atomic(out / "results.md", text)
    png = plot(table, out / "plots", cfg.eval_samples)
    print("\n" + text + f"\nplot: {png}")
    failed = [f"{r['method']}_seed{r['seed']}" for r in results if r["returncode"] != 0]
    if failed:
        print(f"failed runs (logs under {out / 'runs'}): {', '.join(failed)}")
    return summary


if __name__ == "__main__":
    main()
