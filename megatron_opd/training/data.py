"""Prompt data: readers for the math sets, a built-in arithmetic set, a resumable shuffled stream.

Every reader returns a list of :class:`Problem` (``problem``, ``answer``: the gold as a LaTeX string
without ``$`` or ``\\boxed{}``). Formats:

* ``{problem, answer}`` jsonl (AIME, AMC, MATH-500, Minerva, OlympiadBench);
* GSM8K jsonl ``{question, answer}`` with the gold number after ``#### ``;
* a JSON list of ``{problem, answer, ...}`` (DeepScaleR).

A malformed line or a missing key is a ``ValueError`` naming the file and the line number.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class Problem:
    problem: str
    answer: str
    source: str = ""
    teacher: Optional[int] = None  # index into --opd-teacher-load this prompt is scored by


def _require(obj: Any, keys: Sequence[str], where: str) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in keys:
        if key not in obj:
            raise ValueError(f"{where}: missing key {key!r}")


def with_instruction(text: str) -> str:
    text = text.rstrip()
    return text if BOXED_INSTRUCTION in text else f"{text}\n{BOXED_INSTRUCTION}"


def gsm8k_gold(answer: str, where: str = "gsm8k") -> str:
    if "####" not in answer:
        raise ValueError(f"{where}: GSM8K answer has no '#### ' gold marker")
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    rows = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
    return rows


def load_problems(path: str | Path, add_instruction: bool = True) -> list[Problem]:
    """Read any of the three formats (chosen by extension and keys)."""
    path = Path(path)
    name = path.stem
    if path.suffix == ".json":
        if not path.exists():
            raise FileNotFoundError(f"prompt file {path} does not exist")
        try:
            items = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(items, list):
            raise ValueError(f"{path}: expected a JSON list of {{problem, answer}} objects")
        rows = [(f"{path} item {i}", item) for i, item in enumerate(items)]
    else:
        rows = [(f"{path}:{lineno}", obj) for lineno, obj in read_jsonl(path)]
    out = []
    for where, obj in rows:
        if isinstance(obj, dict) and "question" in obj and "problem" not in obj:
            _require(obj, ("question", "answer"), where)
            problem, answer = obj["question"], gsm8k_gold(str(obj["answer"]), where)
        else:
            _require(obj, ("problem", "answer"), where)
            problem, answer = obj["problem"], str(obj["answer"])
        if add_instruction:
            problem = with_instruction(problem)
        out.append(Problem(problem, answer, name, _teacher_field(obj, where)))
    return out


def _teacher_field(obj: dict, where: str) -> Optional[int]:
    """The optional ``teacher`` routing field: a 0-based index into --opd-teacher-load."""
    value = obj.get("teacher")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where}: 'teacher' must be a 0-based teacher index, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# Built-in prompt set: seeded arithmetic word problems with exact integer answers

_NAMES = ("Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goro", "Hana", "Ivan", "Jun", "Kofi")
_ITEMS = ("apples", "marbles", "stickers", "books", "coins", "pencils", "shells", "cards")


def _word_problem(rng: random.Random) -> tuple[str, int]:
    name, other = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    kind = rng.randrange(5)
    a, b, c = rng.randint(2, 40), rng.randint(2, 30), rng.randint(2, 9)
    if kind == 0:
        return f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have?", a + b
    if kind == 1:
        a = a + b
        return (
            f"{name} has {a} {item} and gives {b} to {other}. "
            f"How many {item} does {name} have left?",
            a - b,
        )
    if kind == 2:
        return (
            f"{name} buys {c} boxes with {b} {item} in each box. How many {item} is that in total?",
            b * c,
        )
    if kind == 3:
        total = b * c
        return (
            f"{name} shares {total} {item} equally among {c} friends. "
            f"How many {item} does each friend get?",
            b,
        )
    return (
        f"{name} has {a} {item}. {other} has {c} times as many {item} as {name}, then loses {b}. "
        f"How many {item} does {other} have now?",
        a * c - b,
    )


def builtin_problems(n: int, seed: int = 0, add_instruction: bool = True) -> list[Problem]:
    """``n`` arithmetic word problems with exact answers; the same ``seed`` gives the same set."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text, answer = _word_problem(rng)
        out.append(
            Problem(with_instruction(text) if add_instruction else text, str(answer), "builtin")
        )
    return out


BUILTIN = "builtin"


def load_prompt_source(spec: str, builtin_size: int = 2000, seed: int = 0) -> list[Problem]:
    """``builtin`` (or ``builtin:N``) for the built-in set; otherwise a file path."""
    if spec == BUILTIN or spec.startswith(BUILTIN + ":"):
        size = int(spec.split(":", 1)[1]) if ":" in spec else builtin_size
        return builtin_problems(size, seed)
    return load_problems(spec)


# --------------------------------------------------------------------------------------------
# Tokenized prompts and the resumable stream


@dataclass
class PromptSet:
    """Problems with their chat-templated token ids; prompts over ``max_prompt_tokens`` dropped."""

    problems: list[Problem]
    token_ids: list[list[int]]
    dropped: int = 0

    @classmethod
    def build(
        cls,
        problems: Sequence[Problem],
        tokenizer,
        max_prompt_tokens: int,
        system_prompt: Optional[str] = None,
    ) -> PromptSet:
        kept, ids, dropped = [], [], 0
        for p in problems:
            messages = [{"role": "user", "content": p.problem}]
            if system_prompt:
                messages.insert(0, {"role": "system", "content": system_prompt})
            tokens = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
            if len(tokens) > max_prompt_tokens:
                dropped += 1
                continue
            kept.append(p)
            ids.append(tokens)
        if not kept:
            raise ValueError(
                f"every prompt is longer than {max_prompt_tokens} tokens; raise --max-prompt-length"
            )
        return cls(kept, ids, dropped)

    def __len__(self) -> int:
        return len(self.problems)


def draw_step(prompts: PromptSet, stream: PromptStream, batch: int,
              samples: int) -> tuple[list[list[int]], list[int]]:  # fmt: skip
    """One step's prompts for the whole batch in data-parallel order (each repeated ``samples``
    times), and the teacher each row is routed to (the prompt's ``teacher`` field, else 0): the
    one draw of the trainer and of the rollout ranks, so both see the same prompts."""
    chosen = stream.take(batch // samples)
    rows = [list(prompts.token_ids[i]) for i in chosen for _ in range(samples)]
    routes = [prompts.problems[i].teacher or 0 for i in chosen for _ in range(samples)]
    return rows, routes


@dataclass
class PromptStream:
    """An endless, seeded shuffle over a prompt set; ``state_dict`` saves the position.

    Every epoch is a fresh permutation drawn from ``seed + epoch``, so a resumed run that restores
    (epoch, position) sees exactly the prompts a straight run would have seen.
    """

    size: int
    seed: int = 0
    epoch: int = 0
    position: int = 0
    _order: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._order = self._permutation(self.epoch)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(self.size))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def take(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if self.position >= self.size:
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            out.append(self._order[self.position])
            self.position += 1
        return out

    def __iter__(self) -> Iterator[int]:
        while True:
            yield self.take(1)[0]

    def state_dict(self) -> dict[str, int]:
        return {
            "size": self.size,
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["size"] != self.size or state["seed"] != self.seed:
            raise ValueError(
                f"checkpoint's prompt stream (size {state['size']}, seed {state['seed']}) does "
                f"not match this run's (size {self.size}, seed {self.seed}); use the same "
                "--prompt-data and --seed to resume"
            )
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)
