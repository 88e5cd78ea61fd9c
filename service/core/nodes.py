"""Node types: which residual location each reads, its function and its write vector.

A `LocationSpec` names a whole activation location (one layer's activations of one node
type under given trace options); a `Node` is one scalar of it. Each node type is one
`NodeKind` subclass registered in `NODE_KINDS`; the reconstituter calls nothing else.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from service.core.locations import RESID_FINAL, ResidualLocation, resid_mid, resid_post, resid_pre
from service.model.autoencoder import AutoencoderInput, AutoencoderSet, SparseAutoencoder
from service.model.base import AttentionDetach, ModelConfig
from service.model.layers import upcast

if TYPE_CHECKING:
    from service.core.reconstituter import Reconstituter


class PreOrPost(StrEnum):
    PRE = "pre"
    POST = "post"


class AttentionTrace(StrEnum):
    Q = "q"
    K = "k"
    QK = "qk"
    V = "v"


@dataclass(frozen=True)
class LocationSpec:
    """One activation location and the trace options of the function that computes it.

    `downstream` is the node whose gradient a value trace projects on. `contrast` is
    the (target, distractor) token ids of a `logit_diff` location. `autoencoder_input`
    repeats the named autoencoder's input, which fixes the residual location.
    """

    node_type: str
    layer: int | None = None
    pre_or_post: PreOrPost = PreOrPost.POST
    detach_norm_scale: bool = True
    attention_trace: AttentionTrace | None = None
    downstream: Node | None = None
    autoencoder: str | None = None
    autoencoder_input: AutoencoderInput | None = None
    contrast: tuple[int, int] | None = None

    @property
    def kind(self) -> NodeKind:
        return NODE_KINDS[self.node_type]


@dataclass(frozen=True)
class Node:
    """One scalar of a location: `index` indexes the location's activation tensor."""

    spec: LocationSpec
    index: tuple[int, ...]

    @property
    def token(self) -> int:
        return self.index[0]


class NotAWriterError(ValueError):
    """Raised when a node that does not write to the residual stream is used as a writer."""


class NodeKind(abc.ABC):
    """The behaviour of one node type."""

    name: str
    index_names: tuple[str, ...] = ()

    def masked(self, spec: LocationSpec, n_tokens: int) -> Tensor | None:
        """Return a boolean mask, broadcastable to the activations, of entries that do not exist."""
        return None

    @abc.abstractmethod
    def residual_location(self, spec: LocationSpec, config: ModelConfig) -> ResidualLocation:
        """Return the residual location the node type is reconstituted from."""

    @abc.abstractmethod
    def activations(self, spec: LocationSpec, resid: Tensor, context: Reconstituter) -> Tensor:
        """Compute the whole location's activations from the residual tensor `resid`."""

    def write_location(self, node: Node, config: ModelConfig) -> ResidualLocation:
        """Return the residual location the node's write is added to."""
        raise NotAWriterError(f"{self.name} nodes do not write to the residual stream")

    def write(self, node: Node, context: Reconstituter) -> Tensor:
        """Compute the node's write to the residual stream, [n_tokens, d_model]."""
        raise NotAWriterError(f"{self.name} nodes do not write to the residual stream")


def _write_at_token(direction: Tensor, token: int, n_tokens: int) -> Tensor:
    vector = torch.zeros(n_tokens, direction.shape[-1], dtype=direction.dtype, device=direction.device)
    vector[token] = direction
    return vector


def _layer(spec: LocationSpec) -> int:
    assert spec.layer is not None, f"{spec.node_type} locations need a layer"
    return spec.layer


class MlpNeuronKind(NodeKind):
    name = "mlp_neuron"
    index_names = ("token", "neuron")

    def residual_location(self, spec: LocationSpec, config: ModelConfig) -> ResidualLocation:
        return resid_mid(_layer(spec))

    def activations(self, spec: LocationSpec, resid: Tensor, context: Reconstituter) -> Tensor:
        out = context.model.mlp_sublayer(_layer(spec), resid, spec.detach_norm_scale)
        return out.pre if spec.pre_or_post is PreOrPost.PRE else out.post

    def write_location(self, node: Node, config: ModelConfig) -> ResidualLocation:
        return resid_post(_layer(node.spec))

    @torch.no_grad()
    def write(self, node: Node, context: Reconstituter) -> Tensor:
        layer = _layer(node.spec)
        token, neuron = node.index
        post = context.model.mlp_sublayer(layer, context.stream.at(resid_mid(layer))).post
        direction = post[token, neuron] * context.model.block(layer).mlp.output_weight()[neuron]
        return _write_at_token(direction, token, context.stream.n_tokens)


