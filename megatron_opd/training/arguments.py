"""Command-line flags of ``scripts/pretrain_opd.py``, spelled as in Megatron-LM, plus ``--opd-*``.

``--config FILE.yaml`` supplies any flag (keys spelled like the flag, with ``-`` or ``_``); the
command line overrides the file. :func:`validate_args` checks everything that can be checked
before a model is built and raises ``ValueError`` with one line naming the flag to fix.

Defaults follow the PowerOPD paper where it states them: lr 5e-7 constant with 5% warmup, global
batch 32, 1.5k steps, rollouts at temperature 1.0, one response per prompt, at most 1024 new tokens,
final stop token masked; evaluation at temperature 0.6 with 8 samples.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import yaml

from megatron_opd.evaluation.accuracy import EvalConfig
from megatron_opd.reward.rewards import REWARD_KINDS, RewardConfig
from megatron_opd.rollout.engines import ENGINES
from megatron_opd.rollout.engines.megatron import dynamic_engine_unavailable
from megatron_opd.runtime import cli, errors
from megatron_opd.runtime.distributed import ParallelConfig
from megatron_opd.training.config import (
    BatchConfig,
    CheckpointConfig,
    LogConfig,
    PeriodicEvalConfig,
    StopConfig,
    TrainerConfig,
)
from megatron_opd.training.opd import RolloutConfig


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="pretrain_opd.py",
        description="On-policy distillation with PowerOPD rewards on Megatron-Core.",
    )
    p.add_argument("--config", type=str, default=None, help="YAML file of flags")

    g = p.add_argument_group("distributed")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--recompute-granularity", choices=("full", "selective"), default=None)
    g.add_argument("--distributed-timeout-minutes", type=int, default=30)

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=32, help="responses per optimizer step")
    g.add_argument(
        "--max-tokens-per-micro-batch",
        type=int,
        default=None,
        help="group each step's sequences by length into micro-batches of at most this many "
        "(padded) tokens, for the teacher pass and the student step; replaces "
        "--micro-batch-size rows",
    )
    g.add_argument("--train-iters", type=int, default=1500)
    g.add_argument("--lr", type=float, default=5e-7)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-fraction", type=float, default=0.05)
    g.add_argument("--lr-decay-style", choices=("constant", "linear", "cosine"), default="constant")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--bf16", action="store_true", help="student in bf16 (fp32 main weights)")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument(
        "--exit-signal-handler",
        action="store_true",
        help="on SIGTERM (or --exit-signal), save a checkpoint after the current step and exit",
    )
    g.add_argument("--exit-signal", choices=("SIGTERM", "SIGUSR1", "SIGUSR2"), default="SIGTERM")
    g.add_argument(
        "--exit-interval",
        type=int,
        default=None,
        help="exit after the iteration divisible by this (after its checkpoint, if any)",
    )

    g = p.add_argument_group("checkpointing")
    g.add_argument("--load", type=str, default=None, help="student checkpoint to start from")
    g.add_argument("--save", type=str, default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument(
        "--finetune",
        action="store_true",
        help="take only the weights from --load (no optimizer, iteration or data position)",
    )

    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--tensorboard-dir", type=str, default=None)
    g.add_argument("--wandb-project", type=str, default=None)
    g.add_argument("--wandb-exp-name", type=str, default=None)
    g.add_argument("--wandb-save-dir", type=str, default=None)
    g.add_argument("--metrics-file", type=str, default=None, help="jsonl of every logged step")
    g.add_argument(
        "--opd-dump-tokens",
        type=str,
        default=None,
        help="directory for per-step .pt files of every scored token (lp_T, lp_S, mask)",
    )

    g = p.add_argument_group("on-policy distillation")
    g.add_argument(
        "--opd-teacher-load",
        type=str,
        nargs="+",
        default=None,
        help="teacher checkpoint(s); with several, each prompt's 'teacher' field picks one "
        "(0-based, in this order)",
    )
    g.add_argument(
        "--opd-teacher-tensor-model-parallel-size",
        type=int,
        nargs="+",
        default=None,
        help="the teacher's own TP size (one value, or one per teacher); default the student's",
    )
    g.add_argument(
        "--opd-teacher-pipeline-model-parallel-size",
        type=int,
        nargs="+",
        default=None,
        help="the teacher's own PP size (one value, or one per teacher); default the student's",
    )
    g.add_argument(
        "--opd-teacher-expert-model-parallel-size",
        type=int,
        nargs="+",
        default=None,
        help="a mixture-of-experts teacher's expert-parallel size on its own grid: its experts "
        "split over this many of its data-parallel replicas (one value, or one per teacher); "
        "default 1",
    )
    g.add_argument("--opd-reward", choices=REWARD_KINDS, default="power")
    g.add_argument("--opd-alpha", type=float, default=5.0, help="PowerOPD exponent, > 0")
    g.add_argument("--opd-clip-min", type=float, default=-1.0)
    g.add_argument("--opd-clip-max", type=float, default=1.0)
    g.add_argument("--opd-tanh-temperature", type=float, default=5.0)
    g.add_argument(
        "--opd-tropd-alpha",
        type=float,
        default=0.2,
        help="tropd: weight of the teacher in the proximal teacher a*pi_T + (1-a)*pi_S, in (0, 1]",
    )
    g.add_argument(
        "--opd-mask-terminal-stop",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="leave each response's final stop token out of the loss",
    )
    g.add_argument("--opd-teacher-bf16", action="store_true", help="run the teacher in bf16")
    g.add_argument(
        "--opd-max-consecutive-skips",
        type=int,
        default=3,
        help="stop after this many non-finite steps in a row",
    )

    g = p.add_argument_group("rollout")
    g.add_argument("--rollout-max-new-tokens", type=int, default=1024)
    g.add_argument("--rollout-temperature", type=float, default=1.0)
    g.add_argument("--rollout-top-p", type=float, default=1.0)
    g.add_argument("--rollout-top-k", type=int, default=0)
    g.add_argument("--rollout-samples-per-prompt", type=int, default=1)
    g.add_argument(
        "--rollout-engine",
        choices=("auto", *ENGINES),
        default="auto",
        help="static: Megatron-Core's static engine; dynamic: its continuous-batching engine "
        "(CUDA + flash-attn); graph: the decode step captured as one CUDA graph (eager on CPU; "
        "pipeline size 1); auto: graph on CUDA where supported, else static",
    )
    for dim in ("tensor", "pipeline"):
        g.add_argument(
            f"--rollout-{dim}-model-parallel-size",
            type=int,
            default=None,
            help=f"sample rollouts from a copy of the student at this {dim[0].upper()}P size "
            "(DP = world / (TP x PP)), refitted from the training weights before each step; "
            "default: the training layout, no copy (Megatron-RL: --rl-inference-*)",
        )
    g.add_argument(
        "--rollout-ranks",
        type=int,
        default=0,
        help="the last N ranks of the world only sample rollouts, from a copy of the student at "
        "--rollout-*-model-parallel-size (default TP1 x PP1) refitted after each optimizer "
        "step; the other ranks train (megatron_opd/runtime/pools.py, "
        "megatron_opd/rollout/remote.py)",
    )
    g.add_argument(
        "--rollout-lag",
        type=int,
        default=0,
        help="with --rollout-ranks: 0 = each step's batch comes from the current weights (the "
        "rollout ranks wait for them); 1 = from the weights one step old, generated while the "
        "previous step trains (Megatron-RL: --rl-generation-lag)",
    )

    g = p.add_argument_group("data and tokenizer")
    g.add_argument(
        "--prompt-data",
        type=str,
        default="builtin",
        help="prompt file (jsonl / json) or 'builtin[:N]' for the built-in arithmetic set",
    )
    g.add_argument("--max-prompt-length", type=int, default=512)
    g.add_argument("--system-prompt", type=str, default=None)
    g.add_argument(
        "--tokenizer", type=str, default=None, help="defaults to the student checkpoint's"
    )

    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-interval", type=int, default=None)
    g.add_argument("--eval-data", type=str, nargs="*", default=None)
    g.add_argument("--eval-samples", type=int, default=8)
    g.add_argument("--eval-limit", type=int, default=None, help="problems per benchmark")
    g.add_argument("--eval-temperature", type=float, default=0.6)
    g.add_argument("--eval-max-new-tokens", type=int, default=4096)
    g.add_argument(
        "--eval-at-start", action="store_true", help="also evaluate before the first step"
    )
    g.add_argument(
        "--eval-gap",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also report the distillation gap (KL to the teacher) on the held-out prompts",
    )
    g.add_argument(
        "--eval-teacher",
        type=str,
        default=None,
        help="teacher checkpoint of the held-out gap (default: --opd-teacher-load's)",
    )
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**load_config(pre.config, parser))
    return parser.parse_args(argv)


def load_config(path: str, parser: Optional[argparse.ArgumentParser] = None) -> dict:
    """The YAML file's flags, each converted exactly as the command line would convert it (the
    flag's type, choices and action); anything that does not convert is one error naming the file
    and the key."""
    parser = parser or build_parser()
    file = Path(path)
    if not file.is_file():
        raise errors.UserError(f"--config {path} does not exist")
    try:
        raw = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise errors.UserError(f"--config {path}: YAML syntax error{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise errors.UserError(f"--config {path}: expected a mapping of flag: value")
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    out = {}
    for key, value in raw.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in actions or dest in ("config", "help"):
            raise errors.UserError(f"--config {path}: unknown flag {key!r}")
        try:
            out[dest] = _config_value(actions[dest], value)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            raise errors.UserError(f"--config {path}: {key}: {e}") from None
    return out


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _config_value(action: argparse.Action, value):
    """``value`` from YAML as ``action`` would have parsed it from the command line."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)) or isinstance(
        action, argparse.BooleanOptionalAction
    ):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError(f"expected true or false, got {value!r}")
    if value is None:
        if action.default is None:
            return None
        raise ValueError("needs a value (null is only for flags that default to unset)")
    many = action.nargs in ("*", "+") or isinstance(action.nargs, int)
    if many:
        items = value if isinstance(value, list) else [value]
        return [_config_scalar(action, v) for v in items]
    return _config_scalar(action, value)


