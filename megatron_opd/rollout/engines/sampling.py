"""Drawing one token per row from logits, without host synchronisation or data-dependent shapes.

Every sampler here locates a uniform draw ``u`` in the float64 cumulative distribution of the
(tempered, filtered) probabilities: one draw per row, where ``torch.multinomial`` draws an
exponential per vocabulary entry (on a 49k vocabulary that was 7 ms of a 33 ms CPU decode step).
The uniforms are an argument, so a captured decode step reads them from a buffer filled before the
rollout (a CUDA graph replays its random-number calls with fixed offsets; a buffer keeps the draws
a function of the seed alone, on CPU and GPU alike).

Filters, as Megatron-Core's sampler defines them (``temperature`` first, then the filter):
``top_k`` keeps the ``k`` largest logits; ``top_p`` keeps the smallest prefix of the sorted
distribution whose mass before the token is at most ``top_p`` (the token that crosses ``top_p``
is kept, so at least one token always is).
"""

from __future__ import annotations

from typing import Optional

import torch


def pick(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index ``[b]`` of the first entry of each row of ``probs`` ``[b, n]`` whose cumulative
    mass exceeds ``u`` ``[b]`` (in [0, 1)) times the row's total. An entry of mass 0 repeats the
    previous cumulative value, so no ``u`` lands on it."""
    cdf = probs.double().cumsum(dim=-1)
    target = (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, target, right=True).view(-1).clamp(max=probs.size(-1) - 1)


def sample_categorical(
    logits: torch.Tensor, temperature: float = 1.0, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """One id per row of ``logits`` ``[b, v]``, drawn from ``softmax(logits / temperature)``
    with a fresh uniform per row from ``generator``. An id of probability 0 (logit -inf) is
    never drawn."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    u = torch.rand((probs.size(0),), generator=generator, dtype=torch.float64, device=probs.device)
    return pick(probs, u)


def sample(
    logits: torch.Tensor,
    u: torch.Tensor,
    greedy: bool,
    temperature: torch.Tensor,
    top_k: int = 0,
    top_p: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One id per row of ``logits`` ``[b, v]`` (float32 or wider). ``temperature`` and ``top_p``
    are 0-d tensors (a captured step reads them, so changing them needs no new capture);
    ``top_k`` and whether ``top_p`` is used fix the shapes, so they are Python values."""
    if greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        values, ids = logits.topk(top_k, dim=-1)
        return ids.gather(1, pick(torch.softmax(values, dim=-1), u).unsqueeze(1)).view(-1)
    if top_p is not None:
        values, ids = logits.sort(dim=-1, descending=True)
        probs = torch.softmax(values, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the tokens ahead of each one
        probs = probs.masked_fill(before > top_p, 0.0)
        return ids.gather(1, pick(probs, u).unsqueeze(1)).view(-1)
    return pick(torch.softmax(logits, dim=-1), u)
