"""A frozen teacher on its own TP x PP layout, colocated with the student on the same ranks.

The student runs on its grid (:func:`megatron_opd.runtime.distributed.student_grid`); a teacher on
another layout gets its own (:func:`megatron_opd.runtime.distributed.build_model_grid`) and is
built, loaded and run with those groups passed explicitly (``pg_collection``,
``P2PCommunicator``). Sampled-token OPD needs from the
teacher only one fp32 log-prob per token, so moving work between the layouts costs ``[b, s]``
token ids and floats, never logits:

1. each teacher replica (its TP x PP ranks) all-gathers the token ids of the student
   data-parallel ranks its members belong to (each student DP rank once);
2. the replica scores them in a forward-only pipeline pass on its own groups;
3. its last stage broadcasts the ``[rows, s]`` log-probs over the replica, and every rank keeps
   its own rows.

When one student replica's ranks sit in several teacher replicas (the teacher has more replicas
than the student has data-parallel ranks, e.g. a PP2 student beside a TP1 teacher), each of those
teacher replicas scores a contiguous share of the student replica's rows, and the student's
model-parallel group all-gathers the shares (:class:`Shares`), so no row is scored twice.

A mixture-of-experts teacher may also spread its experts over ``EP`` of its replicas
(``--opd-teacher-expert-model-parallel-size``): the replicas of one expert group exchange tokens in
every MoE layer, so they score the same number of equally shaped micro-batches (the fewer or
shorter rows of one padded to the others'; causal attention and dropless routing leave the real
positions' scores unchanged).

``full_vocab_kl`` needs the teacher's vocab-sharded logits ``[b, s, v/tp]`` on the student's last
stage in the student's TP sharding; moving those is exactly the cost this module avoids, so a
teacher on another layout is refused for it (:func:`check_layout`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_opd import compat
from megatron_opd.models import convert, gpt
from megatron_opd.reward.loss import step_log_ratio_moments
from megatron_opd.reward.rewards import compute_reward
from megatron_opd.runtime import checkpointing
from megatron_opd.runtime.distributed import ModelGrid, build_model_grid
from megatron_opd.training.opd import (
    MicroBatch,
    RolloutBatch,
    forward_only,
    models_device,
    split_like_items,
)

TP_FLAG = "--opd-teacher-tensor-model-parallel-size"
PP_FLAG = "--opd-teacher-pipeline-model-parallel-size"
EP_FLAG = "--opd-teacher-expert-model-parallel-size"


def check_layout(
    arch: gpt.ArchConfig,
    tp: int,
    pp: int,
    world_size: int,
    name: str,
    flags: tuple[str, str] = (TP_FLAG, PP_FLAG),
    ep: int = 1,
) -> None:
    """Raise a ValueError naming the layout's flag when ``arch`` cannot run at TP x PP (x EP)."""
    tp_flag, pp_flag = flags
    for flag, value in ((tp_flag, tp), (pp_flag, pp), (EP_FLAG, ep)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value} ({name})")
    if world_size % (tp * pp) != 0:
        raise ValueError(
            f"{tp_flag} {tp} x {pp_flag} {pp} does not divide the world size {world_size} ({name})"
        )
    if ep > 1:
        if not arch.is_moe:
            raise ValueError(
                f"{EP_FLAG} {ep} needs a mixture-of-experts {name}; it is {arch.model_type}"
            )
        if (world_size // (tp * pp)) % ep != 0:
            raise ValueError(
                f"{EP_FLAG} {ep} does not divide the {name}'s data-parallel size "
                f"{world_size // (tp * pp)} (world {world_size} / ({tp_flag} {tp} x "
                f"{pp_flag} {pp}))"
            )
        if arch.num_experts % ep != 0:
            raise ValueError(
                f"{EP_FLAG} {ep} does not divide the {name}'s {arch.num_experts} experts"
            )
    sizes = [
        ("num_attention_heads", arch.num_attention_heads),
        ("num_key_value_heads (query groups)", arch.num_key_value_heads),
    ]
    if not all(arch.sparse_layers()):
        sizes.append(("intermediate_size (ffn)", arch.intermediate_size))
    if arch.is_moe:
        sizes.append(("moe_intermediate_size (experts' ffn)", arch.moe_intermediate_size))
    for what, count in sizes:
        if count % tp != 0:
            raise ValueError(f"{tp_flag} {tp} does not divide the {name}'s {what} {count}")
    if pp > arch.num_hidden_layers:
        raise ValueError(
            f"{pp_flag} {pp} is larger than the {name}'s {arch.num_hidden_layers} layers"
        )
    if arch.num_hidden_layers % pp != 0:
        raise ValueError(
            f"{pp_flag} {pp} does not divide the {name}'s {arch.num_hidden_layers} layers"
        )


def load_on_grid(
    directory: str | Path, grid: ModelGrid, dtype: Optional[torch.dtype] = None
) -> list[torch.nn.Module]:
    """The teacher's chunk of this rank on ``grid``, loaded from its dist checkpoint, frozen.

    The sharded state dict is the model's own: each layer's TP offsets come from the TP group the
    layer was built with and the layer numbering from ``pg_collection.pp``; only the replica ids
    would fall back to ``parallel_state``'s data-parallel group, so the teacher's is passed in
    ``metadata`` (see docs/findings.md)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from torch.distributed.checkpoint.api import CheckpointException

    directory = Path(directory)
    arch, meta = convert.read_checkpoint(directory)
    config = gpt.transformer_config(
        arch,
        grid.tp_size,
        grid.pp_size,
        dtype=dtype or convert.checkpoint_dtype(directory),
        perform_initialization=False,
        expert_parallel_size=grid.ep_size,
    )
    divisor = convert.vocab_divisor(meta)
    (chunk,) = gpt.build_model(arch, config, grid, divisor)
    sharded = {"model": chunk.sharded_state_dict(metadata={"dp_cp_group": grid.dp})}
    try:
        state = dist_checkpointing.load(
            sharded, str(directory), strict=StrictHandling.ASSUME_OK_UNEXPECTED
        )
        chunk.load_state_dict(state["model"], strict=False)
    except (Exception, CheckpointException) as e:  # torch's CheckpointException is a BaseException
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        raise ValueError(
            f"{directory}: the checkpoint does not match the architecture in "
            f"{checkpointing.META_FILE}: {reason}"
        ) from e
    chunk.eval()
    chunk.requires_grad_(False)
    return [chunk]


@dataclass
class Shares:
    """How the rows of this rank's student replica are split among the teacher replicas that
    hold its ranks (a teacher with more replicas than the student has data-parallel ranks)."""

    index: int  # the share this rank's teacher replica scores
    count: int  # the teacher replicas holding ranks of this rank's student replica
    peers: list[int]  # the share of each rank of the student's model-parallel group, in order
    group: dist.ProcessGroup  # the student's model-parallel group, which gathers the shares


def student_shares(grid: ModelGrid, student: ModelGrid) -> Shares:
    """This rank's :class:`Shares` of a teacher on ``grid`` beside the ``student``'s grid
    (collective over the world, once per teacher grid)."""
    device = models_device()
    pair = torch.tensor([student.dp_rank, grid.dp_rank], device=device)
    every = [torch.empty_like(pair) for _ in range(dist.get_world_size())]
    dist.all_gather(every, pair)
    students, teachers = zip(*(map(int, p.tolist()) for p in every), strict=True)
    replicas = sorted({t for s, t in zip(students, teachers, strict=True) if s == student.dp_rank})
    peers = [replicas.index(teachers[r]) for r in dist.get_process_group_ranks(student.mp)]
    return Shares(replicas.index(grid.dp_rank), len(replicas), peers, student.mp)


@torch.no_grad()
def score_on_grid(
    chunks: list[torch.nn.Module],
    grid: ModelGrid,
    seqs: torch.Tensor,
    vocab_size: int,
    student_dp_rank: int,
    micro_batch_size: int,
    rows: Optional[torch.Tensor] = None,
    shares: Optional[Shares] = None,
) -> torch.Tensor:
    """The teacher's log-probs ``[B, S]`` fp32 of this rank's sampled tokens ``seqs``
    (``[B, S + 1]``: the rollout's prompt + response rows, position ``i`` predicting ``i + 1``),
    scored by the teacher replica this rank belongs to.

    ``rows`` (``[B]`` bool): score only these (prompts routed to this teacher); the other rows
    are 0. Every rank of the student DP rank's model-parallel group holds the same rollouts, so
    each student DP rank is sent once. ``shares``: when that group spans several teacher
    replicas, each scores a contiguous share of its rows and the group all-gathers the shares."""
    device = models_device()
    seqs = seqs.to(device)
    if rows is None:
        rows = torch.ones(seqs.shape[0], dtype=torch.bool)
    rows = rows.to(device)
    mine = seqs[rows]
    n = mine.shape[0]
    split = shares is not None and shares.count > 1
    if split:
        mine = mine[n * shares.index // shares.count : n * (shares.index + 1) // shares.count]
    scored = _score_on_replica(
        chunks, grid, mine, vocab_size, student_dp_rank, micro_batch_size, seqs.shape[1] - 1
    )
    if split and n:
        scored = _join_shares(scored, n, shares)
    out = torch.zeros(rows.shape[0], seqs.shape[1] - 1, dtype=torch.float32, device=device)
    out[rows] = scored
    return out


def _join_shares(part: torch.Tensor, n: int, shares: Shares) -> torch.Tensor:
    """All ``n`` rows of the student replica from every teacher replica's share of them."""
    k = shares.count
    bounds = [n * j // k for j in range(k + 1)]
    buf = part.new_zeros(-(-n // k), part.shape[1])
    buf[: part.shape[0]] = part
    gathered = [torch.empty_like(buf) for _ in shares.peers]
    dist.all_gather(gathered, buf, group=shares.group)
    pieces = [gathered[shares.peers.index(j)][: bounds[j + 1] - bounds[j]] for j in range(k)]
    return torch.cat(pieces)


def _score_on_replica(
    chunks, grid: ModelGrid, mine: torch.Tensor, vocab_size: int, student_dp_rank: int,
    micro_batch_size: int, width_out: int,
) -> torch.Tensor:  # fmt: skip
    """``[rows of mine, width_out]`` log-probs: the replica gathers the rows of every student
    DP rank among its members, scores them once, and hands each member its own."""
    device = mine.device
    members = len(grid.mp_ranks)
    header = torch.tensor([student_dp_rank, mine.shape[0], mine.shape[1]], device=device)
    headers = [torch.empty_like(header) for _ in range(members)]
    dist.all_gather(headers, header, group=grid.mp)
    owners, seen = [], set()
    for i, h in enumerate(headers):  # the first member of each student DP rank sends its rows
        if int(h[0]) not in seen:
            seen.add(int(h[0]))
            owners.append(i)
    most = max(int(headers[i][1]) for i in owners)
    width = max(int(headers[i][2]) for i in owners)
    n_total = sum(int(headers[i][1]) for i in owners)
    my_index = grid.mp_ranks.index(dist.get_rank())
    my_owner = next(i for i in owners if int(headers[i][0]) == student_dp_rank)
    rows_run, width_run = n_total, width
    if grid.ep_size > 1:  # the expert group's replicas run every pass together
        shape = torch.tensor([n_total, width], device=device)
        shapes = [torch.empty_like(shape) for _ in range(grid.ep_size)]
        dist.all_gather(shapes, shape, group=grid.ep)
        rows_run, width_run = (max(int(s[k]) for s in shapes) for k in (0, 1))
    if rows_run == 0:
        return torch.zeros(0, width_out, dtype=torch.float32, device=device)
    send = torch.zeros(most, width, dtype=mine.dtype, device=device)
    if my_index in owners and mine.shape[0]:
        send[: mine.shape[0], : mine.shape[1]] = mine
    gathered = [torch.empty_like(send) for _ in range(members)]
    dist.all_gather(gathered, send.contiguous(), group=grid.mp)
    batch = torch.zeros(max(n_total, 1), width_run, dtype=mine.dtype, device=device)
    if n_total:
        batch[:, :width] = torch.cat([gathered[i][: int(headers[i][1])] for i in owners])
    # uniform micro-batches for the schedule: pad the row count with copies of row 0 (never
    # past one micro-batch of the rows there are: a replica with a share of 4 rows scores 4)
    micro_batch_size = min(micro_batch_size, rows_run)
    pad = -(-rows_run // micro_batch_size) * micro_batch_size - batch.shape[0]
    if pad:
        batch = torch.cat([batch, batch[:1].expand(pad, -1)])
    teacher_items = [
        MicroBatch(
            batch[i : i + micro_batch_size, :-1].contiguous(),
            batch[i : i + micro_batch_size, 1:].contiguous(),
            torch.ones(0),
        )
        for i in range(0, batch.shape[0], micro_batch_size)
    ]
    scored = torch.empty(batch.shape[0], width_run - 1, dtype=torch.float32, device=device)
    outputs = forward_only(chunks, teacher_items, vocab_size, grid=grid)
    if grid.is_last_stage:
        scored = torch.cat([o.float() for o in outputs]).contiguous()
    dist.broadcast(scored, src=grid.rank_of(0, grid.pp_size - 1), group=grid.mp)
    offset = sum(int(headers[i][1]) for i in owners if i < my_owner)
    n_mine = int(headers[my_owner][1])
    return scored[offset : offset + n_mine, :width_out]


class TeacherSet:
    """One or several frozen teachers, each on its grid: the ``student``'s (the very grid
    object) or its own. The trainer's one way to score: :meth:`score`, each row by the teacher it
    is routed to."""

    def __init__(self, names: list[str], chunks: list[list[torch.nn.Module]],
                 grids: list[ModelGrid], student: ModelGrid):  # fmt: skip
        self.names, self.chunks, self.grids, self.student = names, chunks, grids, student
        by_grid: dict[int, Shares] = {}
        for g in grids:  # one collective per distinct grid, in the same order on every rank
            if g is not student and id(g) not in by_grid:
                by_grid[id(g)] = student_shares(g, student)
        self.shares = [by_grid.get(id(g)) for g in grids]

    def __len__(self) -> int:
        return len(self.names)

    @property
    def chunks_on_student_grid(self) -> Optional[list[torch.nn.Module]]:
        """The chunks of the only teacher when it sits on the student's grid, else ``None``:
        the held-out gap and ``full_vocab_kl`` read its logits in the student's TP sharding."""
        if len(self.grids) == 1 and self.grids[0] is self.student:
            return self.chunks[0]
        return None

    def score(
        self,
        batch: RolloutBatch,
        items: list[MicroBatch],
        vocab_size: int,
        micro_batch_size: int,
        routes: Optional[torch.Tensor] = None,
        keep_logits: bool = False,
    ) -> list[Optional[torch.Tensor]]:
        """Per micro-batch of ``items`` what :func:`megatron_opd.training.opd.forward_only`
        returns: the teacher's log-probs of the sampled tokens (``keep_logits``: its logits shard,
        one teacher on the student's grid only). ``routes``: ``[B]`` the teacher of each row of
        ``batch``.

        On the student's grid the rows are already on the ranks that score them, so the step's
        micro-batches go through as they are; on its own grid a teacher's replica first gathers
        them (:func:`score_on_grid`)."""
        if self.chunks_on_student_grid is not None:
            return forward_only(self.chunks[0], items, vocab_size, self.student, keep_logits)
        assert not keep_logits, "logits are kept on the student's grid only (check_layout)"
        full = None
        for k, (chunks, grid) in enumerate(zip(self.chunks, self.grids, strict=True)):
            rows = None if routes is None else routes == k
            part = score_on_grid(
                chunks, grid, batch.tokens, vocab_size, self.student.dp_rank,
                micro_batch_size, rows, self.shares[k],
            )  # fmt: skip
            full = part if full is None else full + part
        return split_like_items(full, items)


def on_student_grid(chunks: list[torch.nn.Module], student: ModelGrid,
                    name: str = "teacher") -> TeacherSet:  # fmt: skip
    """One teacher loaded on the student's layout, scored on the ``student``'s grid."""
    return TeacherSet([name], [chunks], [student], student)


def build_teachers(
    directories: list[Path],
    layouts: list[tuple[int, ...]],
    student: ModelGrid,
    dtype: Optional[torch.dtype] = None,
    timeout_minutes: int = 30,
) -> TeacherSet:
    """Every teacher on its own grid (teachers of one layout share the grid's groups) beside the
    ``student``'s grid. ``layouts``: ``(TP, PP)`` or ``(TP, PP, EP)`` of each teacher."""
    layouts = [tuple(layout) + (1,) * (3 - len(layout)) for layout in layouts]
    grids: dict[tuple[int, ...], ModelGrid] = {}
    chunks = []
    for directory, layout in zip(directories, layouts, strict=True):
        if layout not in grids:  # same order on every rank: new_group is collective
            tp, pp, ep = layout
            grids[layout] = build_model_grid(tp, pp, timeout_minutes, expert_parallel_size=ep)
        chunks.append(load_on_grid(directory, grids[layout], dtype))
    names = [f"teacher{k}" for k in range(len(directories))]
    return TeacherSet(names, chunks, [grids[layout] for layout in layouts], student)


def per_teacher_metrics(
    dump: list[dict],
    routes: torch.Tensor,
    names: list[str],
    reward_cfg,
    dp_group=None,
) -> dict[str, float]:
    """``reward/<teacher>/{mean,log_ratio_mean,tokens}`` over the step's valid tokens of the rows
    routed to each teacher, from the per-token values the step dumped (last stage only) and
    summed over ``dp_group``."""
    lp_t = torch.cat([d["lp_t"] for d in dump]).float()
    lp_s = torch.cat([d["lp_s"] for d in dump]).float()
    mask = torch.cat([d["mask"] for d in dump]).bool()
    moments = None
    if reward_cfg.needs_step_moments:
        moments = step_log_ratio_moments([lp_t], [lp_s], [mask], dp_group)
    reward = compute_reward(reward_cfg, lp_t, lp_s, mask, moments).double()
    ratio = lp_t.double() - lp_s.double()
    sums = torch.zeros(len(names), 3, dtype=torch.float64)
    for k in range(len(names)):
        m = mask & (routes.to(mask.device) == k)[:, None]
        sums[k] = torch.stack([m.sum().double(), reward[m].sum(), ratio[m].sum()])
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        sums = sums.to(compat.default_device())
        dist.all_reduce(sums, group=dp_group)
        sums = sums.cpu()
    out = {}
    for k, name in enumerate(names):
        n, r, lr = sums[k].tolist()
        out[f"reward/{name}/tokens"] = n
        out[f"reward/{name}/mean"] = r / n if n else float("nan")
        out[f"reward/{name}/log_ratio_mean"] = lr / n if n else float("nan")
    return out