def _config_scalar(action: argparse.Action, value):
    if isinstance(value, (list, dict)):
        raise ValueError(f"expected one value, got {type(value).__name__} {value!r}")
    if isinstance(value, bool) and action.type is not None:
        raise ValueError(f"expected a {action.type.__name__}, got {value!r}")
    text = str(value)
    converted = action.type(text) if action.type is not None else text
    if action.choices is not None and converted not in action.choices:
        choices = ", ".join(map(repr, action.choices))
        raise ValueError(f"invalid choice {converted!r} (choose from {choices})")
    return converted


def validate_args(args: argparse.Namespace, world_size: int) -> None:
    """Everything checkable before a model is built; one ValueError naming the flag."""
    check_numbers(args)
    reward_config(args).validate()
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    for flag, value in (
        ("--tensor-model-parallel-size", tp),
        ("--pipeline-model-parallel-size", pp),
        ("--micro-batch-size", args.micro_batch_size),
        ("--global-batch-size", args.global_batch_size),
        ("--train-iters", args.train_iters),
        ("--rollout-max-new-tokens", args.rollout_max_new_tokens),
        ("--rollout-samples-per-prompt", args.rollout_samples_per_prompt),
        ("--max-prompt-length", args.max_prompt_length),
    ):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    world_size = validate_rollout_ranks(args, world_size)
    ParallelConfig(tp, pp).validate(world_size)
    dp = world_size // (tp * pp)
    if args.global_batch_size % (args.micro_batch_size * dp) != 0:
        raise ValueError(
            f"--global-batch-size {args.global_batch_size} is not divisible by "
            f"--micro-batch-size {args.micro_batch_size} x data-parallel size {dp}"
        )
    if args.global_batch_size % args.rollout_samples_per_prompt != 0:
        raise ValueError(
            f"--global-batch-size {args.global_batch_size} is not divisible by "
            f"--rollout-samples-per-prompt {args.rollout_samples_per_prompt}"
        )
    if args.rollout_temperature <= 0:
        raise ValueError(f"--rollout-temperature must be > 0, got {args.rollout_temperature}")
    if not 0 < args.rollout_top_p <= 1:
        raise ValueError(f"--rollout-top-p must be in (0, 1], got {args.rollout_top_p}")
    if args.lr < 0 or args.min_lr < 0 or args.min_lr > args.lr:
        raise ValueError(f"need 0 <= --min-lr <= --lr, got {args.min_lr} and {args.lr}")
    if not 0 <= args.lr_warmup_fraction < 1:
        raise ValueError(f"--lr-warmup-fraction must be in [0, 1), got {args.lr_warmup_fraction}")
    if args.num_layers_per_virtual_pipeline_stage is not None and pp == 1:
        raise ValueError(
            "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1"
        )
    if args.load is None:
        raise ValueError("--load (the student checkpoint) is required")
    if args.opd_teacher_load is None:
        raise ValueError("--opd-teacher-load (the teacher checkpoint) is required")
    paths = [("--load", args.load)] + [("--opd-teacher-load", t) for t in teacher_loads(args)]
    for flag, path in paths:
        if not Path(path).exists():
            raise ValueError(f"{flag} {path} does not exist")
    if args.save_interval is not None and args.save is None:
        raise ValueError("--save-interval needs --save")
    if args.rollout_engine == "dynamic":
        reason = dynamic_engine_unavailable()
        if reason:
            raise ValueError(f"--rollout-engine dynamic: {reason}")
    if args.rollout_engine == "graph" and _rollout_pipeline_size(args) > 1:
        raise ValueError(
            f"--rollout-engine graph needs pipeline size 1 for the rollout model, got "
            f"{_rollout_pipeline_size(args)}; sample from a copy at PP 1 with "
            "--rollout-pipeline-model-parallel-size 1 (and --rollout-tensor-model-parallel-size)"
        )
    _validate_token_budget(args)
    if args.eval_interval is not None and not args.eval_data:
        raise ValueError("--eval-interval needs --eval-data")
    if args.eval_teacher is not None and not Path(args.eval_teacher).exists():
        raise ValueError(f"--eval-teacher {args.eval_teacher} does not exist")


