"""Math evaluation: k samples per problem through the Megatron inference engine, graded, scored.

Used by ``scripts/evaluate.py`` and by ``--eval-interval`` in ``scripts/pretrain_opd.py``. Problems
are split across data-parallel ranks; each rank samples and grades its share (math-verify runs in
the main thread), and the records are gathered so every rank returns the same scores.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_opd import compat
from megatron_opd.evaluation import grading
from megatron_opd.rollout.generation import generate
from megatron_opd.runtime.checkpointing import write_text_atomic
from megatron_opd.runtime.distributed import ModelGrid, is_rank0
from megatron_opd.training import data


@dataclass
class EvalConfig:
    samples: int = 8  # k
    temperature: float = 0.6
    top_p: float = 0.0
    max_new_tokens: int = 4096
    limit: Optional[int] = None  # problems per benchmark
    max_prompt_length: int = 2048
    system_prompt: Optional[str] = None
    batch_size: int = 64
    seed: int = 1234

    def validate(self) -> None:
        if self.samples < 1:
            raise ValueError(f"--samples must be >= 1, got {self.samples}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")


def benchmark_name(spec: str) -> str:
    return Path(spec).stem if not spec.startswith(data.BUILTIN) else spec.replace(":", "_")


def load_benchmarks(specs: Sequence[str], limit: Optional[int], seed: int = 0) -> dict:
    """``{name: problems}`` for files or ``builtin[:N]`` specs (the built-in set uses ``seed``)."""
    out = {}
    for spec in specs:
        problems = data.load_prompt_source(spec, seed=seed)
        out[benchmark_name(spec)] = problems[:limit] if limit else problems
    return out


def rank_jobs(problems, tokenizer, cfg, grid: ModelGrid):
    """The benchmark's prompts and this DP rank's share (on ``grid``) of its
    ``(problem, sample)`` jobs."""
    prompts = data.PromptSet.build(problems, tokenizer, cfg.max_prompt_length, cfg.system_prompt)
    jobs = [(i, j) for i in range(len(prompts)) for j in range(cfg.samples)]
    return prompts, jobs[grid.dp_rank :: grid.dp_size]


def gather_records(local: list[dict[str, Any]], grid: ModelGrid) -> list[dict[str, Any]]:
    """Every data-parallel rank's records of one benchmark, on every rank, in
    ``(problem, sample)`` order."""
    if grid.dp_size > 1:
        gathered: list = [None] * grid.dp_size
        dist.all_gather_object(gathered, local, group=grid.dp)
        local = [r for part in gathered for r in part]
    local.sort(key=lambda r: (r["index"], r["sample"]))
    return local


def sample_jobs(
    sampler, tokenizer, token_ids, jobs, cfg, seed: int, grid: ModelGrid, progress=None,
    **sampling,
) -> list:  # fmt: skip
    """One generation per ``(prompt index, sample)`` job of this rank, ``cfg.batch_size`` at a
    time. ``sampler``: the model chunks on ``grid``, or the student's rollout copy
    (:class:`megatron_opd.rollout.refit.RolloutModel`), whose ``generate`` is collective over the
    world: then every rank runs as many batches as the rank with the most (empty ones included)."""
    dp_rank = grid.dp_rank
    shared = hasattr(sampler, "generate")
    starts = list(range(0, len(jobs), cfg.batch_size))
    if shared:
        most = torch.tensor([len(starts)], device=compat.default_device())
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        starts = [k * cfg.batch_size for k in range(int(most))]
    out = []
    for start in progress(starts) if progress else starts:
        batch = [token_ids[i] for i, _ in jobs[start : start + cfg.batch_size]]
        kwargs = dict(sampling, max_new_tokens=cfg.max_new_tokens, max_batch_size=cfg.batch_size)
        if shared:  # each rollout replica adds its own index
            out += sampler.generate(tokenizer, batch, seed=seed + start, **kwargs)
        else:
            out += generate(sampler, tokenizer, batch, seed=seed + 7919 * dp_rank + start, **kwargs)
    return out


def evaluate(
    model_chunks: list,
    tokenizer,
    benchmarks: dict[str, list[data.Problem]],
    cfg: EvalConfig,
    grid: ModelGrid,
    progress: bool = True,
    keep_token_ids: bool = False,
) -> tuple[list[grading.BenchmarkScore], list[dict[str, Any]]]:
    """Scores per benchmark (in the given order) and one record per completion (with
    ``keep_token_ids`` its ``response_ids``, for ``gap.evaluate_gap`` to reuse); the problems
    split over ``grid``'s data-parallel ranks (the student's: ``model_chunks``' grid)."""
    cfg.validate()
    records: list[dict[str, Any]] = []
    for name, problems in benchmarks.items():
        prompts, mine = rank_jobs(problems, tokenizer, cfg, grid)
        generations = sample_jobs(
            model_chunks, tokenizer, prompts.token_ids, mine, cfg, cfg.seed, grid,
            temperature=cfg.temperature or 1.0, top_p=cfg.top_p, greedy=cfg.temperature == 0,
            progress=functools.partial(_progress, enabled=progress, name=name, cfg=cfg),
        )  # fmt: skip
        local = []
        for (i, j), gen in zip(mine, generations, strict=True):
            text = tokenizer.decode(gen.tokens, skip_special_tokens=True)
            local.append(
                {
                    "benchmark": name,
                    "index": i,
                    "sample": j,
                    "problem": prompts.problems[i].problem,
                    "gold": prompts.problems[i].answer,
                    "completion": text,
                    "correct": grading.grade(text, prompts.problems[i].answer),
                    "response_tokens": len(gen.tokens),
                    "truncated": gen.truncated,
                    **({"response_ids": gen.tokens} if keep_token_ids else {}),
                }
            )
        records += gather_records(local, grid)
    return scores_from_records(records, cfg.samples, list(benchmarks)), records


