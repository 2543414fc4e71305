"""The toy task: add a list of numbers, showing the running sum, answer in ``\\boxed{}``.

    problem   Add: 37 + 85 + 6 + 24
    solution  37 + 85 = 122
              122 + 6 = 128
              128 + 24 = 152
              \\boxed{152}

Every intermediate sum is checkable and the gold answer is exact, so math-verify grades it like any
of the math sets. Problems are in the project's ``{problem, answer}`` form (the prompt data readers
add the usual "Please reason step by step ..." instruction and the chat template), written as
jsonl files that ``scripts/pretrain_opd.py --prompt-data`` and ``--eval-data`` read unchanged.

The tokenizer is a real Hugging Face one: byte-level BPE trained on this task's text, with every
digit its own token (the digits of a sum are predicted one by one) and ChatML turns.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from megatron_opd.runtime.checkpointing import write_text_atomic
from megatron_opd.training.data import BOXED_INSTRUCTION


@dataclass(frozen=True)
class TaskConfig:
    min_terms: int = 2
    max_terms: int = 5
    max_value: int = 20


def sample_terms(rng: random.Random, cfg: TaskConfig) -> list[int]:
    n = rng.randint(cfg.min_terms, cfg.max_terms)
    return [rng.randint(1, cfg.max_value) for _ in range(n)]


def problem_text(terms: list[int]) -> str:
    return "Add: " + " + ".join(str(t) for t in terms)


def worked_solution(terms: list[int]) -> str:
    lines, total = [], terms[0]
    for t in terms[1:]:
        lines.append(f"{total} + {t} = {total + t}")
        total += t
    lines.append(f"\\boxed{{{total}}}")
    return "\n".join(lines)


def problems(n: int, seed: int, cfg: TaskConfig = TaskConfig()) -> list[list[int]]:
    rng = random.Random(seed)
    return [sample_terms(rng, cfg) for _ in range(n)]


def write_problems(path: Path, items: list[list[int]]) -> Path:
    """``{problem, answer}`` jsonl, written under a temporary name and renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = ({"problem": problem_text(t), "answer": str(sum(t))} for t in items)
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


def save_tokenizer(directory: Path) -> None:
    """Byte-level BPE over this task's prompts and solutions; digits always split."""
    from megatron_opd.models.tiny import save_bpe_tokenizer

    corpus = [BOXED_INSTRUCTION]
    corpus += [problem_text(t) + "\n" + worked_solution(t) for t in problems(500, seed=99)]
    save_bpe_tokenizer(directory, vocab_size=384, corpus=corpus, split_digits=True)