def _rollout_pipeline_size(args: argparse.Namespace) -> int:
    """The pipeline size of the model that samples rollouts (the student, or its copy)."""
    if args.rollout_pipeline_model_parallel_size is not None:
        return args.rollout_pipeline_model_parallel_size
    return 1 if args.rollout_ranks else args.pipeline_model_parallel_size


def validate_rollout_ranks(args: argparse.Namespace, world_size: int) -> int:
    """``--rollout-ranks`` / ``--rollout-lag`` against the world; returns the training ranks."""
    n, lag = args.rollout_ranks, args.rollout_lag
    if lag not in (0, 1):
        raise ValueError(f"--rollout-lag must be 0 or 1, got {lag}")
    if n < 0:
        raise ValueError(f"--rollout-ranks must be >= 0, got {n}")
    if n == 0:
        if lag:
            raise ValueError(
                "--rollout-lag 1 needs --rollout-ranks: ranks that both sample and train take "
                "turns, so a lag would only make the rollouts older"
            )
        return world_size
    if n >= world_size:
        raise ValueError(f"--rollout-ranks {n} leaves no training rank in a world of {world_size}")
    tp = args.rollout_tensor_model_parallel_size or 1
    pp = args.rollout_pipeline_model_parallel_size or 1
    if n % (tp * pp) != 0:
        raise ValueError(
            f"--rollout-ranks {n} is not divisible by --rollout-tensor-model-parallel-size {tp} "
            f"x --rollout-pipeline-model-parallel-size {pp}"
        )
    if args.rollout_engine == "dynamic":
        raise ValueError("--rollout-engine dynamic with --rollout-ranks: not supported; use static")
    train = world_size - n
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if train % (tp * pp) != 0:
        raise ValueError(
            f"the {train} training ranks (world {world_size} - --rollout-ranks {n}) are not "
            f"divisible by --tensor-model-parallel-size {tp} x --pipeline-model-parallel-size {pp}"
        )
    return train


