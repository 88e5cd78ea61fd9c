"""The work behind each model endpoint: checks, reconstituter calls and response bodies.

Functions here run on the model worker thread, never on the event loop. They return
response bodies as dicts of plain Python values.
"""

from __future__ import annotations

from typing import Any

import torch

from service.api import schemas
from service.api.serialization import scalar_to_json, tensor_to_json
from service.api.validation import InvalidRequest, RequestChecker
from service.core.locations import ResidualLocation
from service.core.nodes import LocationSpec, Node, NotAWriterError
from service.core.ranking import top_activations
from service.core.reconstituter import Reconstituter
from service.runtime import ModelRuntime


def tokenize(runtime: ModelRuntime, prompt: schemas.PromptInput) -> list[int]:
    """Return the prompt's token ids, checked against the vocabulary and the token limit."""
    if prompt.token_ids is not None:
        token_ids = list(prompt.token_ids)
        loc: tuple[str | int, ...] = ("body", "token_ids")
    else:
        assert prompt.prompt is not None
        token_ids = runtime.encode(prompt.prompt)
        loc = ("body", "prompt")
    if not token_ids:
        raise InvalidRequest(loc, "the prompt has no tokens; give a non-empty prompt or token_ids")
    limit = runtime.settings.max_tokens
    if len(token_ids) > limit:
        raise InvalidRequest(
            loc,
            f"the prompt has {len(token_ids)} tokens, more than the limit of {limit}; shorten it",
            status_code=413,
        )
    checker = RequestChecker(runtime.config, len(token_ids), {})
    checker.token_ids(token_ids, ("body", "token_ids"))
    return token_ids


def start(runtime: ModelRuntime, request: schemas.PromptInput) -> tuple[list[int], RequestChecker, dict[str, Any]]:
    token_ids = tokenize(runtime, request)
    checker = RequestChecker(runtime.config, len(token_ids), runtime.autoencoders)
    echo = {"model": runtime.model_id, "token_ids": token_ids, "tokens": runtime.decode_each(token_ids)}
    return token_ids, checker, echo


def reconstituter(runtime: ModelRuntime, token_ids: list[int]) -> Reconstituter:
    ids = torch.tensor(token_ids, dtype=torch.long, device=runtime.model.device)
    return Reconstituter(runtime.model, ids, runtime.autoencoders)


def node_json(spec: LocationSpec, index: tuple[int, ...]) -> dict[str, Any]:
    node: dict[str, Any] = {"type": spec.node_type}
    if spec.autoencoder is not None:
        node["autoencoder"] = spec.autoencoder
    if spec.layer is not None:
        node["layer"] = spec.layer
    node.update(zip(spec.kind.index_names, index))
    return node


def location_width(runtime: ModelRuntime, spec: LocationSpec, n_tokens: int) -> int:
    """Return how many numbers one token's slice of the location holds."""
    config = runtime.config
    if spec.node_type == "mlp_neuron":
        return config.d_mlp
    if spec.node_type == "attention_head":
        return n_tokens * config.n_heads
    if spec.node_type == "autoencoder_latent":
        assert spec.autoencoder is not None
        return runtime.autoencoders[spec.autoencoder].n_latents
    return config.vocab_size


def check_response_size(runtime: ModelRuntime, count: int, loc: tuple[str | int, ...], advice: str) -> None:
    limit = runtime.settings.max_response_values
    if count > limit:
        raise InvalidRequest(
            loc, f"the response would hold {count} numbers, over the limit of {limit}; {advice}", status_code=413
        )


def location_json(location: ResidualLocation) -> dict[str, Any]:
    return location.as_dict()


def activation(runtime: ModelRuntime, request: schemas.ActivationRequest) -> dict[str, Any]:
    token_ids, checker, body = start(runtime, request)
    core = reconstituter(runtime, token_ids)
    if request.trace_config is not None:
        node = checker.trace_config(request.trace_config, ("body", "trace_config"))
        body["activation"] = scalar_to_json(core.activation(node), "activation")
        body["residual_location"] = location_json(core.residual_location(node.spec))
        return body

    assert request.location is not None
    spec = checker.location(request.location, ("body", "location"))
    token = None if request.token is None else checker.token(request.token, ("body", "token"))
    if request.top_k is not None and request.top_k > runtime.settings.max_top_k:
        raise InvalidRequest(
            ("body", "top_k"), f"top_k {request.top_k} is over the limit of {runtime.settings.max_top_k}"
        )
    if request.top_k is None:
        tokens = 1 if token is not None else len(token_ids)
        count = tokens * location_width(runtime, spec, len(token_ids))
        check_response_size(runtime, count, ("body", "location"), "ask for one token or the top_k activations")
    activations = core.activations(spec)
    masked = spec.kind.masked(spec, len(token_ids))
    body["residual_location"] = location_json(core.residual_location(spec))
    if request.top_k is not None:
        top = top_activations(activations, request.top_k, token, masked)
        body["top"] = [
            {"node": node_json(spec, index), "activation": scalar_to_json(value, "activation")} for index, value in top
        ]
    elif token is not None:
        body["activations"] = tensor_to_json(
            activations[token], None if masked is None else masked[token], "activations"
        )
    else:
        body["activations"] = tensor_to_json(activations, masked, "activations")
    return body


