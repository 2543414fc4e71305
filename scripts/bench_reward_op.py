"""Benchmark: the vocab-parallel reward op against Megatron-Core's cross-entropy and the reference
formulation, forward + backward time and peak extra memory.

    .venv/bin/python scripts/bench_reward_op.py                 # 4 x 1,024 tokens, V = 151,936
    .venv/bin/python scripts/bench_reward_op.py --tokens 1024 --rounds 1    # a quicker look

Contenders, all on the same logits (``[1024, 4, V/TP]``, Megatron's layout) and targets:

* ``op``: :func:`megatron_opd.reward.vocab_parallel.sampled_token_logprobs` forward + backward on
  the student's shard, in-place gradient (as the loss uses it). ``op, own grad``: the same with a
  separately allocated gradient. ``OPD loss``: the whole reward computation, i.e. the op's forward
  on the teacher's shard, the op on the student's, the PowerOPD reward and the REINFORCE loss.
* ``Megatron CE``: ``megatron.core.tensor_parallel.vocab_parallel_cross_entropy`` (the same
  reductions, in place on its input).
* ``reference``: the reference code's formulation on unsharded logits: two full fp32
  ``log_softmax`` (student with grad, teacher without), gather, PowerOPD reward, token-mean
  REINFORCE loss. TP1 only: it has no tensor parallelism.
* ``full-vocab KL``: :func:`megatron_opd.reward.vocab_parallel.full_vocab_reverse_kl` on both
  shards.

The sharded contenders run interleaved in the same processes (one per TP rank, gloo), repetition
by repetition, so that a disturbance from elsewhere on the machine hits them alike. The reference
runs in a process of its own (its peak is near the machine's memory). Time: the fastest repetition
over all rounds (fresh processes), the least disturbed one, and its ratio to Megatron CE's fastest;
a second table gives the median over repetitions of the ratio within a repetition. Peak extra
memory: the kernel's peak RSS (VmHWM, reset through /proc/self/clear_refs after malloc_trim before
each repetition) minus the RSS just before it; the maximum over repetitions and TP ranks. Inputs
are created and refilled outside the timings; the logits enter through a stand-in for the output
layer, so that their gradient flows on as in a model instead of being kept as a leaf's ``.grad``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_opd.models.gpt import padded_vocab_size  # noqa: E402
from megatron_opd.reward.vocab_parallel import DEFAULT_CHUNK_SIZE  # noqa: E402
from megatron_opd.runtime import distributed  # noqa: E402
from megatron_opd.runtime.distributed import ParallelConfig  # noqa: E402
from megatron_opd.runtime.spawn import run_distributed  # noqa: E402

ALPHA = 1.0
SEQ_PER_SAMPLE = 1024
BASELINE = "Megatron CE"
SHARDED = ["op", "op, own grad", "OPD loss", BASELINE, "full-vocab KL"]
COLUMNS = ["op", "op, own grad", "OPD loss", BASELINE, "reference", "full-vocab KL"]


def logits_from_an_output_layer(logits):
    """``logits`` as if an output layer had just produced them: the same storage (no copy), not a
    leaf, so an op's in-place gradient flows on instead of autograd cloning it into ``.grad``
    (what the benchmarks of the reward op need to time it as training runs it)."""

    class OutputLayer(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.detach()

        @staticmethod
        def backward(ctx, grad):
            return None

    return OutputLayer.apply(logits.detach().requires_grad_())


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> int:
    """Reset the peak RSS to the current RSS; return the current RSS in bytes."""
    gc.collect()
    # hand freed heap pages back, so that scratch buffers reused from an earlier repetition are
    # faulted in again and counted
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS") * 1024


def _measure(fn) -> tuple[float, int]:
    fn(prepare=True)
    base = _reset_peak()
    t0 = time.perf_counter()
    fn(prepare=False)
    elapsed = time.perf_counter() - t0
    return elapsed, _status_kb("VmHWM") * 1024 - base


def _rank(group_name: str, tp: int, dtype_name: str, tokens: int, vocab: int, reps: int, chunk):
    """One TP rank: returns {variant: (times per repetition, extra bytes per repetition)}."""
    from megatron.core import tensor_parallel

    from megatron_opd.reward.rewards import power_reward
    from megatron_opd.reward.vocab_parallel import full_vocab_reverse_kl, sampled_token_logprobs

    grid = distributed.initialize(ParallelConfig(tp, 1), seed=0).grid
    dtype = getattr(torch, dtype_name)
    group = grid.tp if tp > 1 else None
    rank = grid.tp_rank
    seq = min(SEQ_PER_SAMPLE, tokens)
    batch = tokens // seq
    reference_only = group_name == "reference"
    vp = vocab if reference_only else padded_vocab_size(vocab, 128, tp) // tp
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, vocab, (seq, batch), generator=g)
    upstream = torch.randn(seq, batch, generator=g) / tokens
    torch.manual_seed(1 + rank)
    student = torch.empty(seq, batch, vp, dtype=dtype).normal_()
    teacher = torch.empty(seq, batch, vp, dtype=dtype).normal_()
    # the in-place contenders consume their input: refill it (outside the timing) before each run
    pristine = None if reference_only else student.clone()

    def fresh_student(prepare: bool):
        if prepare:
            if pristine is not None:
                student.copy_(pristine)
            return None
        return logits_from_an_output_layer(student)

    def op(prepare, inplace=True):
        x = fresh_student(prepare)
        if x is not None:
            lp = sampled_token_logprobs(x, targets, vocab, group, chunk, inplace)
            lp.backward(upstream)

    def opd_loss(prepare):
        x = fresh_student(prepare)
        if x is not None:
            with torch.no_grad():
                lp_t = sampled_token_logprobs(teacher, targets, vocab, group, chunk)
            lp_s = sampled_token_logprobs(x, targets, vocab, group, chunk, True)
            r = power_reward(lp_t, lp_s.detach(), ALPHA)
            (-(r * lp_s).sum() / tokens).backward()

    def megatron_ce(prepare):
        x = fresh_student(prepare)
        if x is not None:
            tensor_parallel.vocab_parallel_cross_entropy(x, targets).backward(upstream)

    def kl(prepare):
        x = fresh_student(prepare)
        if x is not None:
            full_vocab_reverse_kl(x, teacher, vocab, group, chunk, True).backward(upstream)

    def reference(prepare):
        x = fresh_student(prepare)
        if x is not None:
            logp_s = torch.log_softmax(x.float(), dim=-1)
            with torch.no_grad():
                logp_t = torch.log_softmax(teacher.float(), dim=-1)
                lp_t = logp_t.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                del logp_t
            lp_s = logp_s.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            r = torch.exp(ALPHA * lp_t) - torch.exp(ALPHA * lp_s.detach())
            del logp_s
            (-(r * lp_s).sum() / tokens).backward()

    if reference_only:
        variants = {"reference": reference}
    else:
        variants = {
            "op": op,
            "op, own grad": lambda prepare: op(prepare, inplace=False),
            "OPD loss": opd_loss,
            BASELINE: megatron_ce,
            "full-vocab KL": kl,
        }
    for fn in variants.values():  # warm-up: thread pools, first touch of scratch buffers
        fn(prepare=True)
        fn(prepare=False)
    out = {v: ([], []) for v in variants}
    for _ in range(reps):
        for v, fn in variants.items():
            t, e = _measure(fn)
            out[v][0].append(t)
            out[v][1].append(e)
    return out


def _reference_bytes(tokens: int, vocab: int, dtype_name: str) -> int:
    """A generous estimate of the reference's peak: both inputs, their fp32 copies (bf16), and
    four fp32 [tokens, vocab] tensors (two log_softmax outputs and the backward's temporaries)."""
    n = tokens * vocab
    elem = 4 if dtype_name == "float32" else 2
    copies = 0 if dtype_name == "float32" else 2 * n * 4
    return 2 * n * elem + copies + 4 * n * 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4 * 1024)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--reps", type=int, default=6, help="timed repetitions per process")
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per contender")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="tokens")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()
    if args.tokens > SEQ_PER_SAMPLE and args.tokens % SEQ_PER_SAMPLE:
        parser.error(f"--tokens must be a multiple of {SEQ_PER_SAMPLE}")

    results: dict = {}  # (dtype, tp, variant) -> {"times", "ratios", "extra", "tokens"}
    notes: list[str] = []
    reference_tokens: dict[str, int] = {}  # decided once per dtype, so that rounds agree
    for dtype_name in args.dtypes:
        for tp in args.tp:
            groups = ["sharded"] + (["reference"] if tp == 1 and not args.no_reference else [])
            for rnd in range(args.rounds):
                for group_name in groups:
                    tokens = args.tokens
                    if group_name == "reference":
                        if dtype_name not in reference_tokens:
                            reference_tokens[dtype_name] = _reference_tokens(
                                args, dtype_name, notes
                            )
                        tokens = reference_tokens[dtype_name]
                    print(f"[{dtype_name} TP{tp} round {rnd}] {group_name} ...", flush=True)
                    t0 = time.perf_counter()
                    ranks = run_distributed(
                        _rank,
                        tp,
                        group_name,
                        tp,
                        dtype_name,
                        tokens,
                        args.vocab,
                        args.reps,
                        args.chunk_size,
                        timeout=1800,
                    )
                    print(f"    {time.perf_counter() - t0:.0f} s", flush=True)
                    _collect(results, ranks, dtype_name, tp, args.tokens / tokens, tokens)
    _print_tables(results, args, notes)
    if args.json:
        raw = {"|".join(map(str, k)): v for k, v in results.items()}
        args.json.write_text(json.dumps(raw, indent=1))


