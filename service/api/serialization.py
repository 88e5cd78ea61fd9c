"""Turning result tensors into JSON."""

from __future__ import annotations

from typing import Any

import orjson
import torch
from fastapi.responses import JSONResponse
from torch import Tensor


class NonFiniteResultError(Exception):
    """A result contains NaN or infinity where the model should have produced a number."""


class OrjsonResponse(JSONResponse):
    """A JSON response encoded with orjson; `content` may also be bytes encoded already."""

    def render(self, content: Any) -> bytes:
        if isinstance(content, bytes):
            return content
        return orjson.dumps(content)


def tensor_to_json(tensor: Tensor, masked: Tensor | None = None, what: str = "result") -> Any:
    """Convert a tensor to nested lists, with None where `masked` is true.

    Raises NonFiniteResultError for a NaN or infinity outside the mask, so that a broken
    number is never sent as if it were valid.
    """
    values = tensor.detach().to("cpu", torch.float64)
    if masked is not None:
        mask = masked.expand_as(values).cpu()
        values = values.masked_fill(mask, 0.0)
    if not bool(torch.isfinite(values).all()):
        raise NonFiniteResultError(f"the {what} contains NaN or infinite values")
    nested: Any = values.tolist()
    if masked is not None:
        for index in mask.nonzero().tolist():
            container = nested
            for position in index[:-1]:
                container = container[position]
            container[index[-1]] = None
    return nested


def scalar_to_json(value: float, what: str) -> float:
    if value != value or value in (float("inf"), float("-inf")):
        raise NonFiniteResultError(f"the {what} is NaN or infinite")
    return value
