"""The distillation gap: how far the student is from its teacher, measured on the student's samples.

For each response ``o`` the student samples at temperature 1 over the true vocabulary, at every
response position ``t`` (the final stop token included: the student chose it):

    kl_t           KL(pi_S(. | o_<t) || pi_T(. | o_<t)), exact over the whole vocabulary
    tv_t           total variation 1/2 sum_v |pi_S(v) - pi_T(v)|, exact (the sign reward's target)
    power_div_a_t  sum_v [pi_S^(1+a) - (1+a) pi_T^a pi_S + a pi_T^(1+a)] at each requested a
                   (the Bregman divergence of x^(1+a) that PowerOPD's expected update descends;
                   the run's --opd-alpha in training; see ``megatron_opd.reward.divergences``)
    teacher_nll_t  -log pi_T(o_t | o_<t)
    log_ratio_t    log pi_T(o_t) - log pi_S(o_t)  (its mean estimates -KL; OPD trains on it)
    entropy_t      H(pi_S(. | o_<t))

Summaries are token means over every response token of a benchmark (``*_per_token``), plus the
mean response length. Which yardstick a reward should be judged on depends on the reward: the
log-ratio descends the KL in expectation, PowerOPD the power divergence at its alpha, the sign
reward the total variation; accuracy, where the task can be scored, judges them all.

The teacher and the student sit on the same TP x PP grid (the student's, passed in as ``grid``);
the per-position numbers come from the
project's vocab-parallel ops on the last pipeline stage (no rank holds more than its logits shard)
and every rank of a data-parallel group gets them.

:class:`GapWatch` turns a series of gaps into one warning when it keeps growing.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_opd import compat
from megatron_opd.evaluation.accuracy import gather_records, rank_jobs, sample_jobs
from megatron_opd.models import convert
from megatron_opd.reward.divergences import vocab_parallel_divergences
from megatron_opd.reward.entropy import vocab_parallel_entropy
from megatron_opd.reward.vocab_parallel import full_vocab_reverse_kl, sampled_token_logprobs
from megatron_opd.runtime import checkpointing
from megatron_opd.runtime.distributed import ModelGrid
from megatron_opd.training import opd

# per-response sums, in this order, in every record (``tokens`` is the count they are over),
# then one ``power_div_<a>_sum`` per requested alpha (:func:`sum_keys`)
SUM_KEYS = ("kl_sum", "teacher_nll_sum", "log_ratio_sum", "entropy_sum", "tv_sum")


def power_key(alpha: float) -> str:
    """The name of the power divergence at ``alpha`` (``power_div_5`` for 5.0)."""
    return f"power_div_{alpha:g}"


def sum_keys(power_alphas: Sequence[float] = ()) -> tuple[str, ...]:
    return SUM_KEYS + tuple(power_key(a) + "_sum" for a in power_alphas)


def _to_every_stage(
    sums: Optional[torch.Tensor], rows: int, width: int, grid: ModelGrid
) -> torch.Tensor:
    """The last pipeline stage's ``[rows, width]`` float64 sums, on every stage of ``grid``."""
    if grid.pp_size == 1:
        return sums
    out = sums if sums is not None else torch.zeros(rows, width, dtype=torch.float64)
    out = out.to(compat.default_device()).contiguous()
    dist.broadcast(out, src=grid.last_stage_rank, group=grid.pp)
    return out


def score_responses(
    student: list[torch.nn.Module],
    teacher: list[torch.nn.Module],
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    vocab_size: int,
    pad_id: int,
    grid: ModelGrid,
    micro_batch_size: int = 4,
    power_alphas: Sequence[float] = (),
) -> list[dict[str, float]]:
    """Per response: ``tokens`` and the sums of ``sum_keys(power_alphas)`` over its tokens
    (float64), the student and the teacher both on ``grid``.

    Every rank of a model-parallel group must pass the same rows; each rank gets all of them.
    Rows go through the teacher and then the student one micro-batch at a time (rows of similar
    length together), so the last stage never holds more than one micro-batch of logits per model.
    """
    if len(prompts) != len(responses):
        raise ValueError("one response per prompt")
    keys = sum_keys(power_alphas)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
    out: list[Optional[dict[str, float]]] = [None] * len(prompts)
    for c in student + teacher:
        c.eval()
    for start in range(0, len(order), micro_batch_size):
        rows = order[start : start + micro_batch_size]
        item = _micro_batch([prompts[i] for i in rows], [responses[i] for i in rows], pad_id)
        (teacher_logits,) = opd.forward_only(teacher, [item], vocab_size, grid, keep_logits=True)
        sums = _student_pass(student, item, teacher_logits, vocab_size, grid, power_alphas)
        sums = _to_every_stage(sums, len(rows), 1 + len(keys), grid)
        for row, values in zip(rows, sums.tolist(), strict=False):
            out[row] = {"tokens": int(values[0]), **dict(zip(keys, values[1:], strict=True))}
    return out