def _validate_token_budget(args: argparse.Namespace) -> None:
    budget = getattr(args, "max_tokens_per_micro_batch", None)
    if budget is None:
        return
    if budget < 1:
        raise ValueError(f"--max-tokens-per-micro-batch must be >= 1, got {budget}")
    if args.num_layers_per_virtual_pipeline_stage is not None:
        raise ValueError(
            "--max-tokens-per-micro-batch cannot be combined with "
            "--num-layers-per-virtual-pipeline-stage (variable shapes need the 1F1B schedule)"
        )


# Ranges of the numeric flags (every float flag must also be finite). Unset (None) flags pass.
RANGES = {
    "--tensor-model-parallel-size": cli.at_least(1),
    "--pipeline-model-parallel-size": cli.at_least(1),
    "--num-layers-per-virtual-pipeline-stage": cli.at_least(1),
    "--distributed-timeout-minutes": cli.at_least(1),
    "--micro-batch-size": cli.at_least(1),
    "--global-batch-size": cli.at_least(1),
    "--train-iters": cli.at_least(1),
    "--lr": cli.Range(0, 1),  # Adam's step is ~lr per weight: beyond 1 the weights are noise
    "--min-lr": cli.Range(0, 1),
    "--lr-warmup-fraction": cli.Range(0, 1, hi_closed=False),
    "--weight-decay": cli.at_least(0),
    "--clip-grad": cli.at_least(0),
    "--adam-beta1": cli.Range(0, 1, hi_closed=False),
    "--adam-beta2": cli.Range(0, 1, hi_closed=False),
    "--adam-eps": cli.above(0),
    "--seed": cli.Range(0, 2**32 - 1),  # numpy's seed range
    "--exit-interval": cli.at_least(1),
    "--save-interval": cli.at_least(1),
    "--log-interval": cli.at_least(1),
    "--opd-max-consecutive-skips": cli.at_least(1),
    "--rollout-max-new-tokens": cli.at_least(1),
    "--rollout-temperature": cli.above(0),
    "--rollout-top-p": cli.Range(0, 1, lo_closed=False),
    "--rollout-top-k": cli.at_least(0),
    "--rollout-samples-per-prompt": cli.at_least(1),
    "--rollout-ranks": cli.at_least(0),
    "--rollout-lag": cli.Range(0, 1),
    "--max-prompt-length": cli.at_least(1),
    "--eval-interval": cli.at_least(1),
    "--eval-samples": cli.at_least(1),
    "--eval-limit": cli.at_least(1),
    "--eval-temperature": cli.at_least(0),
    "--eval-max-new-tokens": cli.at_least(1),
}


