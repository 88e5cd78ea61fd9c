"""The seam between model families and the rest of the service.

A family (GPT-2, Llama) implements `Transformer`: an embedding, a stack of blocks, each
block made of a normalization, an attention sub-block, a second normalization and an MLP
sub-block, and a final normalization with the unembedding. Every piece takes the
residual stream tensor it reads, so the forward pass and the recomputation of one
layer's activations from a given residual run the same code.

Shapes use `n` for the number of tokens of the one prompt a pass handles.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ModelConfig:
    """Dimensions and constants of a loaded model."""

    architecture: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    vocab_size: int
    norm_eps: float
    max_positions: int
    rope_theta: float | None = None
    tie_word_embeddings: bool = True
    attention_bias: bool = False


@dataclass(frozen=True)
class AttentionDetach:
    """The attention inputs that are cut out of the derivative."""

    query: bool = False
    key: bool = False
    value: bool = False


NO_DETACH = AttentionDetach()


@dataclass
class AttentionOutput:
    """Activations of one attention sub-block.

    logits: [n_query, n_key, n_heads], scaled, with -inf where the key follows the query
    probs: [n_query, n_key, n_heads], softmax of logits over the key axis
    values: [n_key, n_heads, d_head], the value vector each query head reads
        (grouped-query models repeat each key/value head for its query heads)
    out: [n, d_model], the sub-block's write to the residual stream, biases included
    """

    logits: Tensor
    probs: Tensor
    values: Tensor
    out: Tensor


@dataclass
class MlpOutput:
    """Activations of one MLP sub-block.

    pre: [n, d_mlp], input of the nonlinearity
    post: [n, d_mlp], what the output projection reads
    out: [n, d_model], the sub-block's write to the residual stream
    """

    pre: Tensor
    post: Tensor
    out: Tensor


class Norm(Protocol):
    def __call__(self, x: Tensor, detach_scale: bool = False) -> Tensor: ...


class Attention(Protocol):
    def __call__(self, x: Tensor, detach: AttentionDetach = NO_DETACH) -> AttentionOutput: ...

    def head_output_weight(self, head: int) -> Tensor:
        """Return the [d_head, d_model] map from head `head`'s mixed values to the residual."""
        ...


class Mlp(Protocol):
    def __call__(self, x: Tensor) -> MlpOutput: ...

    def output_weight(self) -> Tensor:
        """Return the [d_mlp, d_model] matrix whose row i is neuron i's write direction."""
        ...


class Block(Protocol):
    @property
    def attention_norm(self) -> Norm: ...

    @property
    def attention(self) -> Attention: ...

    @property
    def mlp_norm(self) -> Norm: ...

    @property
    def mlp(self) -> Mlp: ...


class Transformer(nn.Module, abc.ABC):
    """A decoder-only, pre-norm transformer that runs one prompt at a time."""

    config: ModelConfig

    @abc.abstractmethod
    def block(self, layer: int) -> Block:
        """Return the pieces of layer `layer`."""

    @abc.abstractmethod
    def embed(self, token_ids: Tensor) -> Tensor:
        """Map [n] token ids to resid_pre[0], [n, d_model]."""

    @property
    @abc.abstractmethod
    def final_norm(self) -> Norm:
        """Return the normalization applied to resid_final before the unembedding."""

    @abc.abstractmethod
    def unembed(self, normed: Tensor) -> Tensor:
        """Map the final-normalized residual [n, d_model] to logits [n, vocab_size]."""

    def attention_sublayer(
        self,
        layer: int,
        resid_pre: Tensor,
        detach_norm_scale: bool = False,
        detach: AttentionDetach = NO_DETACH,
    ) -> AttentionOutput:
        block = self.block(layer)
        return block.attention(block.attention_norm(resid_pre, detach_norm_scale), detach)

    def mlp_sublayer(self, layer: int, resid_mid: Tensor, detach_norm_scale: bool = False) -> MlpOutput:
        block = self.block(layer)
        return block.mlp(block.mlp_norm(resid_mid, detach_norm_scale))

    def logits(self, resid_final: Tensor, detach_norm_scale: bool = False) -> Tensor:
        return self.unembed(self.final_norm(resid_final, detach_norm_scale))

    def parameter_count(self) -> int:
        """Count parameters once each, so tied embeddings are not counted twice."""
        seen: set[int] = set()
        total = 0
        for parameter in self.parameters():
            if id(parameter) not in seen:
                seen.add(id(parameter))
                total += parameter.numel()
        return total

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype
