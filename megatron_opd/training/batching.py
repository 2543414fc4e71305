"""Token-budget micro-batches: a step's responses grouped by length, each group padded only to its
own longest sequence (``--max-tokens-per-micro-batch``).

Padding every response to the step's longest wastes the teacher's and the student's work on pad
positions whenever lengths vary (they always do with stop tokens on). Here the rows are sorted by
length, longest first, and cut greedily into groups whose padded size ``rows x longest`` stays
within the budget; a sequence longer than the budget gets a micro-batch of its own. The loss is
unchanged: the OPD loss sums over tokens and Megatron divides by the step's token count
(``calculate_per_token_loss``), so grouping and order do not enter it.

Pure tensor code: no process groups, no models.
"""

from __future__ import annotations

import torch


def token_budget_groups(lengths: torch.Tensor, max_tokens: int) -> list[torch.Tensor]:
    """Row indices of each micro-batch, for sequences of ``lengths`` ``[B]`` input positions.

    Rows are taken longest first (ties in row order, so every rank of a model-parallel group cuts
    the same groups); a group grows while ``(rows + 1) x its longest <= max_tokens``.
    """
    if max_tokens < 1:
        raise ValueError(f"--max-tokens-per-micro-batch must be >= 1, got {max_tokens}")
    order = torch.sort(lengths.long(), descending=True, stable=True).indices.tolist()
    groups: list[list[int]] = []
    longest = 0
    for row in order:
        if groups and (len(groups[-1]) + 1) * longest <= max_tokens:
            groups[-1].append(row)
            continue
        groups.append([row])
        longest = int(lengths[row])
    return [torch.tensor(g, dtype=torch.long) for g in groups]


def padding_counts(sequence_lengths: torch.Tensor, widths: list[int], rows: list[int]) -> tuple:
    """(pad positions, all positions) of micro-batches ``rows[i] x widths[i]`` holding sequences of
    ``sequence_lengths`` input positions in total."""
    total = sum(w * r for w, r in zip(widths, rows, strict=True))
    return total - int(sequence_lengths.sum()), total


def scatter_rows(
    entries: list[dict[str, torch.Tensor]], rows: list[torch.Tensor], batch_rows: int, width: int
) -> list[dict[str, torch.Tensor]]:
    """Per-micro-batch ``[b_i, s_i]`` tensors put back into one ``[B, width]`` entry in the
    rollout's row order (zeros / False beyond each micro-batch's width), so a token dump reads
    the same with and without token budgets."""
    if not entries:
        return entries
    out = {}
    for key in entries[0]:
        like = entries[0][key]
        full = torch.zeros((batch_rows, width), dtype=like.dtype)
        for entry, index in zip(entries, rows, strict=True):
            value = entry[key]
            full[index, : value.shape[1]] = value.to(full.dtype)
        out[key] = full
    return [out]