def _micro_batch(prompts, responses, pad_id: int) -> opd.MicroBatch:
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
    tokens = torch.full((len(prompts), max(lengths) + 1), pad_id, dtype=torch.long)
    for row, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        tokens[row, : lengths[row]] = torch.tensor(list(p) + list(r), dtype=torch.long)
    batch = opd.RolloutBatch(
        tokens=tokens,
        prompt_lengths=torch.tensor([len(p) for p in prompts]),
        response_lengths=torch.tensor([len(r) for r in responses]),
        truncated=torch.ones(len(prompts), dtype=torch.bool),  # "truncated": score every token
    )
    (item,) = opd.micro_batches(batch, len(prompts), mask_terminal_stop=False, pad_id=pad_id)
    return item


@torch.no_grad()
def _student_pass(student, item, teacher_logits, vocab_size: int, grid: ModelGrid,
                  power_alphas=()):  # fmt: skip
    tp_group = grid.tp

    def step(data_iterator, model):
        mb = next(data_iterator)
        logits = opd._run_forward(model, mb.tokens, mb.first)

        def collect(output):
            mask, targets = mb.logit_mask.bool(), mb.logit_targets
            lp_s = sampled_token_logprobs(output, targets, vocab_size, tp_group)
            lp_t = sampled_token_logprobs(teacher_logits, targets, vocab_size, tp_group)
            tv, power = vocab_parallel_divergences(
                output, teacher_logits, vocab_size, tp_group, power_alphas
            )
            per_token = torch.stack(
                [
                    mask.double(),
                    full_vocab_reverse_kl(output, teacher_logits, vocab_size, tp_group).double(),
                    -lp_t.double(),
                    (lp_t.double() - lp_s.double()),
                    vocab_parallel_entropy(output, vocab_size, tp_group).double(),
                    tv,
                    *power,
                ],
                dim=-1,
            )
            sums = torch.where(mask.unsqueeze(-1), per_token, 0.0).sum(dim=1)  # [b, 6 + alphas]
            return torch.zeros((), device=output.device), torch.tensor(0), {"sums": sums}

        return logits, collect

    outputs = opd._schedule(student, step, [item], forward_only=True, grid=grid)
    return outputs[0]["sums"].cpu() if grid.is_last_stage else None


