"""From flags to a ready :class:`~megatron_opd.training.trainer.Trainer`: what
``scripts/pretrain_opd.py`` does between parsing and ``Trainer.run()``, as a library any launcher
can call.

    args = arguments.parse_args(argv)
    inputs = launch.check_inputs(args, world_size)     # no model built yet; ValueError on bad input
    launch.initialize(args)                            # torch.distributed + Megatron's groups
    trainer = launch.build_trainer(args, inputs)       # student + optimizer + teacher(s), resumed
    trainer.run()

:func:`check_inputs` reads every checkpoint's metadata, the tokenizer and the prompts and checks
every layout, so that a user error surfaces before any weight is loaded.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from megatron_opd.models import convert, gpt
from megatron_opd.models.tokenizer import CHECKPOINT_TOKENIZER_DIR, load_tokenizer
from megatron_opd.rollout import refit, remote, sources
from megatron_opd.runtime import checkpointing, cli, distributed, outputs
from megatron_opd.training import arguments, data, resume, teacher
from megatron_opd.training.trainer import Trainer


@dataclass
class Inputs:
    """What the run reads, resolved and checked before any model is built."""

    student_dir: Path  # weights + metadata the student starts from
    resume_root: Optional[Path]  # a training run to restore optimizer/iteration/data from
    teacher_dir: Path
    student_arch: gpt.ArchConfig
    student_meta: dict
    teacher_arch: gpt.ArchConfig
    teacher_meta: dict
    tokenizer: Any
    prompts: data.PromptSet
    teachers: list[TeacherInput] = field(default_factory=list)  # every teacher, in flag order

    @property
    def own_teacher_layout(self) -> bool:
        """True when a teacher leaves the student's grid (or there are several): the teachers
        run on their own groups (``megatron_opd.training.teacher``)."""
        return len(self.teachers) > 1 or any(t.own_layout for t in self.teachers)


@dataclass
class TeacherInput:
    name: str  # "teacher" alone, "teacher<k>" with several
    directory: Path
    arch: gpt.ArchConfig
    meta: dict
    tensor_parallel_size: int
    pipeline_parallel_size: int
    expert_parallel_size: int
    own_layout: bool  # a layout flag was given and differs from the student's


def check_inputs(args: argparse.Namespace, world_size: int) -> Inputs:
    """Validate the flags, the checkpoints' metadata, layouts, tokenizer and prompts.

    Raises ``ValueError`` (or ``FileNotFoundError``) with one line naming the flag or file."""
    arguments.validate_args(args, world_size)
    resume.prepare_save_dir(args.save)
    outputs.check_output_file("--metrics-file", args.metrics_file)
    for flag, path in (
        ("--tensorboard-dir", args.tensorboard_dir),
        ("--wandb-save-dir", args.wandb_save_dir),
        ("--opd-dump-tokens", args.opd_dump_tokens),
    ):
        outputs.check_output_dir(flag, path)
    resume_root = None
    for root in (args.save, None if args.finetune else args.load):
        if root and checkpointing.latest_iteration(root) is not None:
            resume_root = Path(root)
            break
    student_dir = checkpointing.resolve_checkpoint(resume_root or args.load)
    if not (student_dir / checkpointing.META_FILE).exists():
        raise ValueError(
            f"--load {student_dir} has no {checkpointing.META_FILE}: convert it with "
            "scripts/convert_hf_to_megatron.py"
        )
    s_arch, s_meta = convert.read_checkpoint(student_dir)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    vpp = virtual_stages(args, s_arch)
    gpt.validate_layout(s_arch, tp, pp, vpp)
    if s_arch.is_moe and tp > 1:
        # Megatron's MoELayer raises mid-step when it trains at TP > 1 without sequence parallelism
        raise ValueError(
            f"--load {student_dir}: a mixture-of-experts student trains at "
            f"--tensor-model-parallel-size 1 only (got {tp}); an MoE teacher may use any TP"
        )
    train_world = arguments.validate_rollout_ranks(args, world_size)
    rollout_layout(args, s_arch, world_size)
    teachers = check_teachers(args, train_world, s_arch, s_meta)
    t_arch = teachers[0].arch
    t_meta = teachers[0].meta
    context = args.max_prompt_length + args.rollout_max_new_tokens
    limit = min(
        [s_arch.max_position_embeddings] + [t.arch.max_position_embeddings for t in teachers]
    )
    if context > limit:
        raise ValueError(
            f"--max-prompt-length {args.max_prompt_length} + --rollout-max-new-tokens "
            f"{args.rollout_max_new_tokens} = {context} exceeds the models' context of {limit}"
        )
    tokenizer = load_tokenizer(args.tokenizer or student_dir)
    problems = resume.load_prompt_problems(args.prompt_data, args.seed)
    prompts = data.PromptSet.build(problems, tokenizer, args.max_prompt_length, args.system_prompt)
    if len(prompts) * args.rollout_samples_per_prompt < args.global_batch_size:
        raise ValueError(
            f"--prompt-data has {len(prompts)} usable prompts, fewer than one step needs "
            f"(--global-batch-size {args.global_batch_size})"
        )
    check_routing(prompts, teachers, args.prompt_data)
    check_teacher_tokenizers(teachers, tokenizer, prompts)
    resume.check_run_inputs(
        resume_root,
        student_dir,
        [t.directory for t in teachers],
        prompts,
        save=args.save,
        train_iters=args.train_iters,
        seed=args.seed,
        prompt_data=args.prompt_data,
    )
    return Inputs(
        student_dir,
        resume_root,
        teachers[0].directory,
        s_arch,
        s_meta,
        t_arch,
        t_meta,
        tokenizer,
        prompts,
        teachers,
    )


def check_teachers(
    args: argparse.Namespace, world_size: int, s_arch: gpt.ArchConfig, s_meta: dict
) -> list[TeacherInput]:
    """Every ``--opd-teacher-load`` with its layout, checked against the student's."""
    paths = arguments.teacher_loads(args)
    layouts = arguments.teacher_layouts(args)
    student_layout = (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, 1)
    out = []
    for k, (path, layout) in enumerate(zip(paths, layouts, strict=True)):
        name = "teacher" if len(paths) == 1 else f"teacher{k}"
        directory = checkpointing.resolve_checkpoint(path)
        if not (directory / checkpointing.META_FILE).exists():
            raise ValueError(
                f"--opd-teacher-load {directory} has no {checkpointing.META_FILE}: convert it "
                "with scripts/convert_hf_to_megatron.py"
            )
        arch, meta = convert.read_checkpoint(directory)
        if s_arch.vocab_size != arch.vocab_size:
            raise ValueError(
                f"--opd-teacher-load {path}: the {name}'s vocabulary ({arch.vocab_size} tokens) "
                f"differs from the student's ({s_arch.vocab_size}); OPD needs a shared tokenizer"
            )
        own = layout != student_layout
        tp, pp, ep = layout
        if own:
            teacher.check_layout(arch, tp, pp, world_size, name, ep=ep)
        else:
            try:
                gpt.validate_layout(arch, tp, pp)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        out.append(TeacherInput(name, directory, arch, meta, *layout, own))
    if arguments.reward_config(args).needs_teacher_logits:
        if len(out) > 1 or out[0].own_layout:
            raise ValueError(
                "--opd-reward full_vocab_kl needs one teacher on the student's layout: it reads "
                "the teacher's vocab-sharded logits [b, s, v/tp] in the student's TP sharding, "
                "which another layout would have to move (b x s x v floats); unset "
                f"{teacher.TP_FLAG} / {teacher.PP_FLAG} or pick a sampled-token reward"
            )
        padded = [
            gpt.padded_vocab_size(arch.vocab_size, convert.vocab_divisor(meta), student_layout[0])
            for arch, meta in ((out[0].arch, out[0].meta), (s_arch, s_meta))
        ]
        if padded[0] != padded[1]:
            raise ValueError(
                f"--opd-reward full_vocab_kl needs equal padded vocabularies (teacher "
                f"{padded[0]}, student {padded[1]}): convert both with the same "
                "--make-vocab-size-divisible-by"
            )
    if args.eval_interval and args.eval_gap and not args.eval_teacher:
        if len(out) > 1 or out[0].own_layout:
            raise ValueError(
                "--eval-gap reads a teacher's logits in the student's TP sharding, and this "
                "run's teachers are not one teacher on the student's layout: pass --eval-teacher "
                "CKPT (loaded on the student's layout for evaluation) or --no-eval-gap"
            )
    return out