def gradient(runtime: ModelRuntime, request: schemas.GradientRequest) -> dict[str, Any]:
    token_ids, checker, body = start(runtime, request)
    node = checker.trace_config(request.trace_config, ("body", "trace_config"))
    upstream: list[Node] = []
    if request.upstream_nodes is not None:
        limit = runtime.settings.max_upstream_nodes
        if len(request.upstream_nodes) > limit:
            raise InvalidRequest(
                ("body", "upstream_nodes"),
                f"{len(request.upstream_nodes)} upstream_nodes is over the limit of {limit}; split the request",
            )
        upstream = [
            checker.writer(item, ("body", "upstream_nodes", position))
            for position, item in enumerate(request.upstream_nodes)
        ]

    core = reconstituter(runtime, token_ids)
    result = core.gradient(node)
    body["activation"] = scalar_to_json(result.activation, "activation")
    body["residual_location"] = location_json(result.residual_location)
    body["gradient"] = tensor_to_json(result.gradient, None, "gradient")
    if request.upstream_nodes is not None:
        effects = [core.direct_effect(item, result) for item in upstream]
        body["direct_effects"] = [None if effect is None else scalar_to_json(effect, "direct effect") for effect in effects]
    return body


def jvp(runtime: ModelRuntime, request: schemas.JvpRequest) -> dict[str, Any]:
    token_ids, checker, body = start(runtime, request)
    spec = checker.location(request.downstream, ("body", "downstream"))
    count = len(token_ids) * location_width(runtime, spec, len(token_ids))
    check_response_size(runtime, count, ("body", "downstream"), "shorten the prompt or choose a smaller location")
    core = reconstituter(runtime, token_ids)
    write = request.write
    if isinstance(write, schemas.NodeWrite):
        writer = checker.writer(write.node, ("body", "write", "node"))
        try:
            vector, write_location = core.write(writer)
        except NotAWriterError as error:
            raise InvalidRequest(("body", "write", "node"), str(error)) from error
    else:
        write_location = checker.residual_location(write.location, ("body", "write", "location"))
        vector = vector_from_json(write.vector, len(token_ids), runtime.config.d_model)

    result = core.jvp(spec, vector, write_location)
    masked = spec.kind.masked(spec, len(token_ids))
    finite = torch.isfinite(result.jvp if masked is None else result.jvp.masked_fill(masked.expand_as(result.jvp), 0.0))
    if isinstance(write, schemas.VectorWrite) and not bool(finite.all()):
        raise InvalidRequest(
            ("body", "write", "vector"), "the JVP of this vector overflows float64; scale the vector down"
        )
    body["jvp"] = tensor_to_json(result.jvp, masked, "JVP")
    body["upstream"] = result.upstream
    body["write_location"] = location_json(result.write_location)
    body["residual_location"] = location_json(result.residual_location)
    return body


def vector_from_json(rows: list[list[float]], n_tokens: int, d_model: int) -> torch.Tensor:
    loc = ("body", "write", "vector")
    if len(rows) != n_tokens:
        raise InvalidRequest(loc, f"vector has {len(rows)} rows; it needs one per token, {n_tokens}")
    for position, row in enumerate(rows):
        if len(row) != d_model:
            raise InvalidRequest((*loc, position), f"vector row {position} has {len(row)} numbers; it needs d_model, {d_model}")
    vector = torch.tensor(rows, dtype=torch.float64)
    if not bool(torch.isfinite(vector).all()):
        raise InvalidRequest(loc, "vector contains NaN or infinite numbers; send finite numbers only")
    return vector


def tokenize_prompt(runtime: ModelRuntime, request: schemas.TokenizeRequest) -> dict[str, Any]:
    token_ids = runtime.encode(request.prompt)
    return {"token_ids": token_ids, "tokens": runtime.decode_each(token_ids)}