# ---------------------------------------------------------------------------------------------
# summaries


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Token means over every response token of ``records`` and the mean response length."""
    tokens = sum(r["tokens"] for r in records)
    n = max(tokens, 1)
    out = {
        "kl_per_token": sum(r["kl_sum"] for r in records) / n,
        "teacher_nll_per_token": sum(r["teacher_nll_sum"] for r in records) / n,
        "log_ratio_mean": sum(r["log_ratio_sum"] for r in records) / n,
        "student_entropy": sum(r["entropy_sum"] for r in records) / n,
        "tv_per_token": sum(r["tv_sum"] for r in records) / n,
    }
    powers = [k for k in (records[0] if records else {}) if k.startswith("power_div_")]
    for key in powers:
        out[key[: -len("_sum")] + "_per_token"] = sum(r[key] for r in records) / n
    out.update(mean_response_tokens=tokens / max(len(records), 1), responses=float(len(records)))
    return out


def summaries_by_benchmark(
    records: Sequence[dict[str, Any]], order: Optional[Sequence[str]] = None
) -> dict[str, dict[str, float]]:
    """``{benchmark: summarize(its records)}`` plus ``"mean"``: every record of every benchmark."""
    names = list(order) if order else list(dict.fromkeys(r["benchmark"] for r in records))
    out = {n: summarize([r for r in records if r["benchmark"] == n]) for n in names}
    out["mean"] = summarize(records)
    return out


def markdown_table(summaries: dict[str, dict[str, float]]) -> str:
    first = next(iter(summaries.values()), {})
    powers = [k for k in first if k.startswith("power_div_")]
    alphas = [k[len("power_div_") : -len("_per_token")] for k in powers]
    lines = [
        "| benchmark | responses | KL(π_S‖π_T) / token | TV / token | "
        + "".join(f"D_α={a} / token | " for a in alphas)
        + "teacher NLL / token | mean log π_T − log π_S | student entropy | mean length |",
        "|---|---:|---:|---:|" + "---:|" * len(alphas) + "---:|---:|---:|---:|",
    ]
    for name, s in summaries.items():
        label = "**mean**" if name == "mean" else name
        lines.append(
            f"| {label} | {s['responses']:.0f} | {s['kl_per_token']:.4f} | "
            f"{s['tv_per_token']:.4f} | "
            + "".join(f"{s[k]:.4g} | " for k in powers)
            + f"{s['teacher_nll_per_token']:.4f} | {s['log_ratio_mean']:.4f} | "
            f"{s['student_entropy']:.4f} | {s['mean_response_tokens']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def metrics(summaries: dict[str, dict[str, float]]) -> dict[str, float]:
    """Flat ``gap/<benchmark>/<key>`` numbers for the metrics logger."""
    return {
        f"gap/{name}/{key}": value
        for name, s in summaries.items()
        for key, value in s.items()
        if key != "responses"
    }


# ---------------------------------------------------------------------------------------------
# the warning


@dataclass
class GapWatch:
    """Warns once (stderr) when a gap grew ``patience`` times in a row, by ``min_growth`` overall.

    ``window`` > 1 compares means of consecutive windows of that many values (for noisy per-step
    numbers such as the sampled log-ratio); 1 compares the values themselves (evaluations). The
    overall growth (relative to the value before the streak) keeps noise on a plateau from warning.
    """

    what: str
    patience: int = 3
    window: int = 1
    min_growth: float = 0.1
    hint: str = ""
    enabled: bool = True
    _pending: list[float] = field(default_factory=list)
    _history: list[float] = field(default_factory=list)
    warned: bool = False

    def update(self, value: float, step: int) -> bool:
        """Feed one value; True when this call warned."""
        if value != value:  # NaN: a step without tokens says nothing
            return False
        self._pending.append(value)
        if len(self._pending) < self.window:
            return False
        self._history.append(sum(self._pending) / len(self._pending))
        self._pending = []
        last = self._history[-self.patience - 1 :]
        if self.warned or len(last) <= self.patience:
            return False
        rising = all(b > a for a, b in zip(last, last[1:], strict=False))
        if not (rising and last[-1] - last[0] >= self.min_growth * abs(last[0])):
            return False
        self.warned = True
        if self.enabled:
            print(
                f"WARNING (iteration {step}): {self.what} grew {self.patience} times in a row, "
                f"{last[0]:.4g} -> {last[-1]:.4g}: the student is moving away from the teacher. "
                f"{self.hint}",
                file=sys.stderr,
                flush=True,
            )
        return True


HINT = (
    "Lower --lr (Adam takes steps of about lr per weight whatever the gradient's size), raise "
    "--global-batch-size, or use --opd-reward full_vocab_kl; see docs/learning-dynamics.md."
)


# ---------------------------------------------------------------------------------------------
# on held-out prompts


def samples_are_reusable(temperature: float, top_p: float, top_k: int = 0) -> bool:
    """Avg@k samples drawn like this are the student's own samples at temperature 1."""
    return temperature == 1.0 and top_p in (0.0, 1.0) and top_k == 0


def evaluate_gap(
    student: list[torch.nn.Module],
    teacher: list[torch.nn.Module],
    tokenizer,
    benchmarks: dict,
    cfg,
    vocab_size: int,
    grid: ModelGrid,
    records: Optional[Sequence[dict[str, Any]]] = None,
    micro_batch_size: int = 4,
    sampler=None,
    power_alphas: Sequence[float] = (),
) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """The gap on ``cfg.samples`` student samples per held-out problem, and one record per sample;
    the student and the teacher on ``grid``.

    ``cfg`` is the :class:`~megatron_opd.evaluation.accuracy.EvalConfig` of the Avg@k evaluation
    (prompts, k, limits, seed). ``records``: that evaluation's records with ``response_ids`` (see
    ``evaluation.evaluate(keep_token_ids=True)``), reused when they were sampled at temperature 1
    without top-p; otherwise the student samples afresh at temperature 1 over the true vocabulary
    (from ``sampler``, the student's rollout copy, when given). ``power_alphas``: the alphas of
    the power divergences to report.
    """
    reuse = None
    if records is not None:
        reuse = {(r["benchmark"], r["index"], r["sample"]): r["response_ids"] for r in records}
    out: list[dict[str, Any]] = []
    for name, problems in benchmarks.items():
        prompts, mine = rank_jobs(problems, tokenizer, cfg, grid)
        if reuse is not None:
            responses = [reuse[(name, i, j)] for i, j in mine]
        else:  # seeds apart from the Avg@k draws
            gens = sample_jobs(
                sampler or student, tokenizer, prompts.token_ids, mine, cfg, cfg.seed + 104_729,
                grid, temperature=1.0,
            )  # fmt: skip
            responses = [g.tokens for g in gens]
        local = []
        if mine:
            sums = score_responses(
                student,
                teacher,
                [prompts.token_ids[i] for i, _ in mine],
                responses,
                vocab_size,
                tokenizer.pad_id,
                grid,
                micro_batch_size,
                power_alphas,
            )
            for (i, j), ids, s in zip(mine, responses, sums, strict=True):
                local.append({"benchmark": name, "index": i, "sample": j, **s, "response_ids": ids})
        out += gather_records(local, grid)
    return summaries_by_benchmark(out, list(benchmarks)), out


