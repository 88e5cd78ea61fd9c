"""Property-based fuzzing of every endpoint, in-process through the ASGI app.

The app serves the tiny Llama checkpoint with four tiny autoencoders, one per autoencoder
input, so that every node type and every residual location is reachable. Two kinds of
tests send requests to it:

* Schema-driven: schemathesis generates requests from the app's own OpenAPI document,
  both valid and invalid against it. Most of them fail the model's range checks and get
  422, which exercises the error paths.
* Targeted: the hypothesis strategies below build requests that are valid for this
  model and prompt, so the success path is fuzzed too, and every one must return 200.

Every response must have a documented status code other than 5xx and a body that
matches its response model in the OpenAPI document. Error bodies must also have the
shape {"detail": str, "errors": [{"loc", "msg", "type"}, ...]}. The model routes build
their responses with orjson, so FastAPI never checks them against their response models,
and these checks are the only ones that do.

Examples are derandomized, so every run sends the same requests. With the counts below,
the whole file took two to three minutes on two shared, busy CPU cores.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import strategies as st

from service.api.app import create_app
from service.loaders.autoencoders import AutoencoderSource, load_autoencoders
from service.model.autoencoder import AutoencoderInput
from service.runtime import prepare
from service.settings import Settings
from tests.conftest import TINY_VOCAB_SIZE, Checkpoint
from tests.test_autoencoders import N_LATENTS, write_saelens

# Shape of the tiny Llama checkpoint that tests/conftest.py saves.
N_LAYERS = 3
D_MODEL = 32
D_MLP = 48
N_HEADS = 4

MAX_TOKENS = 24
MAX_TOP_K = 20
MAX_UPSTREAM_NODES = 4
MAX_BODY_BYTES = 64 * 1024

# (id, input, layers, SAELens architecture options). Together they cover every input, and
# "mlp-out" has two layers, so that a latent must be looked up in the right one.
AUTOENCODERS: list[tuple[str, AutoencoderInput, tuple[int, ...], dict[str, Any]]] = [
    ("mlp-out", AutoencoderInput.RESID_DELTA_MLP, (1, 2), {"architecture": "topk", "k": 5}),
    ("attn-out", AutoencoderInput.RESID_DELTA_ATTN, (0,), {"architecture": "standard"}),
    ("resid", AutoencoderInput.RESID_PRE, (2,), {"architecture": "jumprelu"}),
    ("mlp-post", AutoencoderInput.MLP_POST_ACT, (1,), {"architecture": "standard"}),
]
AUTOENCODER_INPUTS = {name: source for name, source, _, _ in AUTOENCODERS}
AUTOENCODER_LAYERS = [(name, layer) for name, _, layers, _ in AUTOENCODERS for layer in layers]

STARTUP_TIMEOUT_SECONDS = 60.0

# Examples per operation in the fuzzing phase of the schema-driven test. Its coverage
# phase adds a fixed set of boundary and type-violation cases, which with schemathesis
# 4.32.5 number about 1400 for /activation, 1000 each for /gradient and /jvp, and fewer
# than 30 for each of the others. /model and /health take no input, so hypothesis stops
# after one fuzzing example for them.
SCHEMA_EXAMPLES = {
    "/activation": 100,
    "/gradient": 100,
    "/jvp": 100,
    "/tokenize": 100,
    "/model": 50,
    "/health": 50,
}

# Examples per targeted test, or per parameter of a parametrized one.
VALID_EXAMPLES = 100

FUZZ_CONFIG = schemathesis.Config.from_dict(
    {
        "generation": {"mode": "all", "deterministic": True},
        "checks": {
            # The schema cannot state the model's ranges (layers, tokens, neurons), so a
            # request that is valid against it may still get 422.
            "positive_data_acceptance": {"enabled": False},
        },
        # Failure reports hide every field whose name contains "token" unless this is off.
        "output": {"sanitization": {"enabled": False}},
        "operations": [
            {"include-path": path, "generation": {"max-examples": count}} for path, count in SCHEMA_EXAMPLES.items()
        ],
    }
)

FUZZ_SETTINGS = hypothesis.settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        hypothesis.HealthCheck.too_slow,
        hypothesis.HealthCheck.data_too_large,
        # `ready_app` is function-scoped because it only waits for the model to load,
        # which is needed once per test, not once per example.
        hypothesis.HealthCheck.function_scoped_fixture,
    ],
)

# A request known to succeed, sent before and after the fuzzing to show that the app still
# computes the same numbers.
PROBE_BODY = {
    "token_ids": [5, 80, 17, 250, 3, 99, 42],
    "trace_config": {"node": {"type": "mlp_neuron", "layer": 2, "token": -1, "neuron": 7}},
}


def service_settings() -> Settings:
    return Settings(
        device="cpu",
        dtype="float32",
        max_tokens=MAX_TOKENS,
        max_top_k=MAX_TOP_K,
        max_upstream_nodes=MAX_UPSTREAM_NODES,
        max_body_bytes=MAX_BODY_BYTES,
        autoencoders=[],
    )


# The OpenAPI document that the app serves at /openapi.json. FastAPI builds it from the
# routes alone, so this app is never started and loads no model. Each request names the
# app to send it to, which is the fixture's app on the tiny checkpoint.
# NOTE: schemathesis 4.32.5's fixture-based loader, `schemathesis.pytest.from_fixture`,
# fails under pytest 9.2 with "'Function' object has no attribute '_nodeid'", so the
# document is loaded eagerly here instead.
SCHEMA = schemathesis.openapi.from_dict(create_app(service_settings()).openapi(), config=FUZZ_CONFIG)


def write_autoencoders(directory: Path) -> list[AutoencoderSource]:
    sources = []
    for seed, (name, source, layers, options) in enumerate(AUTOENCODERS):
        width = D_MLP if source is AutoencoderInput.MLP_POST_ACT else D_MODEL
        for layer in layers:
            path = directory / f"{name}-{layer}"
            write_saelens(path, width, source=source, layer=layer, seed=seed, **options)
            sources.append(AutoencoderSource(name, path))
    return sources


def send(app: FastAPI, method: str, path: str, body: Any = None) -> schemathesis.Response:
    """Send one request to the in-process app and check its response against the schema.

    A `bytes` body is sent as it is, with Content-Type application/json.
    """
    operation = SCHEMA[path][method]
    case = operation.Case() if body is None else operation.Case(body=body, media_type="application/json")
    response = case.call_and_validate(app=app)
    assert_error_shape(response)
    return response


def assert_error_shape(response: schemathesis.Response) -> None:
    """Check the shape of an error body. It is stricter than the schema, which does not require `errors`."""
    if response.status_code < 400:
        return
    body = response.json()
    assert isinstance(body, dict), f"{response.status_code} body is not a JSON object: {response.text}"
    assert set(body) == {"detail", "errors"}, f"{response.status_code} body has keys {sorted(body)}"
    assert isinstance(body["detail"], str)
    assert body["detail"], "the error detail is empty"
    assert isinstance(body["errors"], list)
    for item in body["errors"]:
        assert set(item) == {"loc", "msg", "type"}, f"error item has keys {sorted(item)}"
        assert all(isinstance(part, (str, int)) for part in item["loc"])
        assert isinstance(item["msg"], str)
        assert isinstance(item["type"], str)
    if response.status_code == 422:
        assert body["errors"], "a 422 names at least one invalid field"
    if response.status_code == 503:
        assert "retry-after" in {name.lower() for name in response.headers}


def wait_until_healthy(app: FastAPI) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while SCHEMA["/health"]["GET"].Case().call(app=app).status_code != 200:
        assert time.monotonic() < deadline, f"/health did not return 200 within {STARTUP_TIMEOUT_SECONDS} s"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def fuzzed_app(tiny_llama: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    """The app on the tiny Llama checkpoint and its autoencoders, with the probe's response in `state.probe`."""
    sources = write_autoencoders(tmp_path_factory.mktemp("fuzz-autoencoders"))
    autoencoders = load_autoencoders(sources, tiny_llama.loaded.model.config)
    app = create_app(service_settings(), load=lambda settings: prepare(settings, tiny_llama.loaded, autoencoders))
    wait_until_healthy(app)
    app.state.probe = send(app, "POST", "/activation", PROBE_BODY).json()
    return app


