"""On-policy distillation with PowerOPD rewards on Megatron-Core.

    torchrun --nproc-per-node 8 scripts/pretrain_opd.py \\
        --load ckpt/qwen3-0.6b-base --opd-teacher-load ckpt/qwen3-4b \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \\
        --opd-alpha 0.5 --prompt-data data/deepscaler_math.json --save runs/opd

Each step: the student samples one response per prompt with its own weights (no copy, no sync);
the frozen teacher scores the sampled tokens in a forward-only pipeline pass; the reward
r = pi_T^alpha - pi_S^alpha (or a baseline, ``--opd-reward``) is held constant and the loss
-sum(r * log pi_S) / N over the step's response tokens is minimized with one optimizer step.
Student and teacher are Megatron GPTModels on the same TP x PP grid; each is read from its own
checkpoint directory (written by ``scripts/convert_hf_to_megatron.py`` or by this script).

Resuming: ``--save`` holding a checkpoint resumes from it (requeued jobs pass the same flags);
otherwise ``--load`` is a converted checkpoint (weights only) or a run to continue (add
``--finetune`` to take only its weights).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from megatron_opd import cli  # noqa: E402

cli.quiet()
from megatron_opd import arguments, checkpointing, data, distributed, models, resume  # noqa: E402
from megatron_opd.tokenizer import load_tokenizer  # noqa: E402


@dataclass
class Inputs:
    """What the run reads, resolved and checked before any model is built."""

    student_dir: Path  # weights + metadata the student starts from
    resume_root: Optional[Path]  # a training run to restore optimizer/iteration/data from
    teacher_dir: Path
    student_arch: models.ArchConfig
    student_meta: dict
    teacher_arch: models.ArchConfig
    teacher_meta: dict
    tokenizer: Any
    prompts: data.PromptSet


def check_inputs(args, world_size: int) -> Inputs:
    from megatron_opd import convert

    arguments.validate_args(args, world_size)
    resume.prepare_save_dir(args)
    resume_root = None
    for root in (args.save, None if args.finetune else args.load):
        if root and checkpointing.latest_iteration(root) is not None:
            resume_root = Path(root)
            break
    student_dir = checkpointing.resolve_checkpoint(resume_root or args.load)
    teacher_dir = checkpointing.resolve_checkpoint(args.opd_teacher_load)
    for flag, path in (("--load", student_dir), ("--opd-teacher-load", teacher_dir)):
        if not (path / checkpointing.META_FILE).exists():
            raise ValueError(
                f"{flag} {path} has no {checkpointing.META_FILE}: convert it with "
                "scripts/convert_hf_to_megatron.py"
            )
    s_arch, s_meta = convert.read_checkpoint(student_dir)
    t_arch, t_meta = convert.read_checkpoint(teacher_dir)
    if s_arch.vocab_size != t_arch.vocab_size:
        raise ValueError(
            f"--opd-teacher-load: the teacher's vocabulary ({t_arch.vocab_size} tokens) differs "
            f"from the student's ({s_arch.vocab_size}); OPD needs a shared tokenizer"
        )
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    vpp = virtual_stages(args, s_arch)
    models.validate_layout(s_arch, tp, pp, vpp)
    try:
        models.validate_layout(t_arch, tp, pp)
    except ValueError as e:
        raise ValueError(f"teacher: {e}") from None
    context = args.max_prompt_length + args.rollout_max_new_tokens
    limit = min(s_arch.max_position_embeddings, t_arch.max_position_embeddings)
    if context > limit:
        raise ValueError(
            f"--max-prompt-length {args.max_prompt_length} + --rollout-max-new-tokens "
            f"{args.rollout_max_new_tokens} = {context} exceeds the models' context of {limit}"
        )
    tokenizer = load_tokenizer(args.tokenizer or student_dir)
    problems = resume.load_prompt_problems(args)
    prompts = data.PromptSet.build(problems, tokenizer, args.max_prompt_length, args.system_prompt)
    if len(prompts) * args.rollout_samples_per_prompt < args.global_batch_size:
        raise ValueError(
            f"--prompt-data has {len(prompts)} usable prompts, fewer than one step needs "
            f"(--global-batch-size {args.global_batch_size})"
        )
    resume.check_run_inputs(args, resume_root, student_dir, teacher_dir, prompts)
    return Inputs(
        student_dir, resume_root, teacher_dir, s_arch, s_meta, t_arch, t_meta, tokenizer, prompts
    )


def virtual_stages(args, arch: models.ArchConfig) -> Optional[int]:
    if args.num_layers_per_virtual_pipeline_stage is None:
        return None
    raise ValueError(
        "--num-layers-per-virtual-pipeline-stage: rollouts run through Megatron's static "
        "inference engine, which takes one model chunk per rank; unset it"
    )


def build_student(args, inputs: Inputs):
    """The student's chunks wrapped in Megatron DDP, its optimizer and LR scheduler."""
    import torch
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
    config = models.transformer_config(
        inputs.student_arch,
        args.tensor_model_parallel_size,
        args.pipeline_model_parallel_size,
        dtype=dtype,
        calculate_per_token_loss=True,
        perform_initialization=False,
        **recompute,
    )
    divisor = inputs.student_meta.get("make_vocab_size_divisible_by", 128)
    chunks = models.build_model(inputs.student_arch, config, divisor)
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
            lr=args.lr,
            min_lr=args.min_lr,
            weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1,
            adam_beta2=args.adam_beta2,
            adam_eps=args.adam_eps,
            clip_grad=args.clip_grad,
            bf16=args.bf16,
            params_dtype=dtype,
            use_distributed_optimizer=args.use_distributed_optimizer,
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