ATTENTION_DETACH = {
    AttentionTrace.QK: AttentionDetach(value=True),
    AttentionTrace.Q: AttentionDetach(key=True, value=True),
    AttentionTrace.K: AttentionDetach(query=True, value=True),
    AttentionTrace.V: AttentionDetach(query=True, key=True),
}


class AttentionHeadKind(NodeKind):
    """Attention heads, indexed (query token, key token, head)."""

    name = "attention_head"
    index_names = ("token", "attended_token", "head")

    def masked(self, spec: LocationSpec, n_tokens: int) -> Tensor:
        # [n_query, n_key, 1]: a key after its query is masked by causal attention.
        return torch.ones(n_tokens, n_tokens, dtype=torch.bool).triu(diagonal=1)[:, :, None]

    def residual_location(self, spec: LocationSpec, config: ModelConfig) -> ResidualLocation:
        return resid_pre(_layer(spec))

    def activations(self, spec: LocationSpec, resid: Tensor, context: Reconstituter) -> Tensor:
        trace = spec.attention_trace or AttentionTrace.QK
        out = context.model.attention_sublayer(_layer(spec), resid, spec.detach_norm_scale, ATTENTION_DETACH[trace])
        if trace is AttentionTrace.V:
            return self._value_trace(spec, out.probs, out.values, context)
        return out.logits if spec.pre_or_post is PreOrPost.PRE else out.probs

    def _value_trace(self, spec: LocationSpec, probs: Tensor, values: Tensor, context: Reconstituter) -> Tensor:
        """Project each head's write at (query t, key s) on the downstream node's gradient at t.

        probs: [n, n, n_heads]; values: [n, n_heads, d_head]. The gradient is a constant,
        so derivatives flow through the value vectors only.
        """
        assert spec.downstream is not None, "a value trace needs a downstream node"
        downstream_gradient = context.gradient(spec.downstream).gradient.detach()
        attention = context.model.block(_layer(spec)).attention
        n_heads = context.model.config.n_heads
        # output_weights: [n_heads, d_head, d_model]
        output_weights = torch.stack([attention.head_output_weight(head) for head in range(n_heads)])
        # projected: [n_query, n_heads, d_head], the gradient pulled back through each head's output map
        projected = torch.einsum("hdm,tm->thd", output_weights, downstream_gradient.to(values.dtype))
        return torch.einsum("tsh,shd,thd->tsh", probs, values, projected)

    def write_location(self, node: Node, config: ModelConfig) -> ResidualLocation:
        return resid_mid(_layer(node.spec))

    @torch.no_grad()
    def write(self, node: Node, context: Reconstituter) -> Tensor:
        layer = _layer(node.spec)
        token, attended_token, head = node.index
        out = context.model.attention_sublayer(layer, context.stream.at(resid_pre(layer)))
        head_weight = context.model.block(layer).attention.head_output_weight(head)
        direction = out.probs[token, attended_token, head] * (out.values[attended_token, head] @ head_weight)
        return _write_at_token(direction, token, context.stream.n_tokens)


