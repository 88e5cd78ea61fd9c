"""Request and response models of the HTTP contract.

These models check what can be checked without the loaded model: types, required
fields, which options go together. Ranges that depend on the model and the prompt
(layers, tokens, neurons) are checked in `service.api.validation`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

# Indices are bounded so that no value overflows a tensor index; the model's own ranges are
# checked after tokenization.
# Strict integers reject JSON booleans and numeric strings.
Index = Annotated[int, Field(strict=True, ge=0, le=2**31 - 1)]
TokenPosition = Annotated[
    int,
    Field(strict=True, ge=-(2**31), le=2**31 - 1, description="Token position; negative values count from the end."),
]
TokenId = Annotated[int, Field(strict=True, ge=0, le=2**31 - 1)]
PreOrPostAct = Literal["pre", "post"]
AttentionTraceType = Literal["q", "k", "qk", "v"]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MlpNeuronNode(StrictModel):
    type: Literal["mlp_neuron"]
    layer: Index
    token: TokenPosition
    neuron: Index


class AttentionHeadNode(StrictModel):
    type: Literal["attention_head"]
    layer: Index
    token: TokenPosition = Field(description="Query token.")
    attended_token: TokenPosition = Field(description="Key token; it must not come after `token`.")
    head: Index


class AutoencoderLatentNode(StrictModel):
    type: Literal["autoencoder_latent"]
    autoencoder: str = Field(max_length=200, description="Id of a loaded autoencoder, as listed by /model.")
    layer: Index
    token: TokenPosition
    latent: Index


class LogitNode(StrictModel):
    type: Literal["logit"]
    token: TokenPosition
    token_id: TokenId


class LogitDiffNode(StrictModel):
    type: Literal["logit_diff"]
    token: TokenPosition
    target_token_id: TokenId
    distractor_token_id: TokenId


class LogprobNode(StrictModel):
    type: Literal["logprob"]
    token: TokenPosition
    token_id: TokenId


NodeModel = Annotated[
    MlpNeuronNode | AttentionHeadNode | AutoencoderLatentNode | LogitNode | LogitDiffNode | LogprobNode,
    Field(discriminator="type"),
]


NODE_TYPES = ("mlp_neuron", "attention_head", "autoencoder_latent", "logit", "logit_diff", "logprob")
# Names that pydantic puts into an error's loc for the member of a tagged union.
UNION_TAGS = frozenset((*NODE_TYPES, "node_write", "vector_write"))


def check_attention_options(
    node_type: str, attention_trace_type: str | None, downstream: TraceConfig | None
) -> None:
    if attention_trace_type is not None and node_type != "attention_head":
        raise ValueError(f"attention_trace_type applies to attention_head nodes only, not to {node_type}")
    if attention_trace_type == "v" and downstream is None:
        raise ValueError("attention_trace_type 'v' needs a downstream_trace_config")
    if downstream is not None and attention_trace_type != "v":
        raise ValueError("downstream_trace_config is allowed only with attention_trace_type 'v'")
    if downstream is not None and downstream.attention_trace_type == "v":
        raise ValueError("downstream_trace_config must not itself be a 'v' trace")


class TraceConfig(StrictModel):
    """One node and the options of the function that computes it."""

    node: NodeModel
    pre_or_post_act: PreOrPostAct = "post"
    detach_layer_norm_scale: bool = Field(
        True, description="Treat the normalization's 1/std or 1/rms as a constant in derivatives."
    )
    attention_trace_type: AttentionTraceType | None = Field(
        None, description="Attention heads only; null means 'qk'."
    )
    downstream_trace_config: TraceConfig | None = Field(
        None, description="The node a 'v' trace projects on; required with 'v' and allowed only there."
    )

    @model_validator(mode="after")
    def check_options(self) -> TraceConfig:
        check_attention_options(self.node.type, self.attention_trace_type, self.downstream_trace_config)
        return self


class ActivationLocation(StrictModel):
    """A whole activation location: one layer's activations of one node type."""

    type: Literal["mlp_neuron", "attention_head", "autoencoder_latent", "logit", "logprob"]
    layer: Index | None = Field(None, description="Required for every type but logit and logprob.")
    pre_or_post_act: PreOrPostAct = "post"
    detach_layer_norm_scale: bool = True
    attention_trace_type: AttentionTraceType | None = None
    downstream_trace_config: TraceConfig | None = None
    autoencoder: str | None = Field(None, max_length=200, description="Required for autoencoder_latent.")

    @model_validator(mode="after")
    def check_options(self) -> ActivationLocation:
        check_attention_options(self.type, self.attention_trace_type, self.downstream_trace_config)
        if self.type in ("logit", "logprob"):
            if self.layer is not None:
                raise ValueError(f"{self.type} locations have no layer")
        elif self.layer is None:
            raise ValueError(f"{self.type} locations need a layer")
        if (self.autoencoder is None) == (self.type == "autoencoder_latent"):
            raise ValueError("autoencoder is required for autoencoder_latent locations and allowed only there")
        return self