def scores_from_records(
    records: Sequence[dict[str, Any]], k: int, order: Optional[Sequence[str]] = None
) -> list[grading.BenchmarkScore]:
    """Recount every score from per-completion records (what ``evaluate`` itself returns)."""
    by_bench: dict[str, dict[int, list[dict]]] = {}
    for r in records:
        by_bench.setdefault(r["benchmark"], {}).setdefault(r["index"], []).append(r)
    scores = []
    for name in order or list(by_bench):
        rows = [sorted(v, key=lambda r: r["sample"]) for _, v in sorted(by_bench[name].items())]
        scores.append(
            grading.score_benchmark(
                name,
                [[r["correct"] for r in row] for row in rows],
                [[r["response_tokens"] for r in row] for row in rows],
                [[r["truncated"] for r in row] for row in rows],
                k,
            )
        )
    return scores


def summary(scores: Sequence[grading.BenchmarkScore]) -> dict[str, float]:
    n = len(scores)
    return {
        "avg_at_k": sum(s.avg_at_k for s in scores) / n,
        "pass_at_k": sum(s.pass_at_k for s in scores) / n,
        "mean_response_tokens": sum(s.mean_response_tokens for s in scores) / n,
        "truncation_rate": sum(s.truncation_rate for s in scores) / n,
    }


def metrics(scores: Sequence[grading.BenchmarkScore], k: int) -> dict[str, float]:
    """Flat ``eval/<benchmark>/<key>`` numbers for the metrics logger, and ``eval/mean/*``."""
    out = {}
    for s in scores:
        out[f"eval/{s.name}/avg_at_{k}"] = s.avg_at_k
        out[f"eval/{s.name}/pass_at_{k}"] = s.pass_at_k
        out[f"eval/{s.name}/mean_len"] = s.mean_response_tokens
        out[f"eval/{s.name}/truncated_pct"] = s.truncation_rate
    for key, value in summary(scores).items():
        out[f"eval/mean/{key}"] = value
    return out


def markdown_table(scores: Sequence[grading.BenchmarkScore], k: int) -> str:
    lines = [
        f"| benchmark | problems | Avg@{k} | Pass@{k} | mean length | truncated % |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s in scores:
        lines.append(
            f"| {s.name} | {s.problems} | {s.avg_at_k:.2f} | {s.pass_at_k:.2f} | "
            f"{s.mean_response_tokens:.1f} | {s.truncation_rate:.1f} |"
        )
    m = summary(scores)
    lines.append(
        f"| **mean** | | {m['avg_at_k']:.2f} | {m['pass_at_k']:.2f} | "
        f"{m['mean_response_tokens']:.1f} | {m['truncation_rate']:.1f} |"
    )
    return "\n".join(lines) + "\n"


def write_outputs(
    out_dir: str | Path,
    scores: Sequence[grading.BenchmarkScore],
    records: Sequence[dict[str, Any]],
    k: int,
    extra: Optional[dict[str, Any]] = None,
) -> None:
    """``results.json``, ``results.md`` and ``completions.jsonl``, each written atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "k": k,
        "benchmarks": {s.name: s.as_dict() for s in scores},
        "mean": summary(scores),
        **(extra or {}),
    }
    write_text_atomic(out / "results.json", json.dumps(result, indent=2))
    write_text_atomic(out / "results.md", markdown_table(scores, k))
    write_text_atomic(out / "completions.jsonl", "".join(json.dumps(r) + "\n" for r in records))


def _progress(it, enabled: bool, name: str, cfg: EvalConfig):
    if not (enabled and is_rank0()):
        return it
    from tqdm import tqdm

    return tqdm(it, desc=f"eval {name}", unit=f"batch of {cfg.batch_size}")