def build_teacher(args, inputs: Inputs):
    """Frozen, eval mode, no optimizer state; bf16 with ``--opd-teacher-bf16``."""
    import torch

    from megatron_opd import convert

    dtype = torch.bfloat16 if args.opd_teacher_bf16 else None
    chunks, _ = convert.load_checkpoint_model(inputs.teacher_dir, dtype=dtype)
    for c in chunks:
        c.eval()
        c.requires_grad_(False)
    padded_t = models.padded_vocab_size(
        inputs.teacher_arch.vocab_size,
        inputs.teacher_meta.get("make_vocab_size_divisible_by", 128),
        args.tensor_model_parallel_size,
    )
    padded_s = models.padded_vocab_size(
        inputs.student_arch.vocab_size,
        inputs.student_meta.get("make_vocab_size_divisible_by", 128),
        args.tensor_model_parallel_size,
    )
    if args.opd_reward == "full_vocab_kl" and padded_t != padded_s:
        raise ValueError(
            f"--opd-reward full_vocab_kl needs equal padded vocabularies (teacher {padded_t}, "
            f"student {padded_s}): convert both with the same --make-vocab-size-divisible-by"
        )
    return chunks


def main(argv=None) -> None:
    args = arguments.parse_args(argv)
    _, _, world = distributed.env_rank_and_world()
    try:
        inputs = check_inputs(args, world)
    except (ValueError, FileNotFoundError) as e:
        cli.exit_with(e, "pretrain_opd.py")

    distributed.initialize(
        distributed.ParallelConfig(
            args.tensor_model_parallel_size, args.pipeline_model_parallel_size
        ),
        seed=args.seed,
        timeout_minutes=args.distributed_timeout_minutes,
    )
    try:
        from megatron_opd.trainer import Trainer

        student, optimizer, scheduler = build_student(args, inputs)
        teacher = build_teacher(args, inputs)
        Trainer(args, inputs, student, optimizer, scheduler, teacher).run()
    finally:
        if not cli.failed_alone():  # a rank failing alone must not wait in a barrier for the rest
            distributed.teardown()


if __name__ == "__main__":
    cli.run(main, "pretrain_opd.py")
