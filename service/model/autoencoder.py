"""Sparse autoencoders over a model's activations, and the sets of them a service serves.

An autoencoder reads one activation vector x per token and computes
`pre = (x - b_dec if apply_b_dec_to_input else x) @ W_enc + b_enc`, then latents by its
activation function, and reconstructs `latents @ W_dec + b_dec`. Tensor names and
layouts follow SAELens: W_enc [d_in, d_sae], W_dec [d_sae, d_in].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch
from torch import Tensor, nn


class AutoencoderInput(StrEnum):
    """The activation an autoencoder reads."""

    MLP_POST_ACT = "mlp_post_act"
    RESID_DELTA_MLP = "resid_delta_mlp"
    RESID_DELTA_ATTN = "resid_delta_attn"
    RESID_PRE = "resid_pre"


class ActivationFunction(StrEnum):
    RELU = "relu"
    TOPK = "topk"
    JUMPRELU = "jumprelu"


class SparseAutoencoder(nn.Module):
    def __init__(
        self,
        W_enc: Tensor,
        b_enc: Tensor,
        W_dec: Tensor,
        b_dec: Tensor,
        activation: ActivationFunction,
        k: int | None = None,
        threshold: Tensor | None = None,
        apply_b_dec_to_input: bool = False,
    ) -> None:
        super().__init__()
        self.W_enc = nn.Parameter(W_enc, requires_grad=False)
        self.b_enc = nn.Parameter(b_enc, requires_grad=False)
        self.W_dec = nn.Parameter(W_dec, requires_grad=False)
        self.b_dec = nn.Parameter(b_dec, requires_grad=False)
        self.threshold = None if threshold is None else nn.Parameter(threshold, requires_grad=False)
        self.activation = activation
        self.k = k
        self.apply_b_dec_to_input = apply_b_dec_to_input

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def n_latents(self) -> int:
        return int(self.W_enc.shape[1])

    def encode_pre(self, x: Tensor) -> Tensor:
        """Map activations [n, d_in] to encoder pre-activations [n, n_latents]."""
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        pre: Tensor = x @ self.W_enc + self.b_enc
        return pre

    def activate(self, pre: Tensor) -> Tensor:
        """Apply the activation function; its selection mask is a constant for derivatives."""
        if self.activation is ActivationFunction.TOPK:
            assert self.k is not None, "a TopK autoencoder needs k"
            k = min(self.k, pre.shape[-1])
            kth_largest = pre.detach().topk(k, dim=-1).values[..., -1:]
            return torch.relu(pre) * (pre.detach() >= kth_largest)
        if self.activation is ActivationFunction.JUMPRELU:
            assert self.threshold is not None, "a JumpReLU autoencoder needs a threshold"
            return pre * (pre.detach() > self.threshold)
        return torch.relu(pre)

    def encode(self, x: Tensor) -> Tensor:
        return self.activate(self.encode_pre(x))

    def decode(self, latents: Tensor) -> Tensor:
        decoded: Tensor = latents @ self.W_dec + self.b_dec
        return decoded

    def describe_activation(self) -> str:
        return f"topk(k={self.k})" if self.activation is ActivationFunction.TOPK else self.activation.value


@dataclass
class AutoencoderSet:
    """Autoencoders that share an id and an input, one per layer."""

    id: str
    input: AutoencoderInput
    by_layer: dict[int, SparseAutoencoder] = field(default_factory=dict)
    sources: dict[int, str] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted(self.by_layer)

    @property
    def n_latents(self) -> int:
        """The latent count, which the loader checks is the same at every layer."""
        return next(iter(self.by_layer.values())).n_latents

    def info(self) -> dict[str, Any]:
        activations = sorted({autoencoder.describe_activation() for autoencoder in self.by_layer.values()})
        return {
            "id": self.id,
            "input": self.input.value,
            "layers": self.layers,
            "n_latents": self.n_latents,
            "activation": ", ".join(activations),
        }

    def to(self, device: torch.device | str, dtype: torch.dtype) -> AutoencoderSet:
        for autoencoder in self.by_layer.values():
            autoencoder.to(device=device, dtype=dtype)
        return self
