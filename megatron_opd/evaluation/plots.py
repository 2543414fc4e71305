"""PNG plots of a run from its ``--metrics-file`` (one JSON object per logged step)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

POSITION_KEYS = ("0_15", "16_63", "64_255", "256_plus")


def read_metrics(path: str | Path) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if "grad_norm" in r]  # evaluation lines carry no training numbers


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(metrics_path: str | Path, out_dir: str | Path, title: str = "") -> list[Path]:
    """reward_by_position.png, grad_norm.png and response_length.png; returns their paths."""
    plt = pyplot()
    rows = read_metrics(metrics_path)
    if not rows:
        raise ValueError(f"{metrics_path} has no training steps to plot")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = [r["step"] for r in rows]
    written = []

    fig, ax = plt.subplots(figsize=(6, 4))
    n = max(1, len(rows) // 5)
    for label, part in (("first steps", rows[:n]), ("last steps", rows[-n:])):
        values = [_mean([r.get(f"reward_by_position/{k}") for r in part]) for k in POSITION_KEYS]
        ax.plot(POSITION_KEYS, values, marker="o", label=f"{label} ({len(part)})")
    ax.set_xlabel("response position (tokens)")
    ax.set_ylabel("mean |reward|")
    ax.set_title(f"{title} reward by position".strip())
    ax.legend()
    written.append(save_figure(fig, out / "reward_by_position.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [r["grad_norm"] for r in rows], marker=".")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("gradient norm (before clipping)")
    ax.set_title(f"{title} gradient norm".strip())
    written.append(save_figure(fig, out / "grad_norm.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [r["response/mean_len"] for r in rows], marker=".", label="mean")
    ax.plot(steps, [r["response/max_len"] for r in rows], marker=".", label="max")
    ax.set_xlabel("step")
    ax.set_ylabel("response length (tokens)")
    ax.set_title(f"{title} response length".strip())
    ax.legend()
    written.append(save_figure(fig, out / "response_length.png"))
    return written


def _mean(values: Sequence) -> float:
    vals = [v for v in values if v is not None and v == v]
    return sum(vals) / len(vals) if vals else float("nan")


def save_figure(fig, path: Path) -> Path:
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    pyplot().close(fig)
    tmp.replace(path)
    return path


GAP_PANELS = (
    ("gap/mean/kl_per_token", "held-out KL(π_S‖π_T) per token"),
    ("gap/mean/teacher_nll_per_token", "teacher NLL per token"),
)


def plot_gap(curves: dict[str, list[dict]], path: str | Path, title: str = "") -> Path:
    """The held-out gap over training, one line per run: ``{label: evaluation rows}``, each row
    a metrics-file line with ``step`` and ``gap/mean/*``
    (``megatron_opd.evaluation.gap.metrics``)."""
    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(GAP_PANELS), figsize=(11, 4))
    for ax, (key, label) in zip(axes, GAP_PANELS, strict=True):
        for name, rows in curves.items():
            points = [(r["step"], r[key]) for r in rows if key in r]
            ax.plot([s for s, _ in points], [v for _, v in points], marker="o", label=name)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_title(f"{title} {label}".strip(), fontsize=10)
        ax.legend()
    return save_figure(fig, path)
