"""Copying checked tensors into a model."""

from __future__ import annotations

from pathlib import Path

import torch

from service.loaders.errors import ModelFileError


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Copy `state` into `model`, raising `ModelFileError` for missing, extra or misshapen tensors."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ModelFileError(path, f"missing tensors: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    for name, tensor in state.items():
        if name not in expected:
            raise ModelFileError(path, f"unexpected tensor {name}")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ModelFileError(
                path, f"tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state, strict=True)