def check_numbers(args: argparse.Namespace) -> None:
    """Every float flag finite and every numeric flag in its range (:data:`RANGES`), and a
    well-formed ``--prompt-data builtin:N``."""
    cli.check_numbers(build_parser(), args, RANGES)
    spec = args.prompt_data
    if spec.startswith("builtin:"):
        n = spec.split(":", 1)[1]
        if not (n.isdigit() and int(n) >= 1):
            raise errors.UserError(
                f"--prompt-data {spec}: N in builtin:N must be a whole number >= 1, got {n!r}"
            )


def reward_config(args: argparse.Namespace) -> RewardConfig:
    return RewardConfig(
        kind=args.opd_reward,
        **cli.flags(args, "alpha", "clip_min", "clip_max", "tanh_temperature", "tropd_alpha",
                    prefix="opd_"),
    )  # fmt: skip


def rollout_config(args: argparse.Namespace) -> RolloutConfig:
    """How the student samples, for the trainer and the rollout ranks alike (``engine`` "auto":
    graph on CUDA where supported, else static)."""
    return RolloutConfig(
        top_p=0.0 if args.rollout_top_p >= 1.0 else args.rollout_top_p,
        **cli.flags(args, "max_new_tokens", "temperature", "top_k", "engine", prefix="rollout_"),
    )