def check_routing(prompts: data.PromptSet, teachers: list[TeacherInput], source: str) -> None:
    """With several teachers every prompt names one (``teacher`` field); indices in range."""
    n = len(teachers)
    for i, p in enumerate(prompts.problems):
        if p.teacher is None and n > 1:
            raise ValueError(
                f"--prompt-data {source}: prompt {i} has no 'teacher' field; with {n} "
                "--opd-teacher-load checkpoints every prompt names its teacher (0-based)"
            )
        if p.teacher is not None and p.teacher >= n:
            raise ValueError(
                f"--prompt-data {source}: prompt {i} routes to teacher {p.teacher}, but "
                f"--opd-teacher-load names {n}"
            )


def check_teacher_tokenizers(teachers: list[TeacherInput], tokenizer, prompts) -> None:
    """A teacher that ships a tokenizer must tokenize like the student's (ids, stop tokens)."""
    probe = "\n".join(p.problem for p in prompts.problems[:4]) + " 0123 ?!"
    want = (tokenizer.vocab_size, sorted(tokenizer.stop_token_ids), tokenizer.encode(probe))
    for t in teachers:
        if not (t.directory / CHECKPOINT_TOKENIZER_DIR).is_dir():
            continue
        other = load_tokenizer(t.directory)
        got = (other.vocab_size, sorted(other.stop_token_ids), other.encode(probe))
        if got != want:
            raise ValueError(
                f"--opd-teacher-load {t.directory}: the {t.name}'s tokenizer differs from the "
                "student's; every teacher must share the student's tokenizer"
            )


