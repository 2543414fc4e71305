"""Probe: can Megatron-Core's own refit (``megatron.core.resharding.swap_model_weights``) replace
the project's hand-written one (``megatron_opd.rollout.refit``) for the colocated rollout copy?

The student is loaded at TP2 on 2 gloo ranks (as the trainer loads it) and copied into rollout
copies at TP1 x DP2 on the same ranks:

* the project's refit (``RolloutModel.refit``), checked against the student gathered to full
  tensors here and against the checkpoint loaded directly at TP1 (``teacher.load_on_grid``);
* ``swap_model_weights(student, copy, "gloo")`` into fresh copies (every tensor NaN first, so an
  unwritten tensor shows), in steps: A as it is; B with a CPU stand-in for the CUDA streams (and
  pinned buffers) its Gloo copy service asks for; C as B into a copy whose vocabulary is padded
  to the training width; D as C with ``partition_stride=2`` set on the gated ``linear_fc1``.

    python scripts/probe_resharding.py --pair DIR --make-pair     # once: the tiny pair
    torchrun --nproc-per-node 2 scripts/probe_resharding.py --pair DIR
    torchrun --nproc-per-node 3 scripts/probe_resharding.py --pair DIR --pools   # 0.19+

Rank 0 prints the attempts, a table of max abs differences per tensor group, timings and a verdict.

``--pools`` (issue 30): the rollout ranks' case, two worlds as ``--rollout-ranks 1`` makes them
(``megatron_opd.runtime.pools``): ranks 0-1 train (the student at TP2, their own default group and
Megatron groups), rank 2 is a rollout pool of its own at TP1. 0.19's ``swap_model_weights`` takes
``group=`` (any gloo group, even one outside the default world), rank offsets that number the two
worlds' ranks in it, and ``None`` for the model a rank does not hold. The probe builds one gloo
group of all three ranks on the job's store, calls ``swap_model_weights(student, None, ...)`` on
the training ranks and ``(None, copy, ...)`` on the rollout rank, with ``src_rank_offset=0`` and
``dst_rank_offset=2``, and checks the copy (NaN first) against the checkpoint loaded at TP1 on
the rollout rank: E into a copy padded to the training width (512 rows), as it is; F into a copy
padded to its own width (384 rows), with the CPU stream stand-in; G as E with the stand-in; H as G
with the group entered in torch's table of groups (``_world.pg_group_ranks``, bridge rank = group
rank), which ``dist.P2POp`` looks the peer up in and which only ``dist.new_group`` fills (it
cannot make a group across two worlds).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, uninstalled
sys.path.insert(0, str(ROOT / "scripts"))

from megatron_opd.compat.cpu import CpuStream  # noqa: E402

TRAIN_TP = 2
_PLAN_FAILED = "__probe_plan_failed__"
GROUPS = (
    ("embedding (vocab rows)", lambda n: n.startswith("embedding.")),
    ("output_layer (vocab rows)", lambda n: n.startswith("output_layer.")),
    ("attn linear_qkv", lambda n: n.endswith("linear_qkv.weight")),
    ("attn linear_proj (row)", lambda n: n.endswith("linear_proj.weight")),
    ("mlp linear_fc1 (gated)", lambda n: n.endswith("linear_fc1.weight")),
    ("mlp linear_fc2 (row)", lambda n: n.endswith("linear_fc2.weight")),
    ("norms (replicated)", lambda n: True),
)
VOCAB_TENSORS = ("embedding.word_embeddings.weight", "output_layer.weight")


def group_of(name: str) -> str:
    return next(label for label, test in GROUPS if test(name))


def say(*parts) -> None:
    if dist.get_rank() == 0:
        print(*parts, flush=True)


# --------------------------------------------------------------------------------------------
# The reference: the TP2 student gathered to full tensors (written here, not refit.merge_shards)


def gather_full(student, group) -> dict[str, torch.Tensor]:
    """Every student tensor, whole: TP shards all-gathered; the gated fc1 stored per rank as
    ``[gate_r; up_r]`` is put back as ``[gate_0; gate_1; up_0; up_1]`` (the unsharded layout).
    ``group``: the student's tensor-parallel group."""
    world = dist.get_world_size(group)
    full = {}
    for name, p in student.named_parameters():
        local = p.detach().contiguous()
        if not getattr(p, "tensor_model_parallel", False) or world == 1:
            full[name] = local.clone()
            continue
        shards = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(shards, local, group=group)
        if name.endswith("mlp.linear_fc1.weight"):
            gates = [s[: s.shape[0] // 2] for s in shards]
            ups = [s[s.shape[0] // 2 :] for s in shards]
            full[name] = torch.cat(gates + ups, dim=0)
        else:
            full[name] = torch.cat(shards, dim=p.partition_dim)
    return full


def diffs(copy: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], vocab: int):
    """Per copy tensor: (max abs difference, 1.0 if the copy holds NaN (never written), 1.0 if
    shapes differ), reduced with MAX over the ranks. Vocabulary tensors compare the true rows."""
    names = sorted(copy)
    rows = []
    for name in names:
        a, b = copy[name], ref.get(name)
        if name in VOCAB_TENSORS:
            a = a[:vocab]
            b = None if b is None else b[:vocab]
        if b is None or a.shape != b.shape:
            rows.append([0.0, 0.0, 1.0])
            continue
        nan = bool(torch.isnan(a).any())
        d = 0.0 if nan else float((a.double() - b.double()).abs().max())
        rows.append([d, float(nan), 0.0])
    t = torch.tensor(rows, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return {n: tuple(t[i].tolist()) for i, n in enumerate(names)}


def fmt(cell) -> str:
    d, nan, shape = cell
    if shape:
        return "shape differs"
    if nan:
        return "NaN (unwritten)"
    return "0 (exact)" if d == 0 else f"{d:.3e}"


def by_group(result: dict) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for name, cell in result.items():
        g = group_of(name)
        prev = out.get(g, (0.0, 0.0, 0.0))
        out[g] = tuple(max(x, y) for x, y in zip(prev, cell, strict=True))
    return out


# --------------------------------------------------------------------------------------------
# Around swap_model_weights


def describe(e: BaseException) -> str:
    """``Type: first line`` and the innermost megatron/core frame that raised it."""
    first = (str(e).strip().splitlines() or [""])[0][:150]
    where = ""
    for frame in traceback.extract_tb(e.__traceback__):
        path = frame.filename.replace("\\", "/")
        if "/megatron/core/" in path:
            rel = path.split("/megatron/core/", 1)[1]
            where = f"megatron/core/{rel}:{frame.lineno} `{frame.line}`"
    return f"{type(e).__name__}: {first}" + (f"  [at {where}]" if where else "")


@contextlib.contextmanager
def cpu_stream_standin():
    """torch.cuda.Stream / stream() / current_stream() as no-ops and ``pin_memory=True`` dropped
    from torch.empty, for the duration of one swap (restored after)."""
    saved = (torch.cuda.Stream, torch.cuda.stream, torch.cuda.current_stream, torch.empty)
    real_empty = torch.empty

    def empty(*args, **kwargs):
        kwargs.pop("pin_memory", None)
        return real_empty(*args, **kwargs)

    torch.cuda.Stream = CpuStream
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.current_stream = lambda *a, **k: CpuStream()
    torch.empty = empty
    try:
        yield
    finally:
        torch.cuda.Stream, torch.cuda.stream, torch.cuda.current_stream, torch.empty = saved


def guard_centralized_planner() -> None:
    """0.16's planner builds every rank's plan on rank 0 and broadcasts it; if it raises there,
    rank 1 would wait in the broadcast forever. Send rank 1 the failure instead, so both ranks
    raise (the planner's own code and error are unchanged)."""
    from megatron.core.resharding import refit as mrefit

    build = getattr(mrefit, "build_centralized_reshard_plan", None)
    if build is None or getattr(build, "_probe_guard", False):
        return

    def guarded(*args, **kwargs):
        real = torch.distributed.broadcast_object_list
        sent = {"done": False}

        def bcast(object_list, *a, **k):
            sent["done"] = True
            real(object_list, *a, **k)
            first = object_list[0]
            if isinstance(first, tuple) and first and first[0] == _PLAN_FAILED:
                raise RuntimeError(f"(rank 0's planner failed) {first[1]}")

        torch.distributed.broadcast_object_list = bcast
        try:
            return build(*args, **kwargs)
        except Exception as e:
            if dist.get_rank() == 0 and not sent["done"]:
                real([(_PLAN_FAILED, describe(e))] * dist.get_world_size(), src=0)
            raise
        finally:
            torch.distributed.broadcast_object_list = real

    guarded._probe_guard = True
    mrefit.build_centralized_reshard_plan = guarded


def fresh_copy(chunks, grid, arch, divisor: int):
    """A new rollout copy at TP1 x DP2 (the project's own constructor) of the student's
    ``chunks`` on ``grid``, every tensor NaN."""
    from megatron_opd.rollout import refit

    model = refit.RolloutModel(chunks, grid, arch, divisor, 1, 1, timeout_minutes=5)
    with torch.no_grad():
        for p in model.chunk.parameters():
            p.fill_(float("nan"))
    return model.chunk


def try_swap(label: str, chunks, copy) -> str | None:
    """One swap_model_weights call; the error (as every rank saw it), or None."""
    from megatron.core import resharding
    from megatron.core.resharding import refit as mrefit

    clear = getattr(mrefit, "clear_plan_cache", None)  # 0.19 caches plans by layout, not model
    if clear is not None:
        clear()
    err = None
    try:
        resharding.swap_model_weights(chunks, [copy], "gloo")
    except Exception as e:  # noqa: BLE001 (the probe records every failure)
        err = describe(e)
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, err)
    if all(x is None for x in errors):
        say(f"  {label}: ran")
        return None
    shown = errors[0] if errors[0] is not None else f"(rank 1 only) {errors[1]}"
    say(f"  {label}: {shown}")
    if errors[0] is not None and errors[1] is not None and errors[0] != errors[1]:
        say(f"      rank 1: {errors[1]}")
    return shown


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        out.append(time.perf_counter() - t0)
    return out


# --------------------------------------------------------------------------------------------


def make_pair(directory: Path) -> None:
    from fault_soak import make_pair as soak_pair

    out = soak_pair(directory)
    print("pair:", {k: str(v) for k, v in out.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", required=True, type=Path)
    parser.add_argument("--make-pair", action="store_true", help="write the tiny pair and exit")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--pools", action="store_true", help="two worlds: 2 training + 1 rollout")
    args = parser.parse_args()
    if args.make_pair:
        make_pair(args.pair)
        return
    if args.pools:
        probe_pools(args)
        return

    import megatron.core

    from megatron_opd.models import convert
    from megatron_opd.rollout import refit
    from megatron_opd.runtime import distributed
    from megatron_opd.training import teacher

    grid = distributed.initialize(distributed.ParallelConfig(TRAIN_TP, 1), timeout_minutes=5).grid
    torch.set_num_threads(1)
    directory = args.pair / "student"
    chunks, arch = convert.load_checkpoint_model(directory, grid)  # TP2, as the trainer loads it
    _, meta = convert.read_checkpoint(directory)
    divisor = meta.get("make_vocab_size_divisible_by", 128)
    student = chunks[0]
    vocab = arch.vocab_size
    say(f"megatron-core {megatron.core.__version__}, torch {torch.__version__}, world "
        f"{dist.get_world_size()}: student TP{grid.tp_size} -> "
        f"copy TP1 x DP2; vocab {vocab}, divisor {divisor}")  # fmt: skip
    full = gather_full(student, grid.tp)

    # 1. the project's refit
    project_model = refit.RolloutModel(chunks, grid, arch, divisor, 1, 1, timeout_minutes=5)
    project_model.refit(chunks)
    project = {n: p.detach().clone() for n, p in project_model.chunk.named_parameters()}
    project_vs_full = diffs(project, full, vocab)
    (at_tp1,) = teacher.load_on_grid(directory, project_model.grid)
    ckpt = dict(at_tp1.named_parameters())
    same_as_ckpt = all(torch.equal(project[n], ckpt[n]) for n in project)
    flag = torch.tensor([0 if same_as_ckpt else 1])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    pad = max(float(project[n][vocab:].abs().max()) for n in VOCAB_TENSORS if n in project)
    rows = {n: tuple(project[n].shape) for n in VOCAB_TENSORS if n in project}
    say(f"project copy: {len(project)} tensors; vocab tensors {rows} vs student full "
        f"{ {n: tuple(full[n].shape) for n in rows} }; pad rows max |x| = {pad}; "
        f"equal to the checkpoint loaded at TP1: {not flag.item()}")  # fmt: skip
    fc1 = next(n for n, _ in student.named_parameters() if n.endswith("linear_fc1.weight"))
    copy_fc1 = dict(project_model.chunk.named_parameters())[fc1]
    student_fc1 = dict(student.named_parameters())[fc1]
    say(
        f"fc1 partition_stride: student {getattr(student_fc1, 'partition_stride', None)}, "
        f"copy {getattr(copy_fc1, 'partition_stride', None)}"
    )
    project_times = timed(lambda: project_model.refit(chunks), args.reps)

    # 2. Megatron-Core's swap_model_weights
    guard_centralized_planner()
    say("swap_model_weights(student, copy, 'gloo') attempts:")
    results: dict[str, dict | str] = {}
    copy_a = fresh_copy(chunks, grid, arch, divisor)
    err = try_swap("A as is", chunks, copy_a)
    results["A"] = err or by_group(diffs(dict(copy_a.named_parameters()), project, vocab))
    copy_b = fresh_copy(chunks, grid, arch, divisor)
    with cpu_stream_standin():
        err = try_swap("B + CPU stream/pin_memory stand-in", chunks, copy_b)
    results["B"] = err or by_group(diffs(dict(copy_b.named_parameters()), project, vocab))

    # C: the copy padded like the training model (vocab rows 2 x 256 = 512 at TP1)
    copy_c = fresh_copy(chunks, grid, arch, divisor * TRAIN_TP)
    with cpu_stream_standin():
        err = try_swap(f"C + B, copy padded to the training width (divisor {divisor * TRAIN_TP})",
                       chunks, copy_c)  # fmt: skip
    detail_c = None
    swap_times = first_call = None
    if err is None:
        detail_c = diffs(dict(copy_c.named_parameters()), project, vocab)
        results["C"] = by_group(detail_c)
        with cpu_stream_standin():
            from megatron.core.resharding import swap_model_weights

            swap_times = timed(lambda: swap_model_weights(chunks, [copy_c], "gloo"), args.reps)
    else:
        results["C"] = err

    # D: C with the gated fc1 marked partition_stride=2 on both sides
    copy_d = fresh_copy(chunks, grid, arch, divisor * TRAIN_TP)
    saved = {}
    for model in (student, copy_d):
        for n, p in model.named_parameters():
            if n.endswith("linear_fc1.weight"):
                saved[id(p)] = (p, getattr(p, "partition_stride", 1))
                p.partition_stride = 2
    with cpu_stream_standin():
        t0 = time.perf_counter()
        err = try_swap("D + C, fc1 partition_stride=2", chunks, copy_d)
        first_call = time.perf_counter() - t0
    for p, stride in saved.values():
        p.partition_stride = stride
    detail_d = None
    if err is None:
        detail_d = diffs(dict(copy_d.named_parameters()), project, vocab)
        results["D"] = by_group(detail_d)
    else:
        results["D"] = err

    # 3. the table
    say("")
    say(f"== megatron-core {megatron.core.__version__}: max abs diff per tensor group ==")
    say("project refit: vs the TP2 student gathered to full here; megatron A-D: vs the "
        f"project refit (vocab tensors: the first {vocab} rows)")  # fmt: skip
    head = ["tensor group", "project refit", "mcore A", "mcore B", "mcore C", "mcore D"]
    widths = [26, 14, 16, 16, 16, 16]

    def line(cells) -> str:
        return " | ".join(str(c)[:w].ljust(w) for c, w in zip(cells, widths, strict=False))

    say(line(head))
    say("-+-".join("-" * w for w in widths))
    project_groups = by_group(project_vs_full)
    for label, _ in GROUPS:
        cells = [label, fmt(project_groups[label])]
        for key in "ABCD":
            r = results[key]
            cells.append("error (below)" if isinstance(r, str) else fmt(r[label]))
        say(line(cells))
    for key in "ABCD":
        if isinstance(results[key], str):
            say(f"  mcore {key} error: {results[key]}")
    for key, detail in (("C", detail_c), ("D", detail_d)):
        if detail:
            bad = [f"{n} ({fmt(c)})" for n, c in detail.items() if any(c)]
            say(f"  mcore {key} tensors that differ: {', '.join(bad) if bad else 'none'}")
    med = statistics.median(project_times)
    say(
        f"timing (median of {args.reps}, 2 ranks, CPU/gloo): project refit {med * 1e3:.1f} ms"
        + (
            f"; swap_model_weights (C, plan cached) {statistics.median(swap_times) * 1e3:.1f} ms"
            if swap_times
            else "; swap_model_weights: did not run"
        )
        + (f"; D's first call incl. planning {first_call * 1e3:.1f} ms" if first_call else "")
    )
    dist.barrier()
    distributed.teardown()


# --------------------------------------------------------------------------------------------
# --pools: the rollout ranks' case, two worlds joined by one gloo group


def probe_pools(args) -> None:
    from datetime import timedelta

    import megatron.core
    from megatron.core.resharding import refit as mrefit
    from megatron.core.resharding import swap_model_weights

    from megatron_opd.models import convert, gpt
    from megatron_opd.runtime import distributed

    pool = distributed.initialize(
        distributed.ParallelConfig(TRAIN_TP, 1),
        timeout_minutes=5,
        rollout_ranks=1,
        rollout_parallel=distributed.ParallelConfig(1, 1),
    )
    torch.set_num_threads(1)
    trainers = pool.global_size - 1
    me = f"[{pool.role} {pool.rank}]"

    def show(*parts) -> None:
        if pool.is_rollout or pool.rank == 0:
            print(me, *parts, flush=True)

    # every rank of both worlds, numbered by its launcher rank: training 0..1, rollout 2
    group = dist.ProcessGroupGloo(
        dist.PrefixStore("probe/bridge/", pool.store),
        pool.global_rank,
        pool.global_size,
        timedelta(minutes=5),
    )
    directory = args.pair / "student"
    arch, meta = convert.read_checkpoint(directory)
    divisor = meta.get("make_vocab_size_divisible_by", 128)
    vocab = arch.vocab_size
    show(
        f"megatron-core {megatron.core.__version__}, torch {torch.__version__}; "
        f"{trainers} training ranks (TP{TRAIN_TP}) + 1 rollout rank (TP1), separate worlds; "
        f"group: ProcessGroupGloo rank {group.rank()} of {group.size()}"
    )

    student = reference = None
    if not pool.is_rollout:
        student, _ = convert.load_checkpoint_model(directory, pool.grid)  # this rank's TP2 chunks
    else:
        (at_tp1,), _ = convert.load_checkpoint_model(directory, pool.grid)
        reference = {n: p.detach().clone() for n, p in at_tp1.named_parameters()}

    def nan_copy(vocab_divisor: int):
        config = gpt.transformer_config(
            arch, 1, 1, dtype=convert.checkpoint_dtype(directory), perform_initialization=False
        )
        (chunk,) = gpt.build_model(arch, config, pool.grid, vocab_divisor)
        with torch.no_grad():
            for p in chunk.parameters():
                p.fill_(float("nan"))
        return chunk

    def attempt(label: str, copy, standin: bool) -> str | None:
        mrefit.clear_all_caches()
        err = None
        ctx = cpu_stream_standin() if standin else contextlib.nullcontext()
        try:
            with ctx, torch.no_grad():
                swap_model_weights(
                    student, copy, "gloo", group=group, src_rank_offset=0, dst_rank_offset=trainers
                )
        except Exception as e:  # noqa: BLE001 (the probe records every failure)
            err = describe(e)
        show(f"{label}: {err or 'ran'}")
        return err

    def check(copy) -> dict[str, tuple]:
        got = dict(copy.named_parameters())
        out = {}
        for name, ref in reference.items():
            a = got[name].detach()
            if name in VOCAB_TENSORS:
                a, ref = a[:vocab], ref[:vocab]
            if a.shape != ref.shape:
                cell = (0.0, 0.0, 1.0)
            elif torch.isnan(a).any():
                cell = (0.0, 1.0, 0.0)
            else:
                cell = (float((a.double() - ref.double()).abs().max()), 0.0, 0.0)
            g = group_of(name)
            out[g] = tuple(
                max(x, y) for x, y in zip(out.get(g, (0.0, 0.0, 0.0)), cell, strict=True)
            )
        return out

    wide = divisor * TRAIN_TP
    copy_e = nan_copy(wide) if pool.is_rollout else None
    attempt(f"E as it is, copy padded to the training width (divisor {wide})", copy_e, False)
    copy_f = nan_copy(divisor) if pool.is_rollout else None
    attempt(f"F + CPU stream stand-in, copy padded to its own width (divisor {divisor})",
            copy_f, standin=True)  # fmt: skip
    copy_g = nan_copy(wide) if pool.is_rollout else None
    attempt(f"G + CPU stream stand-in, training width (divisor {wide})", copy_g, standin=True)
    # H: the group registered as new_group would (identity map: bridge rank == group rank)
    from torch.distributed import distributed_c10d as c10d

    c10d._world.pg_group_ranks[group] = {r: r for r in range(group.size())}
    copy_g = nan_copy(wide) if pool.is_rollout else None
    err = attempt("H + G, the group in torch's group table", copy_g, standin=True)
    if err is None and pool.is_rollout:
        for label, cell in check(copy_g).items():
            show(f"  H {label}: {fmt(cell)}")
    if err is None:
        times = []
        with cpu_stream_standin(), torch.no_grad():
            for _ in range(args.reps):
                group.barrier().wait()
                t0 = time.perf_counter()
                swap_model_weights(
                    student, copy_g, "gloo", group=group, src_rank_offset=0,
                    dst_rank_offset=trainers,
                )  # fmt: skip
                group.barrier().wait()
                times.append(time.perf_counter() - t0)
        show(
            f"H timing (median of {args.reps}, plan cached): "
            f"{statistics.median(times) * 1e3:.1f} ms"
        )
    group.barrier().wait()
    distributed.teardown()


if __name__ == "__main__":
    main()
    sys.exit(0)
