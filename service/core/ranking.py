"""Selecting the largest activations of a location."""

from __future__ import annotations

import torch
from torch import Tensor


def top_activations(
    activations: Tensor, k: int, token: int | None = None, masked: Tensor | None = None
) -> list[tuple[tuple[int, ...], float]]:
    """Return up to k (index, value) pairs of the largest activations, largest first.

    activations: [n_tokens, ...]. With `token`, only that token's entries compete.
    Entries where `masked` is true never appear. Ties keep the lower flat index first.
    """
    values = activations.detach().float().cpu()
    if masked is not None:
        values = values.masked_fill(masked.expand_as(values), float("-inf"))
    if token is not None:
        values = values[token : token + 1]
    flat = values.reshape(-1)
    finite = int(torch.isfinite(flat).sum())
    count = min(k, finite)
    # A stable descending sort makes equal values come out in index order, so output is deterministic.
    order = torch.sort(flat, descending=True, stable=True).indices[:count]
    shape = values.shape
    result: list[tuple[tuple[int, ...], float]] = []
    for flat_index in order.tolist():
        index = list(torch.unravel_index(torch.tensor(flat_index), shape))
        position = [int(part) for part in index]
        if token is not None:
            position[0] = token
        result.append((tuple(position), float(flat[flat_index])))
    return result
