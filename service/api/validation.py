"""Range checks against the loaded model and the prompt, and conversion to core objects.

Each check raises `InvalidRequest` with the field's location in the request body and a
message that names the field, the bad value and the valid range.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from service.api import schemas
from service.core.locations import ResidualLocation, ResidualName
from service.core.nodes import NODE_KINDS, AttentionTrace, LocationSpec, Node, PreOrPost
from service.model.autoencoder import AutoencoderInput
from service.model.base import ModelConfig

Loc = tuple[str | int, ...]


class InvalidRequest(Exception):
    """A request that parses but does not fit the model or the prompt."""

    def __init__(self, loc: Loc, message: str, status_code: int = 422) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message
        self.status_code = status_code


class AutoencoderShape(Protocol):
    """The properties of a loaded autoencoder that the checks read."""

    @property
    def input(self) -> AutoencoderInput: ...

    @property
    def layers(self) -> Sequence[int]: ...

    @property
    def n_latents(self) -> int: ...


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


@dataclass
class RequestChecker:
    config: ModelConfig
    n_tokens: int
    autoencoders: Mapping[str, AutoencoderShape]

    def index(self, value: int, loc: Loc, name: str, size: int, owner: str) -> int:
        if not 0 <= value < size:
            raise InvalidRequest(loc, f"{name} {value} is out of range: {owner} has {_plural(size, name)} (0-{size - 1})")
        return value

    def layer(self, value: int, loc: Loc) -> int:
        n = self.config.n_layers
        if not 0 <= value < n:
            raise InvalidRequest(loc, f"layer {value} is out of range: the model has {_plural(n, 'layer')} (0-{n - 1})")
        return value

    def token(self, value: int, loc: Loc, name: str = "token") -> int:
        n = self.n_tokens
        if not -n <= value < n:
            raise InvalidRequest(
                loc, f"{name} {value} is out of range: the prompt has {_plural(n, 'token')} ({-n} to {n - 1})"
            )
        return value % n

    def token_id(self, value: int, loc: Loc, name: str = "token_id") -> int:
        n = self.config.vocab_size
        if not 0 <= value < n:
            raise InvalidRequest(loc, f"{name} {value} is out of range: the vocabulary has {n} tokens (0-{n - 1})")
        return value

    def token_ids(self, values: Sequence[int], loc: Loc) -> None:
        for position, value in enumerate(values):
            self.token_id(value, (*loc, position))

    def autoencoder(self, name: str, layer: int, loc: Loc, layer_loc: Loc) -> AutoencoderShape:
        if name not in self.autoencoders:
            if not self.autoencoders:
                raise InvalidRequest(loc, f"autoencoder {name!r} is not loaded; no autoencoders are loaded")
            loaded = ", ".join(sorted(self.autoencoders))
            raise InvalidRequest(loc, f"autoencoder {name!r} is not loaded; loaded autoencoders: {loaded}")
        autoencoder = self.autoencoders[name]
        if layer not in autoencoder.layers:
            layers = ", ".join(str(layer) for layer in autoencoder.layers)
            raise InvalidRequest(layer_loc, f"layer {layer} has no autoencoder {name!r}; it covers layers {layers}")
        return autoencoder

    def location(self, model: schemas.ActivationLocation, loc: Loc) -> LocationSpec:
        return self.spec(
            model.type,
            model.layer,
            model.pre_or_post_act,
            model.detach_layer_norm_scale,
            model.attention_trace_type,
            model.downstream_trace_config,
            model.autoencoder,
            loc,
        )

    def spec(
        self,
        node_type: str,
        layer: int | None,
        pre_or_post: str,
        detach: bool,
        attention_trace: str | None,
        downstream_config: schemas.TraceConfig | None,
        autoencoder: str | None,
        loc: Loc,
        contrast: tuple[int, int] | None = None,
        field_loc: Loc | None = None,
    ) -> LocationSpec:
        """Check a location's fields; `field_loc` is where layer and autoencoder sit, if not in `loc`."""
        field_loc = loc if field_loc is None else field_loc
        checked_layer = None if layer is None else self.layer(layer, (*field_loc, "layer"))
        autoencoder_input = None
        if autoencoder is not None and checked_layer is not None:
            autoencoder_input = self.autoencoder(
                autoencoder, checked_layer, (*field_loc, "autoencoder"), (*field_loc, "layer")
            ).input
        if node_type in ("logit", "logit_diff", "logprob") and pre_or_post == "pre":
            raise InvalidRequest(
                (*loc, "pre_or_post_act"), f"pre_or_post_act 'pre' does not apply to {node_type}; use 'post'"
            )

        trace = None
        if node_type == "attention_head":
            trace = AttentionTrace(attention_trace or "qk")
        downstream = None
        if downstream_config is not None:
            assert checked_layer is not None
            if pre_or_post == "pre":
                raise InvalidRequest(
                    (*loc, "pre_or_post_act"),
                    "pre_or_post_act 'pre' does not apply to a 'v' trace, which projects the head's write; use 'post'",
                )
            downstream = self.trace_config(downstream_config, (*loc, "downstream_trace_config"))
            self.check_value_trace_order(checked_layer, downstream, (*loc, "downstream_trace_config"))

        return LocationSpec(
            node_type=node_type,
            layer=checked_layer,
            pre_or_post=PreOrPost(pre_or_post),
            detach_norm_scale=detach,
            attention_trace=trace,
            downstream=downstream,
            autoencoder=autoencoder,
            autoencoder_input=autoencoder_input,
            contrast=contrast,
        )

    def check_value_trace_order(self, layer: int, downstream: Node, loc: Loc) -> None:
        head_write = ResidualLocation(ResidualName.RESID_MID, layer)
        reads = downstream.spec.kind.residual_location(downstream.spec, self.config)
        n = self.config.n_layers
        if reads.order(n) < head_write.order(n):
            where = reads.name.value if reads.layer is None else f"{reads.name.value}[{reads.layer}]"
            raise InvalidRequest(
                loc,
                f"the downstream node reads {where}, before the traced head's write lands in resid_mid[{layer}]; "
                "choose a downstream node that comes later in the forward pass",
            )

    def trace_config(self, config: schemas.TraceConfig, loc: Loc) -> Node:
        return self.node(
            config.node,
            (*loc, "node"),
            pre_or_post=config.pre_or_post_act,
            detach=config.detach_layer_norm_scale,
            attention_trace=config.attention_trace_type,
            downstream=config.downstream_trace_config,
            options_loc=loc,
        )

    def node(
        self,
        node: Any,
        loc: Loc,
        pre_or_post: str = "post",
        detach: bool = True,
        attention_trace: str | None = None,
        downstream: schemas.TraceConfig | None = None,
        options_loc: Loc | None = None,
    ) -> Node:
        """Check a request node and convert it, with its trace options, to a core `Node`."""
        options_loc = loc if options_loc is None else options_loc
        layer = getattr(node, "layer", None)
        contrast = None
        if isinstance(node, schemas.LogitDiffNode):
            contrast = (
                self.token_id(node.target_token_id, (*loc, "target_token_id"), "target_token_id"),
                self.token_id(node.distractor_token_id, (*loc, "distractor_token_id"), "distractor_token_id"),
            )
        spec = self.spec(
            node.type,
            layer,
            pre_or_post,
            detach,
            attention_trace,
            downstream,
            getattr(node, "autoencoder", None),
            options_loc,
            contrast,
            field_loc=loc,
        )
        token = self.token(node.token, (*loc, "token"))
        index: tuple[int, ...]
        if isinstance(node, schemas.MlpNeuronNode):
            neuron = self.index(node.neuron, (*loc, "neuron"), "neuron", self.config.d_mlp, f"layer {layer}'s MLP")
            index = (token, neuron)
        elif isinstance(node, schemas.AttentionHeadNode):
            attended = self.token(node.attended_token, (*loc, "attended_token"), "attended_token")
            if attended > token:
                raise InvalidRequest(
                    (*loc, "attended_token"),
                    f"attended_token {node.attended_token} (position {attended}) comes after token {node.token} "
                    f"(position {token}), so causal attention masks it; choose a key at or before the query",
                )
            head = self.index(node.head, (*loc, "head"), "head", self.config.n_heads, "each layer")
            index = (token, attended, head)
        elif isinstance(node, schemas.AutoencoderLatentNode):
            n_latents = self.autoencoders[node.autoencoder].n_latents
            latent = self.index(node.latent, (*loc, "latent"), "latent", n_latents, f"autoencoder {node.autoencoder!r}")
            index = (token, latent)
        elif isinstance(node, (schemas.LogitNode, schemas.LogprobNode)):
            index = (token, self.token_id(node.token_id, (*loc, "token_id")))
        else:
            index = (token,)
        assert node.type in NODE_KINDS, f"node type {node.type} has no implementation"
        return Node(spec, index)

    def writer(self, node: Any, loc: Loc) -> Node:
        """Check a node used as an upstream writer."""
        if isinstance(node, (schemas.LogitNode, schemas.LogitDiffNode, schemas.LogprobNode)):
            raise InvalidRequest(
                (*loc, "type"), f"{node.type} nodes do not write to the residual stream, so they cannot be upstream"
            )
        return self.node(node, loc)

    def residual_location(self, model: schemas.ResidualLocationModel, loc: Loc) -> ResidualLocation:
        layer = None if model.layer is None else self.layer(model.layer, (*loc, "layer"))
        return ResidualLocation(ResidualName(model.name), layer)
