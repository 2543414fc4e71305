"""Where a step's rollouts come from, behind one interface (:class:`RolloutSource`), so the trainer
has one path:

- :class:`InPlace`: the student's own training chunks (no copy, no sync);
- :class:`Copy`: a refitted copy on its own layout on the same ranks
  (``megatron_opd.rollout.refit``);
- :class:`megatron_opd.rollout.remote.Remote`: rollout ranks of their own (``--rollout-ranks``),
  up to ``--rollout-lag`` steps behind.

Every source samples step ``i``'s prompts with the seed ``step_seed(seed, i)`` plus the index of
the replica that samples them, so that the same rollout layout gives the same tokens wherever it
runs. Rewards never read the sampler's log-probabilities: the training forward recomputes π_S
under the learner's current weights (with a lag, the sampler's weights are older).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

from megatron_opd.rollout.generation import Generation, generate


def step_seed(seed: int, iteration: int) -> int:
    """The sampling seed of the step that starts at ``iteration`` (before a replica's index)."""
    return seed * 1_000_003 + iteration * 7919


class RolloutSource(Protocol):
    """What the trainer calls, in this order each step: ``update_weights(i)`` (the one weight
    sync), ``generate``, then ``step_metrics``; ``checkpoint_state`` and ``eval_sampler`` between
    steps; ``start`` once before the first step, ``close`` once after the last."""

    lag: int  # how many optimizer steps the sampler's weights trail the learner's

    def start(self, iteration: int, stream, in_flight) -> None:
        """Training starts (or resumes) at ``iteration`` with the prompt stream ``stream`` there;
        ``in_flight``: what :meth:`checkpoint_state` saved, if anything."""

    def update_weights(self, iteration: int) -> dict[str, float]:
        """Make the sampler hold the weights step ``iteration`` samples from (θ_iteration, or
        θ_{iteration - lag}); the seconds it took, by phase."""

    def generate(self, tokenizer, prompts: Sequence[Sequence[int]], seed: int,
                 **kwargs) -> list[Generation]:  # fmt: skip
        """This data-parallel rank's responses to ``prompts`` at the step's ``seed``."""

    def eval_sampler(self, iteration: int):
        """What evaluation samples from: the weights after ``iteration`` steps."""

    def step_metrics(self, step_seconds: float) -> dict[str, float]:
        """Metrics of the step just done that only this source knows."""

    def checkpoint_state(self, iteration: int) -> dict:
        """What a checkpoint at ``iteration`` must hold for a resumed run to sample what a
        straight one would (only a lag has any)."""

    def close(self) -> None:
        """Training is over (or stopped early)."""


class InPlace:
    """Rollouts from the training chunks themselves; each data-parallel rank is a replica."""

    lag = 0

    def __init__(self, student, dp_rank: int):
        self.student, self.dp_rank = student, dp_rank

    def start(self, iteration: int, stream, in_flight) -> None:
        self.iteration = iteration

    def update_weights(self, iteration: int) -> dict[str, float]:
        self.iteration = iteration  # the training chunks are the sampler: nothing to copy
        return {}

    def generate(self, tokenizer, prompts: Sequence[Sequence[int]], seed: int,
                 **kwargs) -> list[Generation]:  # fmt: skip
        return generate(self.student, tokenizer, prompts, seed=seed + self.dp_rank, **kwargs)

    def eval_sampler(self, iteration: int):
        return self.student

    def step_metrics(self, step_seconds: float) -> dict[str, float]:
        return {}

    def checkpoint_state(self, iteration: int) -> dict:
        return {}

    def close(self) -> None:
        pass


class Copy(InPlace):
    """Rollouts from a :class:`megatron_opd.rollout.refit.RolloutModel` on the same ranks, refitted
    once per iteration (evaluation between steps reuses the refit)."""

    def __init__(self, student, copy):
        super().__init__(student, 0)
        self.copy = copy
        self.copy_iteration = None  # the iteration whose weights the copy holds

    def update_weights(self, iteration: int) -> dict[str, float]:
        self.iteration = iteration
        t0 = time.perf_counter()
        if self.copy_iteration != iteration:  # else refitted already, for an evaluation
            self.copy.refit(self.student)
            self.copy_iteration = iteration
        return {"time/refit": time.perf_counter() - t0}

    def generate(self, tokenizer, prompts, seed: int, **kwargs) -> list[Generation]:
        return self.copy.generate(tokenizer, prompts, seed=seed, **kwargs)

    def eval_sampler(self, iteration: int):
        self.update_weights(iteration)
        return self.copy