class AutoencoderLatentKind(NodeKind):
    """Sparse autoencoder latents, indexed (token, latent), of the set named by `spec.autoencoder`."""

    name = "autoencoder_latent"
    index_names = ("token", "latent")

    def _autoencoder(self, spec: LocationSpec, context: Reconstituter) -> tuple[AutoencoderSet, SparseAutoencoder]:
        assert spec.autoencoder is not None, "autoencoder_latent locations need an autoencoder id"
        autoencoder_set: AutoencoderSet = context.autoencoders[spec.autoencoder]
        return autoencoder_set, autoencoder_set.by_layer[_layer(spec)]

    def residual_location(self, spec: LocationSpec, config: ModelConfig) -> ResidualLocation:
        return autoencoder_residual(_autoencoder_input(spec), _layer(spec))

    def activations(self, spec: LocationSpec, resid: Tensor, context: Reconstituter) -> Tensor:
        autoencoder_set, autoencoder = self._autoencoder(spec, context)
        x = self._input(autoencoder_set.input, _layer(spec), resid, spec.detach_norm_scale, context)
        pre = autoencoder.encode_pre(x)
        return pre if spec.pre_or_post is PreOrPost.PRE else autoencoder.activate(pre)

    @staticmethod
    def _input(source: AutoencoderInput, layer: int, resid: Tensor, detach: bool, context: Reconstituter) -> Tensor:
        model = context.model
        if source is AutoencoderInput.MLP_POST_ACT:
            return model.mlp_sublayer(layer, resid, detach).post
        if source is AutoencoderInput.RESID_DELTA_MLP:
            return model.mlp_sublayer(layer, resid, detach).out
        if source is AutoencoderInput.RESID_DELTA_ATTN:
            return model.attention_sublayer(layer, resid, detach).out
        return resid

    def write_location(self, node: Node, config: ModelConfig) -> ResidualLocation:
        return autoencoder_write_location(_autoencoder_input(node.spec), _layer(node.spec))

    @torch.no_grad()
    def write(self, node: Node, context: Reconstituter) -> Tensor:
        autoencoder_set, autoencoder = self._autoencoder(node.spec, context)
        layer = _layer(node.spec)
        token, latent = node.index
        resid = context.stream.at(self.residual_location(node.spec, context.model.config))
        activation = self.activations(node.spec, resid, context)[token, latent]
        direction = autoencoder.W_dec[latent]
        if autoencoder_set.input is AutoencoderInput.MLP_POST_ACT:
            direction = direction @ context.model.block(layer).mlp.output_weight()
        # The decoder bias belongs to no latent, so it is left out like the models' output biases.
        return _write_at_token(activation * direction, token, context.stream.n_tokens)


def _autoencoder_input(spec: LocationSpec) -> AutoencoderInput:
    assert spec.autoencoder_input is not None, "autoencoder_latent locations need the autoencoder's input"
    return spec.autoencoder_input


def autoencoder_residual(source: AutoencoderInput, layer: int) -> ResidualLocation:
    """Return where an autoencoder on `source` at `layer` is reconstituted from."""
    if source in (AutoencoderInput.MLP_POST_ACT, AutoencoderInput.RESID_DELTA_MLP):
        return resid_mid(layer)
    return resid_pre(layer)


def autoencoder_write_location(source: AutoencoderInput, layer: int) -> ResidualLocation:
    """Return where a latent's write lands.

    NOTE: a latent of a resid_pre autoencoder reconstructs the residual itself, so its write
    is taken to land at resid_pre[layer], where it is read.
    """
    if source in (AutoencoderInput.MLP_POST_ACT, AutoencoderInput.RESID_DELTA_MLP):
        return resid_post(layer)
    if source is AutoencoderInput.RESID_DELTA_ATTN:
        return resid_mid(layer)
    return resid_pre(layer)


class LogitKind(NodeKind):
    """Output logits, indexed (token, token id)."""

    name = "logit"
    index_names: tuple[str, ...] = ("token", "token_id")

    def residual_location(self, spec: LocationSpec, config: ModelConfig) -> ResidualLocation:
        return RESID_FINAL

    def activations(self, spec: LocationSpec, resid: Tensor, context: Reconstituter) -> Tensor:
        return context.model.logits(resid, spec.detach_norm_scale)


class LogprobKind(LogitKind):
    """Log-probabilities of the next token, indexed (token, token id)."""

    name = "logprob"

    def activations(self, spec: LocationSpec, resid: Tensor, context: Reconstituter) -> Tensor:
        logits = super().activations(spec, resid, context)
        return torch.log_softmax(upcast(logits), dim=-1).to(logits.dtype)


class LogitDiffKind(LogitKind):
    """logit(target) - logit(distractor) at each token, indexed (token,)."""

    name = "logit_diff"
    index_names = ("token",)

    def activations(self, spec: LocationSpec, resid: Tensor, context: Reconstituter) -> Tensor:
        assert spec.contrast is not None, "logit_diff needs target and distractor token ids"
        target, distractor = spec.contrast
        logits = super().activations(spec, resid, context)
        return logits[:, target] - logits[:, distractor]


NODE_KINDS: dict[str, NodeKind] = {
    kind.name: kind
    for kind in (
        MlpNeuronKind(),
        AttentionHeadKind(),
        AutoencoderLatentKind(),
        LogitKind(),
        LogprobKind(),
        LogitDiffKind(),
    )
}


def register_node_kind(kind: NodeKind) -> None:
    NODE_KINDS[kind.name] = kind
