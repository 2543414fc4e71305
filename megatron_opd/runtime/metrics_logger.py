"""Where a step's numbers go: a console line, tensorboard, wandb and a jsonl file (rank 0 only)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from megatron_opd.runtime.distributed import is_rank0

# keys shown on the console line, in this order, when present
CONSOLE_KEYS = (
    "loss",
    "reward/mean",
    "reward/abs_mean",
    "grad_norm",
    "lr",
    "response/mean_len",
    "response/truncated_frac",
    "time/step",
    "tokens_per_sec",
    "eval/mean/avg_at_k",
    "eval/mean/pass_at_k",
    "gap/mean/kl_per_token",
    "gap/mean/teacher_nll_per_token",
    "gap/mean/log_ratio_mean",
    "student/entropy",
)


class MetricsLogger:
    def __init__(
        self,
        tensorboard_dir: Optional[str] = None,
        wandb_project: Optional[str] = None,
        wandb_exp_name: Optional[str] = None,
        wandb_save_dir: Optional[str] = None,
        metrics_file: Optional[str] = None,
        config: Optional[dict[str, Any]] = None,
        enabled: Optional[bool] = None,
        start_step: Optional[int] = None,
    ):
        """``start_step``: the iteration the run starts (or resumes) from; rows the metrics file
        holds past it, and tensorboard events past it, are from steps that will be redone."""
        self.enabled = is_rank0() if enabled is None else enabled
        self.tb = None
        self.wandb = None
        self.file = None
        if not self.enabled:
            return
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if start_step is None else start_step + 1
            self.tb = SummaryWriter(log_dir=tensorboard_dir, purge_step=purge)
        if wandb_project:
            import wandb

            if not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
                os.environ["WANDB_MODE"] = "offline"  # no key, no network: keep the run locally
            self.wandb = wandb.init(
                project=wandb_project,
                name=wandb_exp_name,
                dir=wandb_save_dir or tensorboard_dir or ".",
                config=config or {},
            )
        if metrics_file:
            Path(metrics_file).parent.mkdir(parents=True, exist_ok=True)
            if start_step is not None:
                drop_rows_after(metrics_file, start_step)
            self.file = open(metrics_file, "a")  # noqa: SIM115 - kept open for the run

    def log(self, step: int, metrics: dict[str, float], console: bool = True) -> None:
        if not self.enabled:
            return
        if console:
            parts = [f"iter {step:6d}"]
            for key in CONSOLE_KEYS:
                if key in metrics:
                    parts.append(f"{key} {metrics[key]:.4g}")
            print(" | ".join(parts), flush=True)
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(key, value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.file is not None:
            self.file.write(json.dumps({"step": step, **metrics}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.file is not None:
            self.file.close()


def drop_rows_after(path: str | Path, step: int) -> int:
    """Rewrite the jsonl ``path`` without rows whose ``step`` is past ``step`` (atomically); a
    torn last line (a kill mid-write) goes too. Returns how many rows were dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(row, dict) and row.get("step", 0) > step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return dropped
