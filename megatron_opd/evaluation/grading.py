"""Answer grading with math-verify, and the Avg@k / Pass@k metrics.

math-verify enforces its time limits with ``signal.alarm``, which only works in a process's main
thread: call :func:`grade` from the main thread (or from worker processes), never from a thread
pool.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def _math_verify():
    try:
        import math_verify
    except ImportError as e:  # the `eval` extra
        raise ImportError("grading needs math-verify: pip install 'megatron-opd[eval]'") from e
    return math_verify


def parse_gold(answer: str):
    """Gold answers are LaTeX without delimiters: wrap them in ``$…$`` so that ``3\\sqrt{13}``
    parses whole rather than as ``3``."""
    mv = _math_verify()
    text = answer.strip()
    if not (text.startswith("$") or text.startswith("\\(")):
        text = f"${text}$"
    return mv.parse(text)


def grade(completion: str, gold: str) -> bool:
    """True when the completion's final answer (its last ``\\boxed{}``, else its last expression)
    equals the gold answer."""
    mv = _math_verify()
    gold_parsed = parse_gold(gold)
    if not gold_parsed:
        return False
    pred = mv.parse(completion)
    if not pred:
        return False
    return bool(mv.verify(gold_parsed, pred))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k from ``n`` samples of which ``c`` are correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n:
        raise ValueError(f"correct count {c} outside [0, {n}]")
    if k > n:
        raise ValueError(f"Pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@dataclass
class BenchmarkScore:
    name: str
    problems: int
    samples_per_problem: int
    avg_at_k: float  # percent
    pass_at_k: float  # percent
    mean_response_tokens: float
    truncation_rate: float  # percent

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def score_benchmark(
    name: str,
    correct: Sequence[Sequence[bool]],
    lengths: Sequence[Sequence[int]],
    truncated: Sequence[Sequence[bool]],
    k: int,
) -> BenchmarkScore:
    """``correct[i][j]``: sample j of problem i. Avg@k is the mean accuracy over all samples;
    Pass@k the mean over problems of the unbiased estimator (exact when n == k)."""
    if not correct:
        raise ValueError(f"{name}: no problems to score")
    n = len(correct[0])
    if any(len(row) != n for row in correct):
        raise ValueError(f"{name}: every problem needs the same number of samples")
    avg = sum(sum(row) for row in correct) / (len(correct) * n)
    pk = sum(pass_at_k(n, sum(row), k) for row in correct) / len(correct)
    flat_len = [x for row in lengths for x in row]
    flat_trunc = [x for row in truncated for x in row]
    return BenchmarkScore(
        name=name,
        problems=len(correct),
        samples_per_problem=n,
        avg_at_k=100.0 * avg,
        pass_at_k=100.0 * pk,
        mean_response_tokens=sum(flat_len) / max(1, len(flat_len)),
        truncation_rate=100.0 * sum(flat_trunc) / max(1, len(flat_trunc)),
    )
