"""The GPU check's MoE section: a mixture-of-experts teacher shaped like Qwen3-30B-A3B, a few of
its layers on one GPU, scoring sampled tokens as the trainer does.

    python scripts/gpu_check_moe.py --out-dir DIR     # PYTHONPATH=. and megatron-core, as for
                                                      # scripts/gpu_check.py (gpu_check.sh
                                                      # installs the carried wheels first)
    GPU_CHECK_SMALL=1 python scripts/gpu_check_moe.py # toy shapes; the default without CUDA

Qwen3-30B-A3B's shape: hidden 2048, 32 query heads / 4 query groups of 128, 128 experts of ffn
768 with 8 per token (renormalised, ``norm_topk_prob``), vocabulary 151,936, untied embeddings;
48 layers, of which ``--layers`` (default 2 and 4) are built, bf16, random weights (N(0, 0.02),
norms 1; the router's rows N(0, 0.5) so tokens spread over the experts as in a trained model rather
than all picking the same few). Megatron-Core's ``MoELayer`` as ``gpt.layer_spec`` picks it
(transformer-engine's linears when TE imports; the ``allgather`` dispatcher, ``SequentialMLP``).

Measured, for each depth: the teacher pass of the trainer (``opd.forward_only``: forward and the
sampled-token log-probs, nothing else kept) on ``--rows`` sequences of ``--tokens`` tokens in
micro-batches of ``--micro-batch``, median of 3 after one warm-up: seconds per token and peak GPU
memory (``torch.cuda.max_memory_allocated``, weights included); the experts' load (tokens each
expert got in the first sparse layer: the busiest over the mean); and the log-probs finite. From
the two depths: the time and the weight bytes per layer, and the 48-layer teacher's time per
token extrapolated (fixed part + 48 x per layer), with its bf16 weights (61 GB: does not fit
one GPU at EP1, which is what ``--opd-teacher-expert-model-parallel-size`` is for).

Writes ``gpu_check_moe.json`` and ``gpu_check_moe.txt`` to ``--out-dir`` ($OUT, else $OUT_DIR,
else a new temporary directory). Exit status 1 if a check failed. About a minute on an H100.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_opd import compat  # noqa: E402
from megatron_opd.models import gpt  # noqa: E402
from megatron_opd.runtime import distributed  # noqa: E402
from megatron_opd.training.opd import MicroBatch, forward_only  # noqa: E402

GIB = 2**30
FULL_LAYERS = 48  # Qwen3-30B-A3B


def qwen3_moe(layers: int, small: bool) -> gpt.ArchConfig:
    if small:
        shape = dict(
            vocab_size=2048, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        )  # fmt: skip
    else:
        shape = dict(
            vocab_size=151_936, hidden_size=2048, num_attention_heads=32, num_key_value_heads=4,
            head_dim=128, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
        )  # fmt: skip
    return gpt.ArchConfig(
        model_type="qwen3_moe",
        intermediate_size=6144,
        num_hidden_layers=layers,
        norm_topk_prob=True,
        rope_theta=1_000_000.0,
        max_position_embeddings=40_960,
        tie_word_embeddings=False,
        **shape,
    )


def random_teacher(arch: gpt.ArchConfig, dtype: torch.dtype, grid) -> torch.nn.Module:
    config = gpt.transformer_config(arch, dtype=dtype, perform_initialization=False)
    (model,) = gpt.build_model(arch, config, grid)
    g = torch.Generator(device=compat.default_device()).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                std = 0.5 if name.endswith("router.weight") else 0.02
                p.normal_(0.0, std, generator=g)
    model.eval()
    model.requires_grad_(False)
    return model


def measure(arch, args, device, dtype, grid) -> dict:
    """One depth: weights, the teacher pass's time per token and peak memory, expert load."""
    compat.reset_peak_memory()
    model = random_teacher(arch, dtype, grid)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, arch.vocab_size, (args.rows, args.tokens + 1), generator=g)
    tokens = tokens.to(device)
    items = [
        MicroBatch(tokens[i : i + args.micro_batch, :-1], tokens[i : i + args.micro_batch, 1:],
                   torch.ones(0), first=0)
        for i in range(0, args.rows, args.micro_batch)
    ]  # fmt: skip
    loads = []
    sparse = next(layer.mlp for layer in model.decoder.layers if hasattr(layer.mlp, "router"))
    hook = sparse.router.register_forward_hook(
        lambda m, inputs, out: loads.append(out[1].sum(0).float().cpu())  # routing map [t, E]
    )
    times, out = [], None
    for i in range(4):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = forward_only([model], items, arch.vocab_size, grid)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
        if i == 0:
            hook.remove()
    logprobs = torch.cat([o.float() for o in out])
    load = torch.stack(loads).sum(0)
    result = dict(
        layers=arch.num_hidden_layers,
        weight_gib=weight_bytes / GIB,
        s_per_token=statistics.median(times) / (args.rows * args.tokens),
        peak_gib=compat.peak_memory_bytes() / GIB,
        busiest_expert_over_mean=float(load.max() / load.mean()),
        experts_used=int((load > 0).sum()),
        finite=bool(torch.isfinite(logprobs).all()),
        mean_logprob=float(logprobs.mean()),
    )
    del model, out, items
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", type=Path, default=None)
    p.add_argument("--layers", type=int, nargs=2, default=(2, 4), help="the two depths built")
    p.add_argument("--rows", type=int, default=None, help="sequences scored (default 8; 4 small)")
    p.add_argument("--tokens", type=int, default=None, help="tokens each (default 1280; 64 small)")
    p.add_argument("--micro-batch", type=int, default=None, help="default 4; 2 small")
    p.add_argument("--small", action="store_true", help="toy shapes (the default without CUDA)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    small = args.small or os.environ.get("GPU_CHECK_SMALL") == "1" or not cuda
    args.rows = args.rows or (4 if small else 8)
    args.tokens = args.tokens or (64 if small else 1280)
    args.micro_batch = args.micro_batch or (2 if small else 4)
    out_dir = args.out_dir or Path(
        os.environ.get("OUT") or os.environ.get("OUT_DIR") or tempfile.mkdtemp(prefix="moe_")
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16 if cuda else torch.float32
    grid = distributed.initialize().grid  # a world of one
    device = compat.default_device()
    t_start = time.perf_counter()
    rows, failed = [], []
    for layers in args.layers:
        arch = qwen3_moe(layers, small)
        try:
            r = measure(arch, args, device, dtype, grid)
            rows.append(r)
            print(json.dumps(r), flush=True)
            if not r["finite"]:
                failed.append(f"{layers} layers: non-finite log-probs")
        except Exception as e:
            traceback.print_exc()
            failed.append(f"{layers} layers: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
    summary = {}
    if len(rows) == 2:
        (a, b) = rows
        per_layer = (b["s_per_token"] - a["s_per_token"]) / (b["layers"] - a["layers"])
        fixed = a["s_per_token"] - a["layers"] * per_layer
        w_layer = (b["weight_gib"] - a["weight_gib"]) / (b["layers"] - a["layers"])
        w_fixed = a["weight_gib"] - a["layers"] * w_layer
        summary = dict(
            s_per_token_per_layer=per_layer,
            s_per_token_fixed=fixed,
            weight_gib_per_layer=w_layer,
            full_layers=FULL_LAYERS,
            full_s_per_token=fixed + FULL_LAYERS * per_layer,
            full_weight_gib=w_fixed + FULL_LAYERS * w_layer,
        )
    shape = "toy shapes" if small else "Qwen3-30B-A3B shape"
    lines = [
        f"gpu_check_moe ({shape}, {dtype}): {device}, megatron-core "
        f"{compat.megatron_core_version()}, transformer-engine "
        f"{'yes' if compat.transformer_engine_available() else 'no'}",
        f"{args.rows} rows x {args.tokens} tokens, micro-batch {args.micro_batch}",
        "",
        "| layers | weights GiB | us / token | peak GiB | busiest expert / mean | experts used |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layers']} | {r['weight_gib']:.2f} | {r['s_per_token'] * 1e6:.2f} | "
            f"{r['peak_gib']:.2f} | {r['busiest_expert_over_mean']:.2f} | {r['experts_used']} |"
        )
    if summary:
        lines += [
            "",
            f"per layer: {summary['s_per_token_per_layer'] * 1e6:.2f} us / token, "
            f"{summary['weight_gib_per_layer']:.2f} GiB; fixed (embedding, output layer, log-prob "
            f"op): {summary['s_per_token_fixed'] * 1e6:.2f} us / token",
            f"{FULL_LAYERS} layers (extrapolated): {summary['full_s_per_token'] * 1e6:.1f} us / "
            f"token, {summary['full_weight_gib']:.1f} GiB of weights",
        ]
    total = time.perf_counter() - t_start
    lines.append(f"failed: {len(failed)}" + "".join(f"\n  {f}" for f in failed))
    lines.append(f"total {total:.0f} s")
    text = "\n".join(lines)
    print("\n" + text, flush=True)
    (out_dir / "gpu_check_moe.txt").write_text(text + "\n")
    result = dict(shape=shape, device=str(device), rows=rows, summary=summary, failed=failed)
    (out_dir / "gpu_check_moe.json").write_text(json.dumps(result, indent=2) + "\n")
    distributed.teardown()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