class PromptInput(StrictModel):
    prompt: str | None = Field(None, description="Text, tokenized with the model's own tokenizer.")
    token_ids: list[TokenId] | None = Field(None, description="Token ids, used as given.")

    @model_validator(mode="after")
    def check_exactly_one(self) -> PromptInput:
        if (self.prompt is None) == (self.token_ids is None):
            raise ValueError("give exactly one of prompt and token_ids")
        return self


class ActivationRequest(PromptInput):
    trace_config: TraceConfig | None = Field(None, description="One node; give this or location.")
    location: ActivationLocation | None = Field(None, description="A whole location; give this or trace_config.")
    token: TokenPosition | None = Field(None, description="With location: only this token's activations.")
    top_k: int | None = Field(None, ge=1, description="With location: the k largest activations.")

    @model_validator(mode="after")
    def check_target(self) -> ActivationRequest:
        if (self.trace_config is None) == (self.location is None):
            raise ValueError("give exactly one of trace_config and location")
        if self.location is None and (self.token is not None or self.top_k is not None):
            raise ValueError("token and top_k apply to a location request only")
        return self


class GradientRequest(PromptInput):
    trace_config: TraceConfig
    upstream_nodes: list[NodeModel] | None = Field(
        None, description="Nodes whose direct effect on the traced node is returned."
    )


class ResidualLocationModel(StrictModel):
    name: Literal["resid_pre", "resid_mid", "resid_post", "resid_final"]
    layer: Index | None = Field(None, description="Required for every name but resid_final.")

    @model_validator(mode="after")
    def check_layer(self) -> ResidualLocationModel:
        if (self.layer is None) != (self.name == "resid_final"):
            raise ValueError("layer is required for resid_pre, resid_mid and resid_post, and not allowed for resid_final")
        return self


class NodeWrite(StrictModel):
    node: NodeModel


class VectorWrite(StrictModel):
    vector: list[list[float]] = Field(description="[n_tokens][d_model] vector added to the residual stream.")
    location: ResidualLocationModel


def write_kind(value: Any) -> str | None:
    """Pick the write variant by its key, so errors come from that variant alone."""
    if isinstance(value, dict):
        keys = set(value)
    elif isinstance(value, BaseModel):
        keys = set(type(value).model_fields)
    else:
        return None
    if "node" in keys:
        return "node_write"
    if "vector" in keys:
        return "vector_write"
    return None


WriteModel = Annotated[
    Annotated[NodeWrite, Tag("node_write")] | Annotated[VectorWrite, Tag("vector_write")],
    Discriminator(
        write_kind,
        custom_error_type="write_kind",
        custom_error_message="write needs either a 'node' or a 'vector' with a 'location'",
    ),
]


class JvpRequest(PromptInput):
    write: WriteModel
    downstream: ActivationLocation


class TokenizeRequest(StrictModel):
    prompt: str


class ResidualLocationOut(BaseModel):
    name: str
    layer: int | None


class PromptEcho(BaseModel):
    model: str
    token_ids: list[int]
    tokens: list[str]


class TopActivation(BaseModel):
    node: dict[str, Any]
    activation: float


class ActivationResponse(PromptEcho):
    activation: float | None = Field(None, description="The node's value, for a trace_config request.")
    residual_location: ResidualLocationOut
    activations: Any = Field(
        None, description="Nested lists shaped like the location; null marks attention entries that are masked."
    )
    top: list[TopActivation] | None = Field(None, description="With top_k: the largest activations, largest first.")


class GradientResponse(PromptEcho):
    activation: float
    residual_location: ResidualLocationOut
    gradient: list[list[float]] = Field(description="[n_tokens][d_model]")
    direct_effects: list[float | None] | None = Field(
        None, description="One per upstream node; null where the node writes after the residual location."
    )


class JvpResponse(PromptEcho):
    jvp: Any = Field(description="Shaped like the downstream location's activations.")
    upstream: bool
    write_location: ResidualLocationOut
    residual_location: ResidualLocationOut


class AutoencoderInfo(BaseModel):
    id: str
    input: str
    layers: list[int]
    n_latents: int
    activation: str


class ModelInfo(BaseModel):
    id: str
    architecture: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    vocab_size: int
    max_tokens: int
    max_top_k: int
    max_upstream_nodes: int
    max_body_bytes: int
    max_response_values: int
    max_queue: int
    dtype: str
    device: str
    autoencoders: list[AutoencoderInfo]


class TokenizeResponse(BaseModel):
    token_ids: list[int]
    tokens: list[str]


class HealthResponse(BaseModel):
    status: str


class ErrorItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorResponse(BaseModel):
    """The body of every error response."""

    detail: str
    errors: list[ErrorItem] = Field(default_factory=list, description="One entry per invalid field, for 422.")