def _reference_tokens(args, dtype_name: str, notes: list[str]) -> int:
    """Full size when the machine has the memory for it, else halved until it fits."""
    import psutil

    tokens = args.tokens
    avail = psutil.virtual_memory().available
    while _reference_bytes(tokens, args.vocab, dtype_name) * 1.25 > avail and tokens > 1024:
        tokens //= 2
    if tokens != args.tokens:
        notes.append(
            f"reference {dtype_name}: run at {tokens} tokens ({avail / 2**30:.1f} GiB available); "
            f"its time is scaled x{args.tokens / tokens:g}, its memory is as measured"
        )
    return tokens


def _collect(results: dict, ranks: list, dtype_name: str, tp: int, scale: float, tokens: int):
    # a repetition lasts as long as its slowest rank (the ranks meet in every all-reduce)
    per_rep = {
        v: [max(ts) * scale for ts in zip(*(r[v][0] for r in ranks), strict=True)] for v in ranks[0]
    }
    for v, times in per_rep.items():
        entry = results.setdefault(
            (dtype_name, tp, v), {"times": [], "ratios": [], "extra": 0, "tokens": tokens}
        )
        entry["times"].extend(times)
        entry["extra"] = max(entry["extra"], max(max(r[v][1]) for r in ranks))
        if BASELINE in per_rep:
            entry["ratios"].extend(t / b for t, b in zip(times, per_rep[BASELINE], strict=True))