@pytest.fixture
def ready_app(fuzzed_app: FastAPI) -> FastAPI:
    """`fuzzed_app` with its model loaded.

    The schemathesis pytest plugin ends the lifespan of every ASGI app that a test reached
    when the test ends. The next request starts the lifespan again, and with it a new model
    load, so each test waits until /health returns 200 before its first request.
    """
    wait_until_healthy(fuzzed_app)
    return fuzzed_app


# Schema-driven fuzzing


@SCHEMA.parametrize()
@FUZZ_SETTINGS
def test_schema_fuzzing(ready_app: FastAPI, case: schemathesis.Case) -> None:
    response = case.call_and_validate(app=ready_app)
    assert_error_shape(response)


@pytest.mark.parametrize("path", ["/activation", "/gradient", "/jvp", "/tokenize"])
def test_body_not_utf8(ready_app: FastAPI, path: str) -> None:
    """A JSON body with a byte that is not UTF-8 gets a documented 4xx."""
    response = send(ready_app, "POST", path, b'{"prompt": "\xff"}')

    assert 400 <= response.status_code < 500


# Requests valid for the tiny model


def token_positions(n_tokens: int) -> st.SearchStrategy[int]:
    """A token position in the prompt, counted from the start or, when negative, from the end."""
    return st.integers(-n_tokens, n_tokens - 1)


