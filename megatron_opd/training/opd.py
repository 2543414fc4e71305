"""The stages of one on-policy distillation step, each a call the training loop makes in order:

    rollout          the student samples responses with its own weights (inference engine)
    micro_batches    prompt + response packed into Megatron's [b, s] inputs, targets, loss mask
    forward_only     a forward-only pipeline pass of a frozen model (``teacher.TeacherSet`` scores
                     with it): sampled-token log-probs (or, for full_vocab_kl, the vocab-sharded
                     logits) stay on the last stage
    train_step       the student's forward/backward with the OPD loss, then one optimizer step

Tensors follow GPTModel's layout: ``[b, s]`` with position ``i`` predicting token ``i + 1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_opd import compat
from megatron_opd.models import gpt
from megatron_opd.reward.loss import (
    build_loss_mask,
    opd_loss_func,
    reduce_reports,
    step_log_ratio_moments,
)
from megatron_opd.reward.rewards import RewardConfig
from megatron_opd.reward.vocab_parallel import full_vocab_reverse_kl, sampled_token_logprobs
from megatron_opd.runtime.checkpointing import unwrap
from megatron_opd.runtime.distributed import ModelGrid
from megatron_opd.training.batching import padding_counts, scatter_rows, token_budget_groups


@dataclass
class RolloutConfig:
    """How every rollout source samples (the trainer's and the rollout ranks' alike).
    ``top_p`` 0: no top-p filter (``--rollout-top-p 1`` maps to it)."""

    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 0.0
    top_k: int = 0
    engine: str = "static"  # a name in megatron_opd.rollout.engines.ENGINES, or "auto"

    def sampling_kwargs(self) -> dict:
        """:func:`megatron_opd.rollout.generation.generate`'s arguments for a training rollout."""
        return dict(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            return_logprobs=False,  # the training pass recomputes them; nothing reads these
            engine=self.engine,
        )


@dataclass
class RolloutBatch:
    """This data-parallel rank's responses. ``tokens``: prompt + response, right-padded."""

    tokens: torch.Tensor  # [B, S] long
    prompt_lengths: torch.Tensor  # [B]
    response_lengths: torch.Tensor  # [B]
    truncated: torch.Tensor  # [B] bool

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_lengths.sum())