class TrainingGapWatch:
    """The trainer's side: the held-out gap at every ``--eval-interval`` (teacher: the run's own,
    or ``--eval-teacher``) and the two warnings, held-out KL and the steps' sampled gap."""

    def __init__(self, teacher, micro_batch_size: int, power_alpha: float,
                 eval_teacher: Optional[list[torch.nn.Module]] = None) -> None:  # fmt: skip
        """``teacher``: the run's :class:`megatron_opd.training.teacher.TeacherSet` (its gap
        teacher: the only teacher when it sits on the student's grid) or ``None``;
        ``eval_teacher``: the chunks of ``--eval-teacher`` (:func:`load_eval_teacher`), which take
        its place. ``power_alpha``: the power divergence reported beside the KL (the run's
        ``--opd-alpha``)."""
        self.micro_batch_size, self.power_alpha = micro_batch_size, power_alpha
        self.teacher = None if teacher is None else teacher.chunks_on_student_grid
        if eval_teacher is not None:
            self.teacher = eval_teacher
        last = not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1
        both = dict(patience=3, hint=HINT, enabled=last)
        # evaluations reuse one sampling seed, so they are far less noisy than single steps
        self.held_out = GapWatch("the held-out KL(pi_S || pi_T) per token", min_growth=0.02, **both)
        self.sampled = GapWatch(
            "the sampled gap (mean log pi_S - log pi_T over each step's tokens, means of 5 steps)",
            window=5,
            **both,
        )

    def step(self, iteration: int, metrics: dict[str, float]) -> None:
        log_ratio = metrics.get("reward/log_ratio_mean")  # only the last pipeline stage has it
        if log_ratio is not None:
            self.sampled.update(-log_ratio, iteration)

    def evaluate(
        self, student, grid: ModelGrid, sampler, tokenizer, benchmarks, cfg, vocab_size: int,
        iteration: int, records: Sequence[dict[str, Any]],
    ) -> dict[str, float]:  # fmt: skip
        """The held-out gap after ``iteration`` steps of ``student`` (on its ``grid``), on what
        ``sampler`` sampled for the scores (``records``, reused when the sampling settings
        allow)."""
        reusable = samples_are_reusable(cfg.temperature, cfg.top_p)
        summaries, _ = evaluate_gap(
            student,
            self.teacher,
            tokenizer,
            benchmarks,
            cfg,
            vocab_size,
            grid,
            records=records if reusable else None,
            micro_batch_size=self.micro_batch_size,
            sampler=sampler,
            power_alphas=(self.power_alpha,),
        )
        self.held_out.update(summaries["mean"]["kl_per_token"], iteration)
        return metrics(summaries)


def load_eval_teacher(path: str, student_path: str, grid: ModelGrid) -> list[torch.nn.Module]:
    """``--eval-teacher``'s chunks on the student's ``grid``."""
    directory = checkpointing.resolve_checkpoint(path)
    student_arch, _ = convert.read_checkpoint(checkpointing.resolve_checkpoint(student_path))
    chunks, arch = convert.load_checkpoint_model(directory, grid)
    if arch.vocab_size != student_arch.vocab_size:
        raise ValueError(
            f"--eval-teacher: its vocabulary ({arch.vocab_size} tokens) differs from the "
            f"student's ({student_arch.vocab_size})"
        )
    for c in chunks:
        c.eval()
    return chunks