def token_ids() -> st.SearchStrategy[int]:
    return st.integers(0, TINY_VOCAB_SIZE - 1)


def layers(low: int = 0) -> st.SearchStrategy[int]:
    return st.integers(low, N_LAYERS - 1)


def mlp_neurons(n_tokens: int, layer: st.SearchStrategy[int] | None = None) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "type": st.just("mlp_neuron"),
            "layer": layers() if layer is None else layer,
            "token": token_positions(n_tokens),
            "neuron": st.integers(0, D_MLP - 1),
        }
    )


@st.composite
def attention_heads(
    draw: st.DrawFn, n_tokens: int, layer: st.SearchStrategy[int] | None = None
) -> dict[str, Any]:
    """An attention head node whose key is at or before its query, as causal attention needs."""
    token = draw(token_positions(n_tokens))
    attended = draw(st.integers(0, token % n_tokens))
    if draw(st.booleans()):
        attended -= n_tokens
    return {
        "type": "attention_head",
        "layer": draw(layers() if layer is None else layer),
        "token": token,
        "attended_token": attended,
        "head": draw(st.integers(0, N_HEADS - 1)),
    }


@st.composite
def autoencoder_latents(
    draw: st.DrawFn, n_tokens: int, covered: list[tuple[str, int]] | None = None
) -> dict[str, Any]:
    """A latent of one of the (autoencoder, layer) pairs in `covered`, by default of any loaded one."""
    name, layer = draw(st.sampled_from(AUTOENCODER_LAYERS if covered is None else covered))
    return {
        "type": "autoencoder_latent",
        "autoencoder": name,
        "layer": layer,
        "token": draw(token_positions(n_tokens)),
        "latent": draw(st.integers(0, N_LATENTS - 1)),
    }


def output_nodes(n_tokens: int) -> st.SearchStrategy[dict[str, Any]]:
    """Nodes computed from the final residual: logit, logprob and logit_diff."""
    single = st.fixed_dictionaries(
        {"type": st.sampled_from(["logit", "logprob"]), "token": token_positions(n_tokens), "token_id": token_ids()}
    )
    difference = st.fixed_dictionaries(
        {
            "type": st.just("logit_diff"),
            "token": token_positions(n_tokens),
            "target_token_id": token_ids(),
            "distractor_token_id": token_ids(),
        }
    )
    return st.one_of(single, difference)


def writer_nodes(n_tokens: int) -> st.SearchStrategy[dict[str, Any]]:
    """Nodes that write to the residual stream, so they can be upstream nodes or JVP writes."""
    return st.one_of(mlp_neurons(n_tokens), attention_heads(n_tokens), autoencoder_latents(n_tokens))


def any_nodes(n_tokens: int) -> st.SearchStrategy[dict[str, Any]]:
    return st.one_of(
        mlp_neurons(n_tokens), attention_heads(n_tokens), autoencoder_latents(n_tokens), output_nodes(n_tokens)
    )