def rollout_layout(
    args: argparse.Namespace, arch: gpt.ArchConfig, world_size: int
) -> Optional[tuple[int, int]]:
    """The rollout copy's (TP, PP) the ``--rollout-*`` flags ask for (``None``: no copy), checked
    against ``arch`` (:func:`megatron_opd.rollout.refit.check_layout`)."""
    return refit.check_layout(
        arch,
        world_size,
        training=(args.tensor_model_parallel_size, args.pipeline_model_parallel_size),
        rollout=(
            args.rollout_tensor_model_parallel_size,
            args.rollout_pipeline_model_parallel_size,
        ),
        rollout_ranks=args.rollout_ranks,
        engine=args.rollout_engine,
    )


def virtual_stages(args: argparse.Namespace, arch: gpt.ArchConfig) -> Optional[int]:
    if args.num_layers_per_virtual_pipeline_stage is None:
        return None
    raise ValueError(
        "--num-layers-per-virtual-pipeline-stage: rollouts run through Megatron's static "
        "inference engine, which takes one model chunk per rank; unset it"
    )


def initialize(args: argparse.Namespace):
    """torch.distributed from the launcher's environment, Megatron's (student) groups, seeds;
    this rank's :class:`megatron_opd.runtime.pools.Pool` (with ``--rollout-ranks``, the training
    pool's groups or the rollout pool's)."""
    return distributed.initialize(
        distributed.ParallelConfig(
            args.tensor_model_parallel_size, args.pipeline_model_parallel_size
        ),
        seed=args.seed,
        timeout_minutes=args.distributed_timeout_minutes,
        rollout_ranks=args.rollout_ranks,
        rollout_parallel=distributed.ParallelConfig(
            args.rollout_tensor_model_parallel_size or 1,
            args.rollout_pipeline_model_parallel_size or 1,
        ),
    )


# Megatron's OptimizerConfig fields that the flags of the same name set
OPTIMIZER_FLAGS = ("lr", "min_lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps",
                   "clip_grad", "bf16", "use_distributed_optimizer")  # fmt: skip


