"""The trainer's config: one section per concern of the loop (the batch, the rollout, the reward,
checkpoints, logging, evaluation, when to stop). Built from the flags once, by
:func:`megatron_opd.training.arguments.trainer_config`, which launch calls; nothing below launch
reads the command line."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from megatron_opd.evaluation.accuracy import EvalConfig
from megatron_opd.reward.rewards import RewardConfig
from megatron_opd.training.opd import RolloutConfig


@dataclass
class BatchConfig:
    """A step's batch: how many responses, and how they are cut into micro-batches."""

    global_batch_size: int = 32  # responses per optimizer step, over every data-parallel rank
    samples_per_prompt: int = 1  # responses to each drawn prompt
    micro_batch_size: int = 1  # rows (teacher pass, student step, held-out gap)
    max_tokens_per_micro_batch: Optional[int] = None  # length-grouped micro-batches instead
    mask_terminal_stop: bool = True  # each response's final stop token out of the loss


@dataclass
class CheckpointConfig:
    save: Optional[str] = None  # the run's checkpoints (None: nothing is saved)
    interval: Optional[int] = None  # also save every this many iterations
    load: Optional[str] = None  # the student checkpoint the run was given
    params_dtype: str = "float32"  # the student's, recorded in each checkpoint's metadata


@dataclass
class LogConfig:
    interval: int = 1  # every this many iterations (and every skipped step)
    metrics_file: Optional[str] = None  # jsonl of every logged step
    tensorboard_dir: Optional[str] = None
    wandb_project: Optional[str] = None
    wandb_exp_name: Optional[str] = None
    wandb_save_dir: Optional[str] = None
    dump_tokens: Optional[str] = None  # a directory for every scored token of each step
    flags: dict[str, Any] = field(default_factory=dict)  # every flag: the wandb run's config

    # where the metrics go: MetricsLogger's keyword arguments, and the flags of the same names
    SINKS: ClassVar[tuple[str, ...]] = (
        "metrics_file", "tensorboard_dir", "wandb_project", "wandb_exp_name", "wandb_save_dir",
    )  # fmt: skip

    def sinks(self) -> dict[str, Optional[str]]:
        """:class:`megatron_opd.runtime.metrics_logger.MetricsLogger`'s keyword arguments."""
        return {name: getattr(self, name) for name in self.SINKS}


@dataclass
class PeriodicEvalConfig:
    """Evaluation during training: which benchmarks, how often, how sampled."""

    interval: Optional[int] = None  # None: no evaluation
    data: Optional[list[str]] = None  # benchmark files or builtin[:N] specs
    at_start: bool = False  # also before the first step
    gap: bool = True  # also the distillation gap on the held-out prompts
    gap_teacher: Optional[str] = None  # the gap's teacher checkpoint; None: the run's teacher
    sampling: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class StopConfig:
    """When the run ends before ``train_iters``."""

    exit_signal: Optional[str] = None  # on it, save after the current step and exit; None: off
    exit_interval: Optional[int] = None  # exit after an iteration divisible by this
    max_consecutive_skips: int = 3  # non-finite steps in a row that stop the run


@dataclass
class TrainerConfig:
    """What :class:`megatron_opd.training.trainer.Trainer` reads of the run, by section."""

    train_iters: int
    seed: int  # the prompt stream's and every step's sampling seed
    prompt_data: str  # the --prompt-data spec, recorded for a resume to check
    batch: BatchConfig
    rollout: RolloutConfig
    reward: RewardConfig
    checkpoint: CheckpointConfig
    log: LogConfig
    eval: PeriodicEvalConfig
    stop: StopConfig