def options(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Optional request fields, each either left out so that its default applies, or drawn."""
    return st.fixed_dictionaries({}, optional=fields)


def pre_or_post(allow_pre: bool) -> st.SearchStrategy[str]:
    return st.sampled_from(["pre", "post"] if allow_pre else ["post"])


def absent_attention_options() -> st.SearchStrategy[dict[str, Any]]:
    """The options that apply to attention heads only, left out or given as null."""
    return options(attention_trace_type=st.none(), downstream_trace_config=st.none())


def reads_after_head_write(head_layer: int) -> list[tuple[str, int]]:
    """Return the (autoencoder, layer) pairs that read at or after resid_mid[head_layer], where the head writes."""
    covered = []
    for name, layer in AUTOENCODER_LAYERS:
        reads_mid = AUTOENCODER_INPUTS[name] in (AutoencoderInput.RESID_DELTA_MLP, AutoencoderInput.MLP_POST_ACT)
        if layer > head_layer or (reads_mid and layer == head_layer):
            covered.append((name, layer))
    return covered


def value_trace_downstream(n_tokens: int, head_layer: int) -> st.SearchStrategy[dict[str, Any]]:
    """A trace config that a 'v' trace at `head_layer` can project on, because it reads after the head writes.

    An MLP neuron, or a latent of an MLP-side autoencoder, at the head's own layer reads
    resid_mid, where the head writes. An attention head, or a latent of an autoencoder
    on the residual or on attention, must be in a later layer.
    """
    nodes = [mlp_neurons(n_tokens, layers(head_layer)), output_nodes(n_tokens)]
    if head_layer + 1 < N_LAYERS:
        nodes.append(attention_heads(n_tokens, layers(head_layer + 1)))
    covered = reads_after_head_write(head_layer)
    if covered:
        nodes.append(autoencoder_latents(n_tokens, covered))
    return st.one_of(nodes).flatmap(lambda node: trace_configs_for(node, n_tokens, allow_value_trace=False))


def attention_options(n_tokens: int, layer: int, allow_value_trace: bool) -> st.SearchStrategy[dict[str, Any]]:
    """Options of an attention head trace: q, k, qk or null, or a 'v' trace with its downstream node."""
    plain = options(
        attention_trace_type=st.sampled_from([None, "q", "k", "qk"]),
        downstream_trace_config=st.none(),
        pre_or_post_act=pre_or_post(allow_pre=True),
    )
    if not allow_value_trace:
        return plain
    value = st.fixed_dictionaries(
        {"attention_trace_type": st.just("v"), "downstream_trace_config": value_trace_downstream(n_tokens, layer)},
        optional={"pre_or_post_act": pre_or_post(allow_pre=False)},
    )
    return st.one_of(plain, value)


def merged(*parts: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """One dictionary with the keys of one draw from each strategy."""
    return st.tuples(*parts).map(lambda drawn: {key: value for part in drawn for key, value in part.items()})


def trace_configs_for(
    node: dict[str, Any], n_tokens: int, allow_value_trace: bool = True
) -> st.SearchStrategy[dict[str, Any]]:
    """A TraceConfig for `node`, with trace options that apply to its type."""
    if node["type"] == "attention_head":
        specific = attention_options(n_tokens, node["layer"], allow_value_trace)
    else:
        allow_pre = node["type"] in ("mlp_neuron", "autoencoder_latent")
        specific = merged(options(pre_or_post_act=pre_or_post(allow_pre)), absent_attention_options())
    return merged(st.just({"node": node}), options(detach_layer_norm_scale=st.booleans()), specific)


def trace_configs(n_tokens: int) -> st.SearchStrategy[dict[str, Any]]:
    return any_nodes(n_tokens).flatmap(lambda node: trace_configs_for(node, n_tokens))


@st.composite
def locations(draw: st.DrawFn, n_tokens: int) -> dict[str, Any]:
    """A whole activation location (an ActivationLocation), with options that apply to its type."""
    kind = draw(st.sampled_from(["mlp_neuron", "attention_head", "autoencoder_latent", "logit", "logprob"]))
    location: dict[str, Any] = {"type": kind}
    if kind == "autoencoder_latent":
        location["autoencoder"], location["layer"] = draw(st.sampled_from(AUTOENCODER_LAYERS))
    elif kind in ("mlp_neuron", "attention_head"):
        location["layer"] = draw(layers())
    location.update(draw(options(detach_layer_norm_scale=st.booleans())))
    if kind == "attention_head":
        location.update(draw(attention_options(n_tokens, location["layer"], allow_value_trace=True)))
    else:
        location.update(draw(options(pre_or_post_act=pre_or_post(kind in ("mlp_neuron", "autoencoder_latent")))))
        location.update(draw(absent_attention_options()))
    return location


TEXT_PROMPTS = [
    "The capital of France is Paris.",
    "A transformer reads tokens.",
    "0123456789",
    " gradients",
]


@st.composite
def prompt_inputs(draw: st.DrawFn, encode: Callable[[str], list[int]]) -> tuple[dict[str, Any], list[int]]:
    """A prompt given as token_ids or as text, and its token ids, with 1 to MAX_TOKENS tokens.

    A byte-level BPE token covers at least one UTF-8 byte and a character takes at most
    four bytes, so text of MAX_TOKENS // 4 characters never has too many tokens.
    """
    if draw(st.booleans()):
        ids = draw(st.lists(token_ids(), min_size=1, max_size=MAX_TOKENS))
        return {"token_ids": ids}, ids
    text = draw(st.one_of(st.sampled_from(TEXT_PROMPTS), st.text(min_size=1, max_size=MAX_TOKENS // 4)))
    ids = encode(text)
    hypothesis.assume(1 <= len(ids) <= MAX_TOKENS)
    return {"prompt": text}, ids


def activation_node_bodies(n_tokens: int) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({"trace_config": trace_configs(n_tokens)})


def activation_location_bodies(n_tokens: int) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"location": locations(n_tokens)},
        optional={"token": token_positions(n_tokens), "top_k": st.integers(1, MAX_TOP_K)},
    )


def gradient_bodies(n_tokens: int) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"trace_config": trace_configs(n_tokens)},
        optional={"upstream_nodes": st.lists(writer_nodes(n_tokens), max_size=MAX_UPSTREAM_NODES)},
    )


def residual_locations() -> st.SearchStrategy[dict[str, Any]]:
    with_layer = st.fixed_dictionaries(
        {"name": st.sampled_from(["resid_pre", "resid_mid", "resid_post"]), "layer": layers()}
    )
    final = st.fixed_dictionaries({"name": st.just("resid_final")}, optional={"layer": st.none()})
    return st.one_of(with_layer, final)


def write_vectors(n_tokens: int, values: st.SearchStrategy[float]) -> st.SearchStrategy[list[list[float]]]:
    """An [n_tokens][d_model] write vector."""
    row = st.lists(values, min_size=D_MODEL, max_size=D_MODEL)
    return st.lists(row, min_size=n_tokens, max_size=n_tokens)


# Entries of this size keep every JVP of the tiny model far from float32 overflow.
MODERATE_VALUES = st.floats(-100.0, 100.0, allow_nan=False)


def jvp_bodies(n_tokens: int) -> st.SearchStrategy[dict[str, Any]]:
    node_write = st.fixed_dictionaries({"node": writer_nodes(n_tokens)})
    vector_write = st.fixed_dictionaries(
        {"vector": write_vectors(n_tokens, MODERATE_VALUES), "location": residual_locations()}
    )
    return st.fixed_dictionaries({"write": st.one_of(node_write, vector_write), "downstream": locations(n_tokens)})


VALID_BODIES: dict[str, tuple[str, Callable[[int], st.SearchStrategy[dict[str, Any]]]]] = {
    "activation_node": ("/activation", activation_node_bodies),
    "activation_location": ("/activation", activation_location_bodies),
    "gradient": ("/gradient", gradient_bodies),
    "jvp": ("/jvp", jvp_bodies),
}


def describe(body: dict[str, Any]) -> str:
    """Return a label with the prompt form, node types and trace option of a request, for hypothesis's statistics."""
    target = body.get("trace_config") or body.get("location") or body.get("downstream") or {}
    node_type = target.get("node", target).get("type")
    trace = target.get("attention_trace_type") or ""
    write = body.get("write", {})
    writer = ""
    if "node" in write:
        writer = write["node"]["type"]
    elif "vector" in write:
        writer = "vector"
    form = "prompt" if "prompt" in body else "token_ids"
    return " ".join(part for part in (form, writer, node_type, trace) if part)


def shape_of(nested: Any) -> tuple[int, ...]:
    """Return the shape of a rectangular nested list. Raise AssertionError if it is ragged."""
    if not isinstance(nested, list):
        return ()
    inner = {shape_of(item) for item in nested}
    assert len(inner) <= 1, f"ragged nested list: inner shapes {sorted(inner)}"
    return (len(nested), *(inner.pop() if inner else ()))


def check_success(path: str, body: dict[str, Any], ids: list[int], result: dict[str, Any]) -> None:
    """Check the prompt echo and the shapes that depend on the request, which the schema cannot state."""
    n_tokens = len(ids)
    assert result["token_ids"] == ids
    assert len(result["tokens"]) == n_tokens
    if path == "/gradient":
        assert shape_of(result["gradient"]) == (n_tokens, D_MODEL)
        if "upstream_nodes" in body:
            assert len(result["direct_effects"]) == len(body["upstream_nodes"])
    elif path == "/jvp":
        assert shape_of(result["jvp"])[0] == n_tokens
    elif "top_k" in body:
        values = [entry["activation"] for entry in result["top"]]
        assert 1 <= len(values) <= body["top_k"]
        assert values == sorted(values, reverse=True)
    elif "location" in body:
        assert result["activations"] is not None
    else:
        assert isinstance(result["activation"], float)


@pytest.mark.parametrize("kind", list(VALID_BODIES))
@hypothesis.settings(FUZZ_SETTINGS, max_examples=VALID_EXAMPLES)
@hypothesis.given(data=st.data())
def test_valid_requests_succeed(ready_app: FastAPI, kind: str, data: st.DataObject) -> None:
    path, bodies = VALID_BODIES[kind]
    prompt, ids = data.draw(prompt_inputs(ready_app.state.runtime.encode), label="prompt")
    body = {**prompt, **data.draw(bodies(len(ids)), label="body")}
    hypothesis.event(describe(body))

    response = send(ready_app, "POST", path, body)

    assert response.status_code == 200, response.text
    check_success(path, body, ids, response.json())


@hypothesis.settings(FUZZ_SETTINGS, max_examples=VALID_EXAMPLES)
@hypothesis.given(prompt=st.text(max_size=200))
def test_tokenize_any_text(ready_app: FastAPI, prompt: str) -> None:
    response = send(ready_app, "POST", "/tokenize", {"prompt": prompt})

    assert response.status_code == 200, response.text
    result = response.json()
    assert result["token_ids"] == ready_app.state.runtime.encode(prompt)
    assert len(result["tokens"]) == len(result["token_ids"])


JVP_TOKEN_IDS = [5, 80]


def one_entry_vector(value: float) -> list[list[float]]:
    return [[value] + [0.0] * (D_MODEL - 1)] + [[0.0] * D_MODEL for _ in JVP_TOKEN_IDS[1:]]


@hypothesis.settings(FUZZ_SETTINGS, max_examples=VALID_EXAMPLES)
@hypothesis.given(
    vector=write_vectors(len(JVP_TOKEN_IDS), st.floats(allow_nan=False, allow_infinity=False)),
    location=residual_locations(),
    downstream=locations(len(JVP_TOKEN_IDS)),
)
# Above float32's maximum of about 3.4e38.
@hypothesis.example(
    vector=one_entry_vector(1e39),
    location={"name": "resid_pre", "layer": 0},
    downstream={"type": "mlp_neuron", "layer": 0},
)
# Within float32's range, but its JVP on the logits is not.
@hypothesis.example(
    vector=one_entry_vector(3e38),
    location={"name": "resid_pre", "layer": 0},
    downstream={"type": "logit"},
)
def test_jvp_any_finite_vector(
    ready_app: FastAPI, vector: list[list[float]], location: dict[str, Any], downstream: dict[str, Any]
) -> None:
    """A write vector of finite numbers, however large, gets a result or a 422, never a server error."""
    body = {"token_ids": JVP_TOKEN_IDS, "write": {"vector": vector, "location": location}, "downstream": downstream}

    response = send(ready_app, "POST", "/jvp", body)

    assert response.status_code in (200, 422), response.text


# After the fuzzing


def test_model_unchanged_after_fuzzing(ready_app: FastAPI) -> None:
    """The app still loads and computes the same numbers as before the tests above ran.

    Each test ran its own lifespan of the app, but all of them shared the model's weights,
    the autoencoders and the tokenizer, which no request may change.
    """
    assert send(ready_app, "GET", "/health").json() == {"status": "ok"}
    assert send(ready_app, "POST", "/activation", PROBE_BODY).json() == ready_app.state.probe