def _print_tables(results: dict, args, notes: list[str]) -> None:
    print()
    print(
        f"V = {args.vocab:,}, {max(args.tokens // SEQ_PER_SAMPLE, 1)} x "
        f"{min(args.tokens, SEQ_PER_SAMPLE):,} tokens, forward + backward, chunk "
        f"{args.chunk_size} tokens; torch {torch.__version__}, {os.cpu_count()} CPUs; "
        f"{args.rounds} rounds x {args.reps} repetitions"
    )

    def table(title: str, cell) -> None:
        print(f"\n{title}\n")
        print("| TP | dtype | " + " | ".join(COLUMNS) + " |")
        print("|---|---|" + "---|" * len(COLUMNS))
        for dtype_name in args.dtypes:
            for tp in args.tp:
                base = results.get((dtype_name, tp, BASELINE))
                cells = []
                for col in COLUMNS:
                    r = results.get((dtype_name, tp, col))
                    cells.append("—" if r is None or base is None else cell(r, base))
                print(f"| {tp} | {dtype_name} | " + " | ".join(cells) + " |")

    def best(r, base):
        return f"{min(r['times']):.2f} ({min(r['times']) / min(base['times']):.2f}x)"

    def median_ratio(r, base):
        return f"{statistics.median(r['ratios']):.2f}x" if r["ratios"] else "—"

    def memory(r, base):
        cell = f"{r['extra'] / 2**20:,.0f}"
        return cell if r["tokens"] == args.tokens else f"{cell} @ {r['tokens']} tok"

    table("time, s: the fastest repetition (its ratio to Megatron CE's fastest)", best)
    table(
        "median over repetitions of the time ratio to Megatron CE in the same repetition",
        median_ratio,
    )
    table("peak extra memory, MiB (per rank)", memory)
    for n in notes:
        print(f"\nnote: {n}")


if __name__ == "__main__":
    main()