def rollout(
    source,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    cfg: RolloutConfig,
    seed: int,
) -> RolloutBatch:
    """Sample one response per prompt from ``source`` (``megatron_opd.rollout.sources``: the
    student in place, a refitted copy, or rollout ranks of their own), at the step's ``seed``."""
    gens = source.generate(tokenizer, prompts, seed=seed, **cfg.sampling_kwargs())
    lengths = [len(p) + len(g.tokens) for p, g in zip(prompts, gens, strict=True)]
    # one spare position: the last input position has no target
    tokens = torch.full((len(prompts), max(lengths) + 1), tokenizer.pad_id, dtype=torch.long)
    for row, (p, g) in enumerate(zip(prompts, gens, strict=True)):
        seq = list(p) + list(g.tokens)
        tokens[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return RolloutBatch(
        tokens=tokens,
        prompt_lengths=torch.tensor([len(p) for p in prompts]),
        response_lengths=torch.tensor([len(g.tokens) for g in gens]),
        truncated=torch.tensor([g.truncated for g in gens]),
    )


@dataclass
class MicroBatch:
    """``first``: the first position whose logits anything reads (the earliest response token's
    predecessor); the forward passes compute logits from there on only (``_run_forward``), and
    ``logit_targets`` / ``logit_mask`` are the targets and mask of those positions."""

    tokens: torch.Tensor  # [b, s] inputs
    targets: torch.Tensor  # [b, s] token at i + 1
    loss_mask: torch.Tensor  # [b, s] bool: target is a trained response token
    rows: Optional[torch.Tensor] = None  # [b] the rollout rows it holds (token budgets only)
    first: Optional[int] = None  # by default from loss_mask

    def __post_init__(self) -> None:
        if self.first is None:
            two_d = self.loss_mask.dim() == 2
            self.first = first_logit_position(self.loss_mask) if two_d else 0

    @property
    def logit_targets(self) -> torch.Tensor:
        return self.targets[:, self.first :]

    @property
    def logit_mask(self) -> torch.Tensor:
        return self.loss_mask[:, self.first :]


def first_logit_position(loss_mask: torch.Tensor) -> int:
    """The first column of ``loss_mask`` [b, s] with a True; 0 when there is none. The positions
    before it are prompt context in every row: their hidden states are needed, their logits not
    (the output layer over a 49k vocabulary is most of a small student's forward and backward)."""
    columns = loss_mask.any(0).nonzero()
    return int(columns[0]) if len(columns) else 0


def micro_batches(
    batch: RolloutBatch,
    micro_batch_size: int,
    mask_terminal_stop: bool,
    pad_id: int,
    max_tokens: Optional[int] = None,
) -> list[MicroBatch]:
    """``micro_batch_size`` rows each, padded to the step's longest; with ``max_tokens``, rows
    grouped by length into micro-batches of at most that many positions (see ``batching``)."""
    device = models_device()
    if max_tokens is not None:
        return _token_budget_micro_batches(batch, max_tokens, mask_terminal_stop, device)
    seq = batch.tokens.shape[1] - 1
    tokens = batch.tokens[:, :-1]
    targets = batch.tokens[:, 1:]
    mask = build_loss_mask(
        batch.prompt_lengths, batch.response_lengths, batch.truncated, seq, mask_terminal_stop
    )
    out = []
    for start in range(0, tokens.shape[0], micro_batch_size):
        sl = slice(start, start + micro_batch_size)
        out.append(
            MicroBatch(
                tokens[sl].contiguous().to(device),
                targets[sl].contiguous().to(device),
                mask[sl].contiguous().to(device),
            )
        )
    return out


def _token_budget_micro_batches(batch, max_tokens, mask_terminal_stop, device):
    lengths = batch.prompt_lengths + batch.response_lengths
    out = []
    for rows in token_budget_groups(lengths, max_tokens):
        seq = int(lengths[rows].max())
        tokens = batch.tokens[rows, : seq + 1]  # one spare column: the last target
        mask = build_loss_mask(
            batch.prompt_lengths[rows],
            batch.response_lengths[rows],
            batch.truncated[rows],
            seq,
            mask_terminal_stop,
        )
        out.append(
            MicroBatch(
                tokens[:, :-1].contiguous().to(device),
                tokens[:, 1:].contiguous().to(device),
                mask.to(device),
                rows,
            )
        )
    return out


def padding_fraction(batch: RolloutBatch, items: list[MicroBatch]) -> tuple[int, int]:
    """(pad positions, all positions) in the inputs of ``items``, this rank's share of the step."""
    lengths = batch.prompt_lengths + batch.response_lengths
    shapes = [tuple(mb.tokens.shape) for mb in items]
    return padding_counts(lengths, [s for _, s in shapes], [b for b, _ in shapes])


def dump_in_rollout_order(dump: list, items: list[MicroBatch], batch: RolloutBatch) -> list:
    """A token dump of token-budget micro-batches as one entry in the rollout's row order and
    width (the padded path's layout); other dumps unchanged."""
    if not dump or items[0].rows is None:
        return dump
    width = batch.tokens.shape[1] - 1
    return scatter_rows(dump, [mb.rows for mb in items], batch.tokens.shape[0], width)


def split_like_items(full: torch.Tensor, items: list[MicroBatch]) -> list[torch.Tensor]:
    """Per-row values ``[B, S]`` in rollout order cut into the layout of ``items`` (each its rows,
    its positions ``mb.first`` to its own width): what ``forward_only`` returns for them."""
    if items[0].rows is None:
        sizes = [mb.tokens.shape[0] for mb in items]
        parts = torch.split(full, sizes)
        return [part[:, mb.first :].contiguous() for part, mb in zip(parts, items, strict=True)]
    rows = [mb.rows.to(full.device) for mb in items]
    return [
        full[r, mb.first : mb.tokens.shape[1]].contiguous()
        for r, mb in zip(rows, items, strict=True)
    ]


def models_device() -> torch.device:

    return compat.default_device()


def _run_forward(model: torch.nn.Module, tokens: torch.Tensor, first: int = 0) -> torch.Tensor:
    """The model's output for ``tokens`` [b, s]; on the last stage logits ``[b, s - first, v/tp]``
    of positions ``first..s-1``: the output layer sees only those positions' hidden states."""

    b, s = tokens.shape
    inputs = (
        tokens,
        gpt.position_ids(b, s, tokens.device),
        gpt.causal_mask(s, tokens.device),
    )
    core = unwrap(model)
    if first == 0 or not core.post_process:
        return model(*inputs)
    if core.config.sequence_parallel:  # the hidden states are sharded along the sequence there
        return model(*inputs)[:, first:]

    def from_first(module, positional, kwargs):
        return (positional[0][first:], *positional[1:]), kwargs  # hidden states are [s, b, h]

    handle = core.output_layer.register_forward_pre_hook(from_first, with_kwargs=True)
    try:
        return model(*inputs)
    finally:
        handle.remove()


def _schedule(chunks, step_fn, items: list, forward_only: bool, grid: ModelGrid):
    """Megatron's pipeline schedule over ``items`` on ``grid``'s groups."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

    seq = items[0].tokens.shape[1]
    mbs = items[0].tokens.shape[0]
    config = get_model_config(chunks[0])
    variable = any(mb.tokens.shape != (mbs, seq) for mb in items)
    if variable and len(chunks) > 1:
        # the interleaved schedule sends to both neighbours in one batched exchange, which is
        # where gloo mismatches messages (docs/findings.md); its shape exchange does the same
        raise ValueError(
            "micro-batches of different shapes (--max-tokens-per-micro-batch) need "
            "--num-layers-per-virtual-pipeline-stage unset"
        )
    iterator = iter(items) if len(chunks) == 1 else [iter(items) for _ in chunks]
    groups = {}
    pg_collection = grid.model_groups()
    if pg_collection is None:  # the student's: the schedule reads parallel_state (ModelGrid)
        schedule = get_forward_backward_func()
    else:
        from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

        schedule = get_forward_backward_func(pp_size=grid.pp_size, vp_size=None)
        groups = {
            "p2p_communicator": P2PCommunicator(pp_group=grid.pp, config=config),
            "pg_collection": pg_collection,
        }
    # With shapes that differ per micro-batch, each pipeline send is preceded by its shape
    # (p2p_communication._communicate_shapes); seq_length / micro_batch_size are then unused.
    saved = config.variable_seq_lengths
    config.variable_seq_lengths = saved or variable
    try:
        return schedule(
            forward_step_func=step_fn,
            data_iterator=iterator,
            model=chunks,
            num_microbatches=len(items),
            seq_length=seq,
            micro_batch_size=mbs,
            forward_only=forward_only,
            **groups,
        )
    finally:
        config.variable_seq_lengths = saved


@torch.no_grad()
def forward_only(
    chunks: list[torch.nn.Module],
    items: list[MicroBatch],
    vocab_size: int,
    grid: ModelGrid,
    keep_logits: bool = False,
) -> list[Optional[torch.Tensor]]:
    """A frozen model's forward-only pipeline pass on ``grid`` (a teacher, or the student before
    its update). Per micro-batch: the log-probs of the sampled tokens ``[b, s - first]`` fp32, or
    with ``keep_logits`` the logits shard ``[b, s - first, v/tp]`` (positions ``mb.first`` on);
    ``None`` off the last pipeline stage."""
    tp_group = grid.tp

    def step(data_iterator, model):
        mb = next(data_iterator)
        logits = _run_forward(model, mb.tokens, mb.first)

        def collect(output):
            if keep_logits:
                kept = output
            else:
                kept = sampled_token_logprobs(output, mb.logit_targets, vocab_size, tp_group)
            return torch.zeros((), device=output.device), torch.tensor(0), {"out": kept}

        return logits, collect

    for c in chunks:
        c.eval()
    outputs = _schedule(chunks, step, items, forward_only=True, grid=grid)
    if not grid.is_last_stage:
        return [None] * len(items)
    return [o["out"] for o in outputs]


@dataclass
class StepResult:
    applied: bool  # False: update skipped (non-finite values, or no token to train on)
    grad_norm: float
    report: dict[str, float]  # reward statistics and loss, on the last pipeline stage
    empty: bool = False  # no valid response token anywhere in the step: a no-op, not a fault


def _on_every_rank(flag: bool) -> bool:
    """True when ``flag`` holds on every rank."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=models_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item() == 0.0


