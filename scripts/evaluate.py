"""Avg@k / Pass@k of a model on math benchmarks, sampled through Megatron-Core's inference engine.

    torchrun --nproc-per-node 2 scripts/evaluate.py --load CKPT --tensor-model-parallel-size 2 \\
        --data ../shared/data/eval/aime24.jsonl ../shared/data/eval/math500.jsonl \\
        --samples 8 --temperature 0.6 --max-new-tokens 4096 --output runs/eval

``--load`` is a Megatron checkpoint written by this project (converted, or a training run's
``iter_*`` directory, or its root with ``latest_checkpointed_iteration.txt``), loaded at any TP/PP
layout. ``--hf-dir`` takes a Hugging Face directory instead (converted once, on rank 0, into
``<output>/megatron``). Writes ``results.json``, ``results.md`` and ``completions.jsonl``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from megatron_opd import cli  # noqa: E402

cli.quiet()


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n")[0])
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
    args = p.parse_args(argv)
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
        },
    )
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    from megatron_opd import checkpointing, distributed, evaluation, integrity
    from megatron_opd.evaluation import EvalConfig

    cfg = EvalConfig(
        samples=args.samples,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        limit=args.limit,
        max_prompt_length=args.max_prompt_length,
        system_prompt=args.system_prompt,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    cfg.validate()
    benchmarks = evaluation.load_benchmarks(args.data, args.limit)  # bad files fail before models
    if args.load:  # a missing or damaged checkpoint fails before the process group starts
        rank, _, world = distributed.env_rank_and_world()
        integrity.verify(checkpointing.resolve_checkpoint(args.load), "--load", rank, world)

    distributed.initialize(
        distributed.ParallelConfig(
            args.tensor_model_parallel_size, args.pipeline_model_parallel_size
        ),
        seed=args.seed,
    )
    try:
        from megatron_opd import convert
        from megatron_opd.tokenizer import load_tokenizer

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
        chunks, _ = convert.load_checkpoint_model(ckpt)
        for c in chunks:
            c.eval()
        tokenizer = load_tokenizer(ckpt)
        scores, records = evaluation.evaluate(
            chunks, tokenizer, benchmarks, cfg, progress=not args.no_progress
        )
        if distributed.is_rank0():
            evaluation.write_outputs(
                args.output, scores, records, cfg.samples, {"checkpoint": str(ckpt)}
            )
            print(evaluation.markdown_table(scores, cfg.samples), flush=True)
    finally:
        distributed.teardown()


if __name__ == "__main__":
    cli.run(main, "evaluate.py")