def build_student(args: argparse.Namespace, inputs: Inputs, grid: distributed.ModelGrid):
    """The student's chunks on ``grid`` wrapped in Megatron DDP, its optimizer and LR
    scheduler."""
    # imported here, not at the top: Megatron's optimizer takes seconds to import, and a user
    # error must end the run before any such work (check_inputs imports none of it)
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    recompute = {}
    if args.recompute_granularity == "full":
        recompute = dict(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
        )
    elif args.recompute_granularity == "selective":
        recompute = dict(recompute_granularity="selective")
    config = gpt.transformer_config(
        inputs.student_arch,
        args.tensor_model_parallel_size,
        args.pipeline_model_parallel_size,
        dtype=dtype,
        calculate_per_token_loss=True,
        perform_initialization=False,
        **recompute,
    )
    divisor = convert.vocab_divisor(inputs.student_meta)
    chunks = gpt.build_model(inputs.student_arch, config, grid, divisor)
    if inputs.resume_root is None:
        checkpointing.load_model(chunks, inputs.student_dir, strict=False)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    chunks = [DistributedDataParallel(config, ddp_config, c) for c in chunks]
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            params_dtype=dtype,
            **cli.flags(args, *OPTIMIZER_FLAGS),
        ),
        chunks,
    )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=int(args.lr_warmup_fraction * args.train_iters),
        lr_decay_steps=args.train_iters,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters,
        wd_incr_style="constant",
    )
    return chunks, optimizer, scheduler


def build_teacher(args: argparse.Namespace, inputs: Inputs, grid: distributed.ModelGrid):
    """Every teacher frozen, in eval mode, no optimizer state; bf16 with ``--opd-teacher-bf16``:
    a :class:`megatron_opd.training.teacher.TeacherSet`. One teacher on the student's layout sits
    on the student's ``grid``; otherwise each teacher on its own groups."""
    dtype = torch.bfloat16 if args.opd_teacher_bf16 else None
    if inputs.own_teacher_layout:
        return teacher.build_teachers(
            [t.directory for t in inputs.teachers],
            [
                (t.tensor_parallel_size, t.pipeline_parallel_size, t.expert_parallel_size)
                for t in inputs.teachers
            ],
            grid,
            dtype,
            args.distributed_timeout_minutes,
        )
    chunks, _ = convert.load_checkpoint_model(inputs.teacher_dir, grid, dtype=dtype)
    for c in chunks:
        c.eval()
        c.requires_grad_(False)
    return teacher.on_student_grid(chunks, grid)


def serve_config(args: argparse.Namespace, inputs: Inputs) -> remote.ServeConfig:
    """What a rollout rank (``--rollout-ranks``) needs of the flags and the checkpoint."""
    return remote.ServeConfig(
        arch=inputs.student_arch,
        vocab_divisor=convert.vocab_divisor(inputs.student_meta),
        dtype=torch.bfloat16 if args.bf16 else torch.float32,
        rollout=arguments.rollout_config(args),
        seed=args.seed,
        global_batch_size=args.global_batch_size,
        samples_per_prompt=args.rollout_samples_per_prompt,
        train_iters=args.train_iters,
        lag=args.rollout_lag,
        ignore_signal=args.exit_signal if args.exit_signal_handler else None,
    )


def build_trainer(args: argparse.Namespace, inputs: Optional[Inputs] = None, pool=None):
    """A ready Trainer: the student (loaded or resumed), its optimizer and scheduler, the teacher,
    and where its rollouts come from (``megatron_opd.rollout.sources``).

    ``inputs`` defaults to :func:`check_inputs` at the launcher's world size. ``pool``: this
    rank's pool from :func:`initialize` (its ``grid`` is the student's); without one,
    torch.distributed and Megatron's groups are initialized here first."""
    if inputs is None:
        inputs = check_inputs(args, distributed.env_rank_and_world()[2])
    if pool is None:
        pool = initialize(args)
    grid = pool.grid
    student, optimizer, scheduler = build_student(args, inputs, grid)
    teachers = build_teacher(args, inputs, grid)
    source = None
    if args.rollout_ranks:
        if pool.is_rollout:
            raise ValueError("--rollout-ranks: build_trainer needs the training pool's Pool")
        source = remote.Remote(student, grid, pool, args.rollout_lag, args.train_iters)
    else:
        layout = rollout_layout(args, inputs.student_arch, distributed.env_rank_and_world()[2])
        if layout is not None:
            divisor = convert.vocab_divisor(inputs.student_meta)
            copy = refit.RolloutModel(
                student, grid, inputs.student_arch, divisor, *layout,
                args.distributed_timeout_minutes,
            )  # fmt: skip
            source = sources.Copy(student, copy)
    config = arguments.trainer_config(args)
    return Trainer(config, inputs, grid, student, optimizer, scheduler, teachers, source)