def _grads_finite(chunks) -> bool:
    total = torch.zeros((), dtype=torch.float64, device=models_device())
    for c in chunks:
        for buffer in getattr(c, "buffers", []):
            total += buffer.grad_data.double().sum()
    return bool(torch.isfinite(total))


def train_step(
    student: list[torch.nn.Module],
    optimizer,
    scheduler,
    items: list[MicroBatch],
    teacher_out: list[Optional[torch.Tensor]],
    reward_cfg: RewardConfig,
    vocab_size: int,
    grid: ModelGrid,
    dump: Optional[list] = None,
) -> StepResult:
    """One optimizer step of the OPD loss over ``items`` (the rank's share of the step), on the
    student's ``grid``.

    The student's log-probs that enter the reward come from this same forward pass, i.e. from the
    weights that sampled the rollouts: the update happens only after every micro-batch. ``dump``
    (a list, last stage only) receives every micro-batch's per-token ``lp_t``, ``lp_s``, ``mask``
    (and ``kl`` for full_vocab_kl), recomputed beside the loss for inspection.
    """
    tp_group, dp_group = grid.tp, grid.dp
    full_logits = reward_cfg.needs_teacher_logits
    if _on_every_rank(sum(int(mb.loss_mask.sum()) for mb in items) == 0):
        # every response was only a (masked) stop token: nothing to learn from, nothing to step
        return StepResult(False, 0.0, {}, empty=True)
    moments = None
    if reward_cfg.needs_step_moments:
        # the pre-update student's log-probs, forward only (the same pass that scores the teacher)
        lp_s = forward_only(student, items, vocab_size, grid)
        if grid.is_last_stage:
            moments = step_log_ratio_moments(
                teacher_out, lp_s, [mb.logit_mask for mb in items], dp_group
            )
    paired = list(zip(items, teacher_out, strict=True))

    def step(data_iterator, model):
        mb, teacher = next(data_iterator)
        logits = _run_forward(model, mb.tokens, mb.first)
        loss_func = None
        if grid.is_last_stage:
            loss_func = opd_loss_func(
                targets=mb.logit_targets,
                loss_mask=mb.logit_mask,
                reward_cfg=reward_cfg,
                vocab_size=vocab_size,
                tp_group=tp_group,
                teacher_logprobs=None if full_logits else teacher,
                teacher_logits=teacher if full_logits else None,
                zscore_moments=moments,
            )
            if dump is not None:
                loss_func = _dumping(loss_func, mb, teacher, full_logits, vocab_size, tp_group,
                                     dump)  # fmt: skip
        return logits, loss_func

    for c in student:
        c.train()
        c.zero_grad_buffer()
    optimizer.zero_grad()
    reports = _schedule(student, step, [_Pair(*p) for p in paired], forward_only=False, grid=grid)
    report = reduce_reports(list(reports) if grid.is_last_stage else [], dp_group)
    finite = _grads_finite(student)
    if report:
        finite = finite and all(
            v == v and abs(v) != float("inf")
            for k, v in report.items()
            if k in ("reward_mean", "loss")
        )
    if not _on_every_rank(finite):
        optimizer.zero_grad()
        for c in student:
            c.zero_grad_buffer()
        return StepResult(False, float("nan"), report)
    applied, grad_norm, _ = optimizer.step()
    if applied:
        scheduler.step(increment=1)
    return StepResult(bool(applied), float(grad_norm or 0.0), report)


def _dumping(loss_func, mb, teacher, full_logits: bool, vocab_size, tp_group, dump):
    def wrapped(output):
        with torch.no_grad():
            out, targets = output.detach(), mb.logit_targets
            entry = {"lp_s": sampled_token_logprobs(out, targets, vocab_size, tp_group)}
            if full_logits:
                entry["lp_t"] = sampled_token_logprobs(teacher, targets, vocab_size, tp_group)
                entry["kl"] = full_vocab_reverse_kl(out, teacher, vocab_size, tp_group)
            else:
                entry["lp_t"] = teacher
        # back to the micro-batch's full width: the positions before mb.first hold 0
        entry = {k: torch.nn.functional.pad(v.cpu(), (mb.first, 0)) for k, v in entry.items()}
        entry["mask"] = mb.loss_mask.cpu()
        dump.append(entry)
        return loss_func(output)

    return wrapped


class _Pair:
    """A micro-batch with the teacher's output for it; quacks like a MicroBatch for shapes."""

    def __init__(self, mb: MicroBatch, teacher: Any):
        self.mb, self.teacher, self.tokens = mb, teacher, mb.tokens

    def __iter__(self):
        return iter((self.mb, self.teacher))