def eval_config(args: argparse.Namespace) -> EvalConfig:
    """How the trainer's evaluations sample (``--eval-*``, the training prompt format)."""
    return EvalConfig(
        **cli.flags(args, "samples", "temperature", "max_new_tokens", "limit", prefix="eval_"),
        **cli.flags(args, "max_prompt_length", "system_prompt", "seed"),
    )


def trainer_config(args: argparse.Namespace) -> TrainerConfig:
    """Every section the training loop reads (:mod:`megatron_opd.training.config`)."""
    return TrainerConfig(
        **cli.flags(args, "train_iters", "seed", "prompt_data"),
        rollout=rollout_config(args),
        reward=reward_config(args),
        batch=BatchConfig(
            samples_per_prompt=args.rollout_samples_per_prompt,
            mask_terminal_stop=args.opd_mask_terminal_stop,
            **cli.flags(
                args, "global_batch_size", "micro_batch_size", "max_tokens_per_micro_batch"
            ),
        ),
        checkpoint=CheckpointConfig(
            interval=args.save_interval,
            params_dtype="bfloat16" if args.bf16 else "float32",
            **cli.flags(args, "save", "load"),
        ),
        log=LogConfig(
            interval=args.log_interval,
            dump_tokens=args.opd_dump_tokens,
            flags=dict(vars(args)),
            **cli.flags(args, *LogConfig.SINKS),
        ),
        eval=PeriodicEvalConfig(
            data=args.eval_data,
            gap_teacher=args.eval_teacher,
            sampling=eval_config(args),
            **cli.flags(args, "interval", "at_start", "gap", prefix="eval_"),
        ),
        stop=StopConfig(
            exit_signal=args.exit_signal if args.exit_signal_handler else None,
            exit_interval=args.exit_interval,
            max_consecutive_skips=args.opd_max_consecutive_skips,
        ),
    )


def teacher_loads(args: argparse.Namespace) -> list[str]:
    """``--opd-teacher-load`` as a list (a YAML config may give one string)."""
    value = args.opd_teacher_load
    return [value] if isinstance(value, str) else list(value or [])


def teacher_layouts(args: argparse.Namespace) -> list[tuple[int, int, int]]:
    """(TP, PP, EP) of each teacher: one value of ``--opd-teacher-*-model-parallel-size`` for
    all, one per teacher, or the student's (EP: 1)."""
    n = len(teacher_loads(args))
    out = []
    for flag, values, default in (
        ("--opd-teacher-tensor-model-parallel-size", args.opd_teacher_tensor_model_parallel_size,
         args.tensor_model_parallel_size),
        ("--opd-teacher-pipeline-model-parallel-size",
         args.opd_teacher_pipeline_model_parallel_size, args.pipeline_model_parallel_size),
        ("--opd-teacher-expert-model-parallel-size",
         getattr(args, "opd_teacher_expert_model_parallel_size", None), 1),
    ):  # fmt: skip
        values = [values] if isinstance(values, int) else list(values or [default])
        if len(values) not in (1, n):
            raise ValueError(
                f"{flag} takes one value or one per --opd-teacher-load ({n}), got {len(values)}"
            )
        out.append(values * n if len(values) == 1 else values)
    return list(zip(*out, strict=True))
