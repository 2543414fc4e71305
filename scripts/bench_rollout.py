"""The rollout phase alone: Megatron-Core's static engine against the graph engine, in one process.

    python scripts/bench_rollout.py [--layers 4] [--batch 8] [--new-tokens 128] [--rounds 9]
        [--engines static graph] [--out FILE.json]

Model: the student shape of the demo and ``bench_e2e.py`` (SmolLM2-135M's layers, 576 wide, 9
heads in 3 groups, 49,152-token tied vocabulary; its first ``--layers`` layers), random weights,
fp32, TP1. Prompts: ``--batch`` random prompts of 60 to 130 tokens (mixed lengths: left padding
is exercised), sampled at temperature 1 with no stop token, so every engine decodes exactly
``--new-tokens`` steps for every row.

Each round runs every engine once, in an order rotated by one per round, with that round's seed;
after one untimed warm-up call per engine (the graph engine's bucket is built then, as it would
be at a run's first step). The table gives each engine's rollout seconds (median and [min, max]
over rounds), tokens/s, the ratio to the first engine within each round (median with a
distribution-free 95% interval, ``bench_e2e.median_interval``; "faster" / "slower" only when the
interval excludes 1), and the rollout over the bound.

bound: one batched forward of the student over ``batch x (longest prompt + new tokens)``
tokens (what the rollout's matmuls cost if every token were known up front; median of 3).

On CPU the graph engine runs its step eagerly (no CUDA graph exists there), so this measures the
engine's own arithmetic (whole-cache attention at fixed shapes, sampling in the step) against
Megatron's eager path; the GPU figures come from ``scripts/gpu_check.sh`` (section d).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_opd.models import gpt  # noqa: E402
from megatron_opd.rollout import engines, generation  # noqa: E402
from megatron_opd.runtime import distributed  # noqa: E402


def _bench_e2e():
    """scripts/bench_e2e.py's interval helpers (a script, so loaded by path)."""
    spec = importlib.util.spec_from_file_location("bench_e2e", ROOT / "scripts" / "bench_e2e.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def student_arch(layers: int) -> gpt.ArchConfig:
    return gpt.ArchConfig(
        model_type="llama",
        vocab_size=49_152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        rms_norm_eps=1e-5,
        rope_theta=100_000.0,
        tie_word_embeddings=True,
    )


class _Tokenizer:
    pad_id = 0
    stop_token_ids: list[int] = []


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--engines", nargs="+", default=["static", "graph"], choices=engines.ENGINES)
    p.add_argument("--out", type=Path, default=None, help="write the rounds and table as JSON")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    stats = _bench_e2e()
    grid = distributed.initialize().grid
    torch.manual_seed(0)
    arch = student_arch(args.layers)
    chunks = gpt.build_model(arch, gpt.transformer_config(arch), grid)
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(60, 131, (args.batch,), generator=gen).tolist()
    prompts = [torch.randint(1, arch.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    tokenizer = _Tokenizer()

    def rollout(engine: str, seed: int) -> float:
        t0 = time.perf_counter()
        out = generation.generate(
            chunks, tokenizer, prompts, args.new_tokens, seed=seed, return_logprobs=False,
            stop_token_ids=[], engine=engine,
        )  # fmt: skip
        elapsed = time.perf_counter() - t0
        assert all(len(g.tokens) == args.new_tokens for g in out)
        return elapsed

    for engine in args.engines:
        rollout(engine, seed=10_000)  # warm-up
    rounds: list[dict[str, float]] = []
    for r in range(args.rounds):
        order = args.engines[r % len(args.engines) :] + args.engines[: r % len(args.engines)]
        times = {engine: rollout(engine, seed=r) for engine in order}
        rounds.append(times)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{e} {t:.3f} s" for e, t in
                                                          times.items()), flush=True)  # fmt: skip

    seq = max(lengths) + args.new_tokens
    tokens = torch.randint(1, arch.vocab_size, (args.batch, seq), generator=gen)
    chunks[0].eval()
    forward = []
    with torch.no_grad():
        for _ in range(3):
            t0 = time.perf_counter()
            chunks[0](tokens, gpt.position_ids(args.batch, seq), gpt.causal_mask(seq))
            forward.append(time.perf_counter() - t0)
    bound = statistics.median(forward)

    base = args.engines[0]
    table = []
    for engine in args.engines:
        times = [r[engine] for r in rounds]
        ratios = [r[engine] / r[base] for r in rounds]
        median = statistics.median(times)
        table.append(
            dict(
                engine=engine,
                rollout_s=stats.spread(times),
                tokens_per_s=args.batch * args.new_tokens / median,
                ratio=stats.ratio_cell(ratios) if engine != base else "1",
                verdict=stats.verdict(ratios) if engine != base else "baseline",
                over_bound=median / bound,
            )
        )
    held = sum(
        t.numel() * t.element_size()
        for bucket in engines.engine_for(chunks, "graph").buckets.values()
        for t in [*bucket.keys, *bucket.values]
    ) if "graph" in args.engines else 0  # fmt: skip
    print(
        f"\nrollout: {args.batch} prompts of {min(lengths)}-{max(lengths)} tokens x "
        f"{args.new_tokens} new tokens, student {args.layers} layers of SmolLM2-135M's shape, "
        f"fp32, TP1; {args.rounds} rounds; torch {torch.__version__}, {os.cpu_count()} CPUs"
    )
    print(f"| engine | rollout s, median [min, max] | tokens/s | / {base} [95% CI] | verdict | "
          "rollout / bound |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for row in table:
        print(f"| {row['engine']} | {row['rollout_s']} | {row['tokens_per_s']:.1f} | "
              f"{row['ratio']} | {row['verdict']} | {row['over_bound']:.2f}x |")  # fmt: skip
    print(f"\nbound: one batched forward over {args.batch} x {seq} tokens: {bound:.3f} s")
    if held:
        print(f"graph engine's KV cache, held between rollouts: {held / 2**20:.1f} MiB")
    if args.out:
        args.out.write_text(json.dumps(dict(rounds=rounds, table=table, bound_s=bound), indent=1))


if __name__ == "__main__":
    main()
