"""The rollout engine interface: what an engine is given (:class:`Sampling`), what it returns
(:class:`Generation`), and the methods it has (:class:`Engine`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Protocol


@dataclass
class Generation:
    """One sampled continuation.

    ``tokens``: the generated ids, the stop token included when one ended the sequence.
    ``logprobs``: log p(token | prefix) for each of ``tokens`` under the model's softmax at
    temperature 1 over the true vocabulary (not the tempered / filtered sampling distribution), so
    it is comparable with a training forward pass; empty unless ``return_logprobs``.
    ``truncated``: ``max_new_tokens`` was reached without a stop token.
    """

    tokens: list[int]
    logprobs: list[float]
    truncated: bool


@dataclass(frozen=True)
class Sampling:
    """How to continue a batch. ``greedy`` takes the argmax and ignores the knobs; otherwise
    ``softmax(logits / temperature)`` filtered by at most one of ``top_k`` (> 0) or ``top_p``
    (in (0, 1)). ``vocab_size``: ids at or above it are never sampled (Megatron's padded
    vocabulary; ``None``: every column of the logits). ``max_batch_size``: rows decoded
    together."""

    max_new_tokens: int
    stop_token_ids: tuple[int, ...]
    vocab_size: Optional[int] = None  # None: the logits' whole (padded) width
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    greedy: bool = False
    return_logprobs: bool = True
    max_batch_size: Optional[int] = None


class Engine(Protocol):
    """A rollout engine over one model (see the module docstring)."""

    name: str

    def generate(
        self, tokenizer, prompts: Sequence[Sequence[int]], sampling: Sampling, seed: Optional[int]
    ) -> list[Generation]:
        """One :class:`Generation` per prompt (``tokenizer``: its ``pad_id`` pads the batch); the
        same result on every model-parallel rank; ``seed`` seeds the sampler."""

    def release(self) -> None:
        """Free caches and graphs; the next ``generate`` rebuilds what it needs."""
