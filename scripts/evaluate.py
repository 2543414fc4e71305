"""Avg@k / Pass@k of a model on math benchmarks, sampled through Megatron-Core's inference engine.

    torchrun --nproc-per-node 2 scripts/evaluate.py --load CKPT --tensor-model-parallel-size 2 \\
        --data ../shared/data/eval/aime24.jsonl ../shared/data/eval/math500.jsonl \\
        --samples 8 --temperature 0.6 --max-new-tokens 4096 --output runs/eval

``--load`` is a Megatron checkpoint written by this project (converted, or a training run's
``iter_*`` directory, or its root with ``latest_checkpointed_iteration.txt``), loaded at any TP/PP
layout. ``--hf-dir`` takes a Hugging Face directory instead (converted once, on rank 0, into
``<output>/megatron``). Writes ``results.json``, ``results.md`` and ``completions.jsonl``.

``--teacher CKPT`` adds the distillation gap (``megatron_opd.evaluation.gap``) on the same held-out
prompts: for the student's own samples at temperature 1 (the Avg@k samples when ``--temperature 1``,
otherwise ``--samples`` fresh ones per problem), the exact per-token KL(pi_S || pi_T) over the full
vocabulary, the exact total variation and the power divergence at each ``--gap-alpha`` (the Bregman
divergence PowerOPD descends), the teacher's NLL per token, the mean sampled log-ratio, the
student's entropy and the response length; in ``results.json`` (``"gap"``), ``results.md`` and
``gap.jsonl`` (per sample, with its token ids). The teacher loads at the same TP/PP layout and must
share the vocabulary.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from megatron_opd.runtime import cli  # noqa: E402

cli.quiet()


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="evaluate.py", description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--load", type=str, help="Megatron checkpoint directory")
    src.add_argument("--hf-dir", type=str, help="Hugging Face model directory")
    p.add_argument("--data", nargs="+", required=True, help="benchmark files or builtin[:N]")
    p.add_argument("--output", type=str, required=True)
    p.add_argument("--samples", type=int, default=8, help="k samples per problem")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--max-new-tokens", type=int, default=4096)
    p.add_argument("--limit", type=int, default=None, help="problems per benchmark")
    p.add_argument("--max-prompt-length", type=int, default=2048)
    p.add_argument("--system-prompt", type=str, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--teacher", type=str, default=None, help="teacher checkpoint: report the gap")
    p.add_argument("--metrics-file", type=str, default=None, help="append the numbers (jsonl)")
    p.add_argument("--tensorboard-dir", type=str, default=None)
    p.add_argument("--wandb-project", type=str, default=None)
    p.add_argument("--wandb-exp-name", type=str, default=None)
    p.add_argument(
        "--micro-batch-size", type=int, default=4, help="rows per forward pass of the gap"
    )
    p.add_argument(
        "--gap-alpha",
        type=float,
        nargs="+",
        default=[5.0],
        help="with --teacher: report the power divergence at each of these alphas (> 0)",
    )
    args = p.parse_args(argv)
    for a in args.gap_alpha:
        if not 0 < a < float("inf"):
            p.error(f"--gap-alpha must be > 0 and finite, got {a:g}")
    cli.check_numbers(
        p,
        args,
        {
            "--top-p": cli.Range(0, 1),
            "--max-prompt-length": cli.at_least(1),
            "--batch-size": cli.at_least(1),
            "--seed": cli.Range(0, 2**32 - 1),
            "--tensor-model-parallel-size": cli.at_least(1),
            "--pipeline-model-parallel-size": cli.at_least(1),
            "--micro-batch-size": cli.at_least(1),
        },
    )
    return args


def check_teacher(args, student_ckpt: Optional[Path]) -> None:
    """One ValueError naming --teacher before any model is built."""
    from megatron_opd.models import convert
    from megatron_opd.runtime import checkpointing

    if args.micro_batch_size < 1:
        raise ValueError(f"--micro-batch-size must be >= 1, got {args.micro_batch_size}")
    if not Path(args.teacher).exists():
        raise ValueError(f"--teacher {args.teacher} does not exist")
    t_arch, _ = convert.read_checkpoint(checkpointing.resolve_checkpoint(args.teacher))
    if student_ckpt is None:  # --hf-dir: converted later, checked by the vocab-parallel ops
        return
    s_arch, _ = convert.read_checkpoint(student_ckpt)
    if t_arch.vocab_size != s_arch.vocab_size:
        raise ValueError(
            f"--teacher: its vocabulary ({t_arch.vocab_size} tokens) differs from the student's "
            f"({s_arch.vocab_size})"
        )


def main(argv=None) -> None:
    args = parse_args(argv)
    from megatron_opd.evaluation import accuracy
    from megatron_opd.runtime import checkpointing, distributed, integrity, outputs

    outputs.check_output_dir("--output", args.output)
    outputs.check_output_file("--metrics-file", args.metrics_file)
    outputs.check_output_dir("--tensorboard-dir", args.tensorboard_dir)
    from megatron_opd.evaluation.accuracy import EvalConfig

    cfg = EvalConfig(
        **cli.flags(args, "samples", "temperature", "top_p", "max_new_tokens", "limit",
                    "max_prompt_length", "system_prompt", "batch_size", "seed"),
    )  # fmt: skip
    cfg.validate()
    benchmarks = accuracy.load_benchmarks(args.data, args.limit)  # bad files fail before models
    if args.load:  # a missing or damaged checkpoint fails before the process group starts
        rank, _, world = distributed.env_rank_and_world()
        integrity.verify(checkpointing.resolve_checkpoint(args.load), "--load", rank, world)
    if args.teacher:
        try:
            student = checkpointing.resolve_checkpoint(args.load) if args.load else None
            check_teacher(args, student)
        except (ValueError, OSError) as e:
            cli.exit_with(e, "evaluate.py")

    grid = distributed.initialize(
        distributed.ParallelConfig(
            args.tensor_model_parallel_size, args.pipeline_model_parallel_size
        ),
        seed=args.seed,
    ).grid
    try:
        from megatron_opd.models import convert
        from megatron_opd.models.tokenizer import load_tokenizer

        if args.hf_dir:
            ckpt = Path(args.output) / "megatron"
            if distributed.is_rank0() and not (ckpt / "metadata.json").exists():
                script = Path(__file__).with_name("convert_hf_to_megatron.py")
                cmd = [sys.executable, str(script), "--hf-dir", args.hf_dir, "--save", str(ckpt)]
                env = distributed.standalone_env()
                subprocess.run(cmd + ["--dtype", "fp32"], check=True, env=env)
            import torch.distributed as dist

            dist.barrier()
        else:
            ckpt = checkpointing.resolve_checkpoint(args.load)
        chunks, _ = convert.load_checkpoint_model(ckpt, grid)
        for c in chunks:
            c.eval()
        tokenizer = load_tokenizer(ckpt)
        scores, records = accuracy.evaluate(
            chunks, tokenizer, benchmarks, cfg, grid, progress=not args.no_progress,
            keep_token_ids=True,
        )  # fmt: skip
        extra = {"checkpoint": str(ckpt)}
        gap_records = None
        if args.teacher:
            from megatron_opd.evaluation import gap

            teacher_ckpt = checkpointing.resolve_checkpoint(args.teacher)
            teacher, _ = convert.load_checkpoint_model(teacher_ckpt, grid)
            reusable = gap.samples_are_reusable(cfg.temperature, cfg.top_p)
            summaries, gap_records = gap.evaluate_gap(
                chunks,
                teacher,
                tokenizer,
                benchmarks,
                cfg,
                convert.read_checkpoint(ckpt)[0].vocab_size,
                grid,
                records=records if reusable else None,
                micro_batch_size=args.micro_batch_size,
                power_alphas=tuple(args.gap_alpha),
            )
            extra.update(teacher=str(teacher_ckpt), gap=summaries)
        for r in records:
            r.pop("response_ids")
        numbers = accuracy.metrics(scores, cfg.samples)
        if gap_records is not None:
            numbers.update(gap.metrics(extra["gap"]))
        _log(args, checkpointing.read_meta(ckpt).get("iteration", 0), numbers)
        if distributed.is_rank0():
            accuracy.write_outputs(args.output, scores, records, cfg.samples, extra)
            print(accuracy.markdown_table(scores, cfg.samples), flush=True)
            if gap_records is not None:
                text = gap.markdown_table(extra["gap"])
                out = Path(args.output)
                accuracy.write_text_atomic(out / "gap.jsonl", _jsonl(gap_records))
                md = out / "results.md"
                accuracy.write_text_atomic(md, md.read_text() + "\n" + text)
                print(text, flush=True)
    finally:
        distributed.teardown()


def _log(args, step: int, numbers: dict) -> None:
    """Tensorboard, wandb and the metrics file, at the checkpoint's training iteration."""
    if not (args.metrics_file or args.tensorboard_dir or args.wandb_project):
        return
    from megatron_opd.runtime.metrics_logger import MetricsLogger

    logger = MetricsLogger(
        config=vars(args),
        **cli.flags(args, "tensorboard_dir", "wandb_project", "wandb_exp_name", "metrics_file"),
    )
    logger.log(step, numbers, console=False)
    logger.close()


def _jsonl(rows) -> str:
    import json

    return "".join(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    cli.run(main, "evaluate.py")
