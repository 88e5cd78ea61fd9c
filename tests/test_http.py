"""The HTTP contract, exercised through FastAPI's in-process TestClient on the tiny checkpoints.

Numbers are checked against `transformers` running the same weights, against a second
request to the service, or by shape. The reconstituter tests cover numerical accuracy in
depth. These tests check that the HTTP layer passes requests and results through intact,
and that it rejects every kind of bad input with a 4xx whose detail explains the error.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
import pytest
import torch
from fastapi.testclient import TestClient
from tokenizers import Tokenizer

from service.api.app import create_app
from service.runtime import ModelRuntime, prepare
from service.settings import Settings
from tests import reference as ref
from tests.conftest import TINY_VOCAB_SIZE, Checkpoint, assert_close

TOKEN_IDS = [5, 80, 17, 250, 3, 99, 42, 7]
N_TOKENS = len(TOKEN_IDS)
PROMPT = "The capital of France is Paris."

MAX_TOKENS = 24
MAX_BODY_BYTES = 64 * 1024
MAX_TOP_K = 20
MAX_UPSTREAM_NODES = 4

# Shapes of the tiny checkpoints that tests/conftest.py saves.
D_MODEL = 32
D_MLP = {"llama": 48, "gpt2": 128}
N_HEADS = 4

STARTUP_TIMEOUT_SECONDS = 30.0


def service_settings() -> Settings:
    # The device is pinned because `prepare` moves the session-wide checkpoint's model in place,
    # and other test modules run it on the CPU.
    return Settings(
        device="cpu",
        dtype="float32",
        max_tokens=MAX_TOKENS,
        max_body_bytes=MAX_BODY_BYTES,
        max_top_k=MAX_TOP_K,
        max_upstream_nodes=MAX_UPSTREAM_NODES,
    )


def wait_until_healthy(client: TestClient) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while client.get("/health").status_code != 200:
        assert time.monotonic() < deadline, f"/health did not return 200 within {STARTUP_TIMEOUT_SECONDS} s"
        time.sleep(0.01)


@contextmanager
def serve(checkpoint: Checkpoint) -> Iterator[TestClient]:
    """Run the app on `checkpoint` with its lifespan, and wait until the model is loaded."""
    app = create_app(service_settings(), load=lambda settings: prepare(settings, checkpoint.loaded))
    # Server errors come back as 500 responses, so that a test reports them as a wrong status.
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_until_healthy(client)
        yield client


@pytest.fixture(scope="module")
def llama(tiny_llama: Checkpoint) -> Iterator[TestClient]:
    with serve(tiny_llama) as client:
        yield client


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2: Checkpoint) -> Iterator[TestClient]:
    with serve(tiny_gpt2) as client:
        yield client


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def served(request: pytest.FixtureRequest) -> tuple[TestClient, Checkpoint]:
    """A (client, checkpoint) pair for each tiny checkpoint."""
    client: TestClient = request.getfixturevalue(request.param)
    checkpoint: Checkpoint = request.getfixturevalue(f"tiny_{request.param}")
    return client, checkpoint


def post_ok(client: TestClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post(path, json=body)
    assert response.status_code == 200, f"POST {path} returned {response.status_code}: {response.text}"
    result: dict[str, Any] = response.json()
    return result


def get_ok(client: TestClient, path: str) -> dict[str, Any]:
    response = client.get(path)
    assert response.status_code == 200, f"GET {path} returned {response.status_code}: {response.text}"
    result: dict[str, Any] = response.json()
    return result


def architecture(checkpoint: Checkpoint) -> str:
    return "llama" if ref.is_llama(checkpoint.reference) else "gpt2"


def mlp_node(layer: int, token: int, neuron: int) -> dict[str, Any]:
    return {"type": "mlp_neuron", "layer": layer, "token": token, "neuron": neuron}


def head_node(layer: int, token: int, attended_token: int, head: int) -> dict[str, Any]:
    return {"type": "attention_head", "layer": layer, "token": token, "attended_token": attended_token, "head": head}


def logit_node(token: int, token_id: int) -> dict[str, Any]:
    return {"type": "logit", "token": token, "token_id": token_id}


def mlp_location(layer: int, pre_or_post_act: str = "post") -> dict[str, Any]:
    return {"type": "mlp_neuron", "layer": layer, "pre_or_post_act": pre_or_post_act}


def attention_location(layer: int, pre_or_post_act: str = "post") -> dict[str, Any]:
    return {"type": "attention_head", "layer": layer, "pre_or_post_act": pre_or_post_act}


def activation_of(node: dict[str, Any], **options: Any) -> dict[str, Any]:
    return {"token_ids": TOKEN_IDS, "trace_config": {"node": node, **options}}


def location_request(location: dict[str, Any], **options: Any) -> dict[str, Any]:
    return {"token_ids": TOKEN_IDS, "location": location, **options}


def zero_vector() -> list[list[float]]:
    return [[0.0] * D_MODEL for _ in range(N_TOKENS)]


def vector_write(vector: list[list[float]], name: str = "resid_post", layer: int | None = 0) -> dict[str, Any]:
    return {"vector": vector, "location": {"name": name, "layer": layer}}


def shape_of(nested: Any) -> tuple[int, ...]:
    """Return the shape of a rectangular nested list. Raise AssertionError if it is ragged."""
    if not isinstance(nested, list):
        return ()
    inner = {shape_of(item) for item in nested}
    assert len(inner) <= 1, f"ragged nested list: inner shapes {sorted(inner)}"
    return (len(nested), *(inner.pop() if inner else ()))


def assert_echo(body: dict[str, Any], token_ids: list[int], model_id: str) -> None:
    assert body["model"] == model_id
    assert body["token_ids"] == token_ids
    assert len(body["tokens"]) == len(token_ids)
    assert all(isinstance(token, str) for token in body["tokens"])


def model_id_of(client: TestClient) -> str:
    model_id: str = client.get("/model").json()["id"]
    return model_id


def assert_null_exactly_at_masked(attention: list[Any]) -> None:
    """Check that a [n_query][n_key][n_heads] list is null exactly where the key follows the query."""
    for query, row in enumerate(attention):
        for key, heads in enumerate(row):
            for head, value in enumerate(heads):
                if key > query:
                    assert value is None, f"masked entry [{query}][{key}][{head}] is {value}, not null"
                else:
                    assert isinstance(value, float), f"entry [{query}][{key}][{head}] is {value!r}, not a number"


def assert_no_non_finite_literals(content: bytes) -> None:
    assert b"NaN" not in content
    assert b"Infinity" not in content


# Happy paths


def test_health_ok(llama: TestClient) -> None:
    response = llama.get("/health")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_model_info_fields(llama: TestClient, tiny_llama: Checkpoint) -> None:
    config = tiny_llama.reference.config
    info = get_ok(llama, "/model")

    assert info["architecture"] == "llama"
    assert info["n_layers"] == config.num_hidden_layers
    assert info["d_model"] == config.hidden_size
    assert info["n_heads"] == config.num_attention_heads
    assert info["n_kv_heads"] == config.num_key_value_heads
    assert info["d_head"] == config.hidden_size // config.num_attention_heads
    assert info["d_mlp"] == config.intermediate_size
    assert info["vocab_size"] == config.vocab_size
    assert info["max_tokens"] == MAX_TOKENS
    assert info["max_top_k"] == MAX_TOP_K
    assert info["max_upstream_nodes"] == MAX_UPSTREAM_NODES
    assert info["max_body_bytes"] == MAX_BODY_BYTES
    assert info["dtype"] == "float32"
    assert info["device"] == "cpu"
    assert info["autoencoders"] == []
    assert isinstance(info["id"], str)
    assert info["id"] != ""


def test_tokenize_round_trip(llama: TestClient, tiny_llama: Checkpoint) -> None:
    expected_ids = Tokenizer.from_file(str(tiny_llama.directory / "tokenizer.json")).encode(PROMPT).ids
    body = post_ok(llama, "/tokenize", {"prompt": PROMPT})

    assert body["token_ids"] == expected_ids
    assert "".join(body["tokens"]) == PROMPT


def test_prompt_matches_tokenize(llama: TestClient) -> None:
    token_ids = post_ok(llama, "/tokenize", {"prompt": PROMPT})["token_ids"]
    body = post_ok(llama, "/activation", {"prompt": PROMPT, "trace_config": {"node": mlp_node(0, -1, 0)}})

    assert_echo(body, token_ids, model_id_of(llama))


def test_activation_node_matches_reference(served: tuple[TestClient, Checkpoint]) -> None:
    client, checkpoint = served
    hooked = ref.Hooked(checkpoint.reference, TOKEN_IDS)
    body = post_ok(client, "/activation", activation_of(mlp_node(1, 5, 7)))

    assert_echo(body, TOKEN_IDS, model_id_of(client))
    assert body["residual_location"] == {"name": "resid_mid", "layer": 1}
    assert_close(body["activation"], hooked.mlp_post[1][5, 7], "hidden_states")


def test_activation_mlp_location(served: tuple[TestClient, Checkpoint]) -> None:
    client, checkpoint = served
    hooked = ref.Hooked(checkpoint.reference, TOKEN_IDS)
    body = post_ok(client, "/activation", location_request(mlp_location(1)))

    assert_echo(body, TOKEN_IDS, model_id_of(client))
    assert shape_of(body["activations"]) == (N_TOKENS, D_MLP[architecture(checkpoint)])
    assert_close(torch.tensor(body["activations"]), hooked.mlp_post[1], "hidden_states")


def test_activation_attention_location(served: tuple[TestClient, Checkpoint]) -> None:
    client, checkpoint = served
    hooked = ref.Hooked(checkpoint.reference, TOKEN_IDS)
    body = post_ok(client, "/activation", location_request(attention_location(2)))
    activations = body["activations"]

    assert shape_of(activations) == (N_TOKENS, N_TOKENS, N_HEADS)
    assert_null_exactly_at_masked(activations)
    # Masked entries are null in the response and 0 in transformers' probabilities.
    values = torch.tensor([[[0.0 if v is None else v for v in heads] for heads in row] for row in activations])
    assert_close(values, hooked.attention_probs[2], "hidden_states")


def test_attention_logits_location(llama: TestClient) -> None:
    response = llama.post("/activation", json=location_request(attention_location(0, "pre")))

    assert response.status_code == 200
    assert_no_non_finite_literals(response.content)
    assert_null_exactly_at_masked(response.json()["activations"])


def test_attention_logits_one_token(llama: TestClient) -> None:
    response = llama.post("/activation", json=location_request(attention_location(0, "pre"), token=2))
    row = response.json()["activations"]

    assert response.status_code == 200
    assert_no_non_finite_literals(response.content)
    assert shape_of(row) == (N_TOKENS, N_HEADS)
    assert all(value is None for heads in row[3:] for value in heads)
    assert all(isinstance(value, float) for heads in row[:3] for value in heads)


def test_attention_logits_top_k(llama: TestClient) -> None:
    full = post_ok(llama, "/activation", location_request(attention_location(0, "pre")))["activations"]
    response = llama.post("/activation", json=location_request(attention_location(0, "pre"), top_k=MAX_TOP_K))
    top = response.json()["top"]

    assert response.status_code == 200
    assert_no_non_finite_literals(response.content)
    assert len(top) == MAX_TOP_K
    for entry in top:
        node = entry["node"]
        assert node["attended_token"] <= node["token"]
        assert entry["activation"] == full[node["token"]][node["attended_token"]][node["head"]]


def test_attention_logits_jvp(llama: TestClient) -> None:
    write = vector_write([[0.01 * (row + 1)] * D_MODEL for row in range(N_TOKENS)], "resid_pre", 1)
    response = llama.post(
        "/jvp", json={"token_ids": TOKEN_IDS, "write": write, "downstream": attention_location(1, "pre")}
    )

    assert response.status_code == 200, response.text
    assert_no_non_finite_literals(response.content)
    assert_null_exactly_at_masked(response.json()["jvp"])


def test_top_k_whole_location(llama: TestClient) -> None:
    full = post_ok(llama, "/activation", location_request(mlp_location(1)))["activations"]
    top = post_ok(llama, "/activation", location_request(mlp_location(1), top_k=5))["top"]
    values = [entry["activation"] for entry in top]
    everything = sorted((value for row in full for value in row), reverse=True)

    assert len(top) == 5
    assert values == sorted(values, reverse=True)
    assert values == everything[:5]
    for entry in top:
        node = entry["node"]
        assert node["type"] == "mlp_neuron"
        assert node["layer"] == 1
        assert entry["activation"] == full[node["token"]][node["neuron"]]


def test_top_k_one_token(llama: TestClient) -> None:
    full = post_ok(llama, "/activation", location_request(mlp_location(1)))["activations"]
    top = post_ok(llama, "/activation", location_request(mlp_location(1), token=3, top_k=4))["top"]
    values = [entry["activation"] for entry in top]

    assert len(top) == 4
    assert all(entry["node"]["token"] == 3 for entry in top)
    assert values == sorted(full[3], reverse=True)[:4]
    assert all(entry["activation"] == full[3][entry["node"]["neuron"]] for entry in top)


def test_location_one_token(llama: TestClient) -> None:
    full = post_ok(llama, "/activation", location_request(mlp_location(2)))["activations"]
    row = post_ok(llama, "/activation", location_request(mlp_location(2), token=4))["activations"]

    assert row == full[4]


def test_negative_token_node(llama: TestClient) -> None:
    negative = post_ok(llama, "/activation", activation_of(mlp_node(1, -1, 7)))
    positive = post_ok(llama, "/activation", activation_of(mlp_node(1, N_TOKENS - 1, 7)))

    assert negative == positive


def test_negative_token_location(llama: TestClient) -> None:
    negative = post_ok(llama, "/activation", location_request(attention_location(1), token=-2))
    positive = post_ok(llama, "/activation", location_request(attention_location(1), token=N_TOKENS - 2))

    assert negative == positive


def test_negative_token_top_k(llama: TestClient) -> None:
    negative = post_ok(llama, "/activation", location_request(mlp_location(0), token=-3, top_k=3))
    positive = post_ok(llama, "/activation", location_request(mlp_location(0), token=N_TOKENS - 3, top_k=3))

    assert negative == positive


def test_negative_attended_token(llama: TestClient) -> None:
    negative = post_ok(llama, "/activation", activation_of(head_node(1, -1, -3, 2)))
    positive = post_ok(llama, "/activation", activation_of(head_node(1, N_TOKENS - 1, N_TOKENS - 3, 2)))

    assert negative == positive


def reference_mlp_gradient(checkpoint: Checkpoint, layer: int, token: int, neuron: int) -> torch.Tensor:
    """Differentiate one MLP neuron with respect to resid_mid[layer], through transformers' modules."""
    hooked = ref.Hooked(checkpoint.reference, TOKEN_IDS)
    resid = hooked.resid_mid[layer].clone().requires_grad_(True)
    with torch.enable_grad():
        _, post = ref.mlp_activations(checkpoint.reference, layer, resid, detach_scale=False)
        (gradient,) = torch.autograd.grad(post[token, neuron], resid)
    return gradient


def test_gradient_matches_reference(served: tuple[TestClient, Checkpoint]) -> None:
    client, checkpoint = served
    trace_config = {"node": mlp_node(2, 6, 11), "detach_layer_norm_scale": False}
    body = post_ok(client, "/gradient", {"token_ids": TOKEN_IDS, "trace_config": trace_config})

    assert_echo(body, TOKEN_IDS, model_id_of(client))
    assert body["residual_location"] == {"name": "resid_mid", "layer": 2}
    assert shape_of(body["gradient"]) == (N_TOKENS, D_MODEL)
    assert "direct_effects" not in body or body["direct_effects"] is None
    assert_close(torch.tensor(body["gradient"]), reference_mlp_gradient(checkpoint, 2, 6, 11), "gradient")


def test_gradient_negative_token(llama: TestClient) -> None:
    negative = post_ok(llama, "/gradient", {"token_ids": TOKEN_IDS, "trace_config": {"node": head_node(2, -1, -4, 1)}})
    positive = post_ok(
        llama, "/gradient", {"token_ids": TOKEN_IDS, "trace_config": {"node": head_node(2, N_TOKENS - 1, N_TOKENS - 4, 1)}}
    )

    assert negative == positive


# The traced node mlp_neuron (1, 5, 9) reads resid_mid[1]. Its upstream nodes write at three places
# relative to that: an MLP neuron of layer 0 writes resid_post[0], which comes before it. A head of
# layer 1 writes resid_mid[1], the same tensor. An MLP neuron of layer 1 writes resid_post[1], after it.
TRACED = mlp_node(1, 5, 9)
UPSTREAM_NODES = [mlp_node(0, 2, 4), head_node(1, 5, 2, 3), mlp_node(1, 4, 0)]


def test_direct_effects_per_node(llama: TestClient) -> None:
    body = post_ok(
        llama, "/gradient", {"token_ids": TOKEN_IDS, "trace_config": {"node": TRACED}, "upstream_nodes": UPSTREAM_NODES}
    )
    effects = body["direct_effects"]

    assert len(effects) == len(UPSTREAM_NODES)
    assert isinstance(effects[0], float)
    assert isinstance(effects[1], float)
    assert effects[2] is None


def test_direct_effects_match_jvp(llama: TestClient) -> None:
    """sum(write * gradient) from /gradient equals the traced node's entry of the JVP of the same write."""
    effects = post_ok(
        llama, "/gradient", {"token_ids": TOKEN_IDS, "trace_config": {"node": TRACED}, "upstream_nodes": UPSTREAM_NODES}
    )["direct_effects"]

    for upstream, effect in zip(UPSTREAM_NODES[:2], effects[:2], strict=True):
        body = post_ok(
            llama, "/jvp", {"token_ids": TOKEN_IDS, "write": {"node": upstream}, "downstream": mlp_location(1)}
        )
        expected = body["jvp"][TRACED["token"]][TRACED["neuron"]]
        torch.testing.assert_close(effect, expected, atol=1e-6, rtol=1e-4)


def test_jvp_node_write(llama: TestClient) -> None:
    body = post_ok(
        llama, "/jvp", {"token_ids": TOKEN_IDS, "write": {"node": mlp_node(0, 2, 4)}, "downstream": attention_location(1)}
    )

    assert_echo(body, TOKEN_IDS, model_id_of(llama))
    assert body["upstream"] is True
    assert body["write_location"] == {"name": "resid_post", "layer": 0}
    assert body["residual_location"] == {"name": "resid_pre", "layer": 1}
    assert shape_of(body["jvp"]) == (N_TOKENS, N_TOKENS, N_HEADS)
    assert_null_exactly_at_masked(body["jvp"])


def test_jvp_vector_equals_node_write(served: tuple[TestClient, Checkpoint]) -> None:
    """A node write and the same write sent as a vector, built from transformers' weights, agree."""
    client, checkpoint = served
    layer, token, neuron = 0, 2, 4
    hooked = ref.Hooked(checkpoint.reference, TOKEN_IDS)
    vector = torch.zeros(N_TOKENS, D_MODEL)
    with torch.no_grad():
        vector[token] = hooked.mlp_post[layer][token, neuron] * ref.mlp_output_rows(checkpoint.reference, layer)[neuron]
    downstream = mlp_location(2)

    by_node = post_ok(
        client, "/jvp", {"token_ids": TOKEN_IDS, "write": {"node": mlp_node(layer, token, neuron)}, "downstream": downstream}
    )
    by_vector = post_ok(
        client, "/jvp", {"token_ids": TOKEN_IDS, "write": vector_write(vector.tolist()), "downstream": downstream}
    )

    assert by_vector["upstream"] is True
    assert by_vector["write_location"] == by_node["write_location"]
    assert shape_of(by_vector["jvp"]) == (N_TOKENS, D_MLP[architecture(checkpoint)])
    torch.testing.assert_close(torch.tensor(by_vector["jvp"]), torch.tensor(by_node["jvp"]), atol=1e-4, rtol=1e-4)


def test_jvp_write_after_location(llama: TestClient) -> None:
    # The head writes resid_mid[2], but MLP neurons of layer 1 read resid_mid[1], which comes earlier.
    body = post_ok(
        llama, "/jvp", {"token_ids": TOKEN_IDS, "write": {"node": head_node(2, 3, 1, 0)}, "downstream": mlp_location(1)}
    )

    assert body["upstream"] is False
    assert body["write_location"] == {"name": "resid_mid", "layer": 2}
    assert body["residual_location"] == {"name": "resid_mid", "layer": 1}
    assert shape_of(body["jvp"]) == (N_TOKENS, D_MLP["llama"])
    assert all(value == 0.0 for row in body["jvp"] for value in row)


def test_jvp_vector_after_location(llama: TestClient) -> None:
    write = vector_write([[1.0] * D_MODEL for _ in range(N_TOKENS)], "resid_final", None)
    body = post_ok(llama, "/jvp", {"token_ids": TOKEN_IDS, "write": write, "downstream": mlp_location(2)})

    assert body["upstream"] is False
    assert body["write_location"] == {"name": "resid_final", "layer": None}
    assert all(value == 0.0 for row in body["jvp"] for value in row)


def test_identical_bytes_repeated(llama: TestClient) -> None:
    body = {"token_ids": TOKEN_IDS, "trace_config": {"node": TRACED}, "upstream_nodes": UPSTREAM_NODES}
    first = llama.post("/gradient", json=body)
    second = llama.post("/gradient", json=body)

    assert first.status_code == 200
    assert first.content == second.content


def test_identical_bytes_location(llama: TestClient) -> None:
    body = location_request(attention_location(1, "pre"))
    first = llama.post("/activation", json=body)
    second = llama.post("/activation", json=body)

    assert first.status_code == 200
    assert first.content == second.content


# Loading


def test_loading_returns_503(tiny_llama: Checkpoint) -> None:
    release = threading.Event()

    def load_when_released(settings: Settings) -> ModelRuntime:
        release.wait(STARTUP_TIMEOUT_SECONDS)
        return prepare(settings, tiny_llama.loaded)

    app = create_app(service_settings(), load=load_when_released)
    with TestClient(app, raise_server_exceptions=False) as client:
        try:
            responses = {
                "health": client.get("/health"),
                "model": client.get("/model"),
                "tokenize": client.post("/tokenize", json={"prompt": PROMPT}),
                "activation": client.post("/activation", json=activation_of(mlp_node(0, 0, 0))),
                "gradient": client.post("/gradient", json=activation_of(mlp_node(0, 0, 0))),
                "jvp": client.post(
                    "/jvp", json={"token_ids": TOKEN_IDS, "write": {"node": mlp_node(0, 0, 0)}, "downstream": mlp_location(1)}
                ),
            }
            for route, response in responses.items():
                assert response.status_code == 503, f"{route}: {response.status_code} {response.text}"
                assert int(response.headers["retry-after"]) > 0, route
                assert isinstance(response.json()["detail"], str), route
        finally:
            release.set()

        wait_until_healthy(client)
        assert client.get("/model").status_code == 200


# Bad input


def head_trace(**options: Any) -> dict[str, Any]:
    return activation_of(head_node(1, 4, 2, 0), **options)


def jvp_with(write: dict[str, Any], downstream: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"token_ids": TOKEN_IDS, "write": write, "downstream": downstream or mlp_location(2)}


def vector_with_row(position: int, row: list[float]) -> list[list[float]]:
    vector = zero_vector()
    vector[position] = row
    return vector


# (route, JSON body, status, fragments the detail must contain). Each fragment names the field,
# the bad value or the valid range.
BAD_REQUESTS: list[Any] = [
    pytest.param(
        "/activation", activation_of(mlp_node(3, 0, 0)), 422, ["trace_config.node.layer", "layer 3", "0-2"], id="layer"
    ),
    pytest.param(
        "/activation",
        location_request(mlp_location(7)),
        422,
        ["location.layer", "layer 7", "0-2"],
        id="location-layer",
    ),
    pytest.param(
        "/activation", activation_of(mlp_node(0, 8, 0)), 422, ["trace_config.node.token", "token 8", "-8 to 7"], id="token"
    ),
    pytest.param(
        "/activation", activation_of(mlp_node(0, -9, 0)), 422, ["trace_config.node.token", "token -9", "-8 to 7"], id="token-negative"
    ),
    pytest.param(
        "/activation",
        location_request(mlp_location(0), token=8),
        422,
        ["token", "token 8", "-8 to 7"],
        id="location-token",
    ),
    pytest.param(
        "/activation",
        activation_of(head_node(0, 2, 5, 0)),
        422,
        ["trace_config.node.attended_token", "attended_token 5", "token 2"],
        id="attended-after",
    ),
    pytest.param(
        "/activation", activation_of(mlp_node(0, 0, 48)), 422, ["trace_config.node.neuron", "neuron 48", "0-47"], id="neuron"
    ),
    pytest.param(
        "/activation", activation_of(head_node(0, 3, 1, 4)), 422, ["trace_config.node.head", "head 4", "0-3"], id="head"
    ),
    pytest.param(
        "/activation",
        activation_of(logit_node(0, TINY_VOCAB_SIZE)),
        422,
        ["trace_config.node.token_id", f"token_id {TINY_VOCAB_SIZE}", f"0-{TINY_VOCAB_SIZE - 1}"],
        id="token-id",
    ),
    pytest.param(
        "/activation",
        activation_of({"type": "logit_diff", "token": 0, "target_token_id": 400, "distractor_token_id": 1}),
        422,
        ["trace_config.node.target_token_id", "target_token_id 400", f"0-{TINY_VOCAB_SIZE - 1}"],
        id="target-token-id",
    ),
    pytest.param(
        "/activation",
        activation_of({"type": "autoencoder_latent", "autoencoder": "no-such-sae", "layer": 0, "token": 0, "latent": 0}),
        422,
        ["trace_config.node.autoencoder", "'no-such-sae'"],
        id="autoencoder",
    ),
    pytest.param(
        "/activation",
        location_request({"type": "autoencoder_latent", "layer": 0, "autoencoder": "no-such-sae"}),
        422,
        ["location.autoencoder", "'no-such-sae'"],
        id="location-autoencoder",
    ),
    pytest.param(
        "/activation",
        activation_of(mlp_node(0, 0, 0), attention_trace_type="q"),
        422,
        ["trace_config", "attention_trace_type", "mlp_neuron"],
        id="trace-type-on-mlp",
    ),
    pytest.param(
        "/activation",
        location_request({**mlp_location(0), "attention_trace_type": "k"}),
        422,
        ["location", "attention_trace_type", "mlp_neuron"],
        id="location-trace-type-on-mlp",
    ),
    pytest.param(
        "/activation",
        head_trace(attention_trace_type="q", downstream_trace_config={"node": mlp_node(2, 4, 0)}),
        422,
        ["trace_config", "downstream_trace_config", "'v'"],
        id="downstream-without-v",
    ),
    pytest.param(
        "/activation",
        head_trace(attention_trace_type="v"),
        422,
        ["trace_config", "attention_trace_type 'v'", "downstream_trace_config"],
        id="v-without-downstream",
    ),
    pytest.param(
        "/activation",
        activation_of(logit_node(0, 1), pre_or_post_act="pre"),
        422,
        ["trace_config.pre_or_post_act", "'pre'", "logit"],
        id="pre-on-logit",
    ),
    pytest.param(
        "/activation",
        {"prompt": PROMPT, "token_ids": TOKEN_IDS, "trace_config": {"node": mlp_node(0, 0, 0)}},
        422,
        ["prompt", "token_ids"],
        id="prompt-and-ids",
    ),
    pytest.param(
        "/activation",
        {"trace_config": {"node": mlp_node(0, 0, 0)}},
        422,
        ["prompt", "token_ids"],
        id="no-prompt",
    ),
    pytest.param(
        "/activation",
        {"token_ids": [5, TINY_VOCAB_SIZE, 7], "trace_config": {"node": mlp_node(0, 0, 0)}},
        422,
        ["token_ids.1", f"token_id {TINY_VOCAB_SIZE}", f"0-{TINY_VOCAB_SIZE - 1}"],
        id="ids-outside-vocab",
    ),
    pytest.param(
        "/activation",
        {"prompt": "", "trace_config": {"node": mlp_node(0, 0, 0)}},
        422,
        ["prompt", "no tokens"],
        id="empty-prompt",
    ),
    pytest.param(
        "/activation",
        {"token_ids": [], "trace_config": {"node": mlp_node(0, 0, 0)}},
        422,
        ["token_ids", "no tokens"],
        id="empty-ids",
    ),
    pytest.param(
        "/jvp",
        jvp_with(vector_write(zero_vector()[:3])),
        422,
        ["write.vector", "3 rows", str(N_TOKENS)],
        id="vector-rows",
    ),
    pytest.param(
        "/jvp",
        jvp_with(vector_write(vector_with_row(2, [0.0] * (D_MODEL - 1)))),
        422,
        ["write.vector.2", str(D_MODEL - 1), str(D_MODEL)],
        id="vector-row-length",
    ),
    pytest.param(
        "/jvp",
        jvp_with(vector_write(zero_vector(), "resid_mid", 5)),
        422,
        ["write.location.layer", "layer 5", "0-2"],
        id="vector-location-layer",
    ),
    pytest.param(
        "/jvp",
        jvp_with({"node": mlp_node(0, 0, 0)}, mlp_location(9)),
        422,
        ["downstream.layer", "layer 9", "0-2"],
        id="downstream-layer",
    ),
    pytest.param(
        "/jvp",
        jvp_with({"node": logit_node(0, 1)}),
        422,
        ["write.node", "logit"],
        id="logit-write",
    ),
    pytest.param(
        "/gradient",
        {"token_ids": TOKEN_IDS, "trace_config": {"node": TRACED}, "upstream_nodes": [logit_node(0, 1)]},
        422,
        ["upstream_nodes.0", "logit"],
        id="logit-upstream",
    ),
    pytest.param(
        "/gradient",
        {"token_ids": TOKEN_IDS, "trace_config": {"node": TRACED}, "upstream_nodes": [mlp_node(0, 0, 99)]},
        422,
        ["upstream_nodes.0.neuron", "neuron 99", "0-47"],
        id="upstream-neuron",
    ),
    pytest.param(
        "/activation",
        location_request(mlp_location(0), top_k=MAX_TOP_K + 1),
        422,
        ["top_k", str(MAX_TOP_K + 1), str(MAX_TOP_K)],
        id="top-k-limit",
    ),
    pytest.param(
        "/gradient",
        {
            "token_ids": TOKEN_IDS,
            "trace_config": {"node": TRACED},
            "upstream_nodes": [mlp_node(0, 0, neuron) for neuron in range(MAX_UPSTREAM_NODES + 1)],
        },
        422,
        ["upstream_nodes", str(MAX_UPSTREAM_NODES + 1), str(MAX_UPSTREAM_NODES)],
        id="upstream-limit",
    ),
    pytest.param(
        "/activation",
        activation_of({"type": "neuron", "layer": 0, "token": 0, "neuron": 0}),
        422,
        ["trace_config.node", "'neuron'", "mlp_neuron"],
        id="node-type",
    ),
    pytest.param(
        "/activation",
        {**activation_of(mlp_node(0, 0, 0)), "colour": "red"},
        422,
        ["colour"],
        id="extra-field",
    ),
    pytest.param(
        "/activation",
        activation_of({**mlp_node(0, 0, 0), "colour": "red"}),
        422,
        ["trace_config.node", "colour"],
        id="extra-node-field",
    ),
    pytest.param(
        "/activation",
        {"token_ids": list(range(MAX_TOKENS + 1)), "trace_config": {"node": mlp_node(0, 0, 0)}},
        413,
        ["token_ids", f"{MAX_TOKENS + 1} tokens", str(MAX_TOKENS)],
        id="ids-over-max-tokens",
    ),
    pytest.param(
        "/activation",
        {"prompt": "Paris " * MAX_TOKENS, "trace_config": {"node": mlp_node(0, 0, 0)}},
        413,
        ["prompt", str(MAX_TOKENS)],
        id="prompt-over-max-tokens",
    ),
    # Pydantic rejects these before the service's own range checks, and its messages give the bound
    # but not the value sent.
    pytest.param(
        "/activation",
        activation_of(mlp_node(-1, 0, 0)),
        422,
        ["trace_config.node.layer", "-1", "0"],
        id="layer-negative",
    ),
    pytest.param(
        "/activation",
        {"token_ids": [5, -2], "trace_config": {"node": mlp_node(0, 0, 0)}},
        422,
        ["token_ids.1", "-2", "0"],
        id="ids-negative",
    ),
    pytest.param(
        "/activation",
        location_request(mlp_location(0), top_k=0),
        422,
        ["top_k", "0", "1"],
        id="top-k-zero",
    ),
]


def assert_error_body(response: Any, status: int, fragments: list[str]) -> None:
    assert response.status_code == status, f"{response.status_code}: {response.text}"
    body = response.json()
    assert isinstance(body["detail"], str)
    assert isinstance(body["errors"], list)
    for item in body["errors"]:
        assert set(item) == {"loc", "msg", "type"}, item
    for fragment in fragments:
        assert fragment in body["detail"], f"{fragment!r} is missing from detail {body['detail']!r}"


@pytest.mark.parametrize(("route", "body", "status", "fragments"), BAD_REQUESTS)
def test_bad_request(llama: TestClient, route: str, body: dict[str, Any], status: int, fragments: list[str]) -> None:
    assert_error_body(llama.post(route, json=body), status, fragments)


def raw_vector_request(number: str) -> bytes:
    """Return a /jvp body whose write vector contains the bare JSON literal `number` (NaN, Infinity)."""
    text = orjson.dumps(jvp_with(vector_write(zero_vector()))).decode()
    return text.replace("0.0", number, 1).encode()


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_vector_non_finite(llama: TestClient, literal: str) -> None:
    content = raw_vector_request(literal)
    assert literal.encode() in content
    response = llama.post("/jvp", content=content, headers={"content-type": "application/json"})

    assert_error_body(response, 422, ["write.vector", "NaN or infinite"])


MALFORMED_JSON = b'{"token_ids": [1, 2'


def test_malformed_json(llama: TestClient) -> None:
    response = llama.post("/activation", content=MALFORMED_JSON, headers={"content-type": "application/json"})

    assert_error_body(response, 422, ["JSON"])



def test_malformed_json_reason(llama: TestClient) -> None:
    with pytest.raises(json.JSONDecodeError) as parse_error:
        json.loads(MALFORMED_JSON)
    response = llama.post("/activation", content=MALFORMED_JSON, headers={"content-type": "application/json"})

    assert_error_body(response, 422, [parse_error.value.msg])



def test_node_error_loc_without_tag(llama: TestClient) -> None:
    response = llama.post("/activation", json=activation_of({**mlp_node(0, 0, 0), "colour": "red"}))

    assert_error_body(response, 422, ["trace_config.node.colour"])
    assert response.json()["errors"][0]["loc"] == ["body", "trace_config", "node", "colour"]



def test_write_error_one_variant(llama: TestClient) -> None:
    response = llama.post("/jvp", json=jvp_with({"node": mlp_node(0, 0, -1)}))
    body = response.json()

    assert response.status_code == 422
    assert "VectorWrite" not in body["detail"]
    assert len(body["errors"]) == 1


def test_body_over_limit(llama: TestClient) -> None:
    content = b" " * (MAX_BODY_BYTES + 1)
    response = llama.post("/activation", content=content, headers={"content-type": "application/json"})

    assert response.request.headers["content-length"] == str(MAX_BODY_BYTES + 1)
    assert_error_body(response, 413, [str(MAX_BODY_BYTES + 1), str(MAX_BODY_BYTES)])
    assert response.headers["x-request-id"]


def test_body_over_limit_chunked(llama: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(4):
            yield b" " * (MAX_BODY_BYTES // 2)

    response = llama.post("/activation", content=chunks(), headers={"content-type": "application/json"})

    assert "content-length" not in response.request.headers
    assert_error_body(response, 413, [str(MAX_BODY_BYTES)])


def test_healthy_after_bad_requests(llama: TestClient) -> None:
    for param in BAD_REQUESTS:
        route, body, status, _ = param.values
        assert llama.post(route, json=body).status_code == status
    json_headers = {"content-type": "application/json"}
    assert llama.post("/jvp", content=raw_vector_request("NaN"), headers=json_headers).status_code == 422
    assert llama.post("/activation", content=MALFORMED_JSON, headers=json_headers).status_code == 422
    assert llama.post("/activation", content=b" " * (MAX_BODY_BYTES + 1), headers=json_headers).status_code == 413

    assert llama.get("/health").status_code == 200
    post_ok(llama, "/gradient", {"token_ids": TOKEN_IDS, "trace_config": {"node": TRACED}})


# Headers


def test_request_id_echoed(llama: TestClient) -> None:
    response = llama.get("/health", headers={"X-Request-ID": "trace-42.a"})

    assert response.headers["x-request-id"] == "trace-42.a"


def test_request_id_generated(llama: TestClient) -> None:
    first = llama.get("/health").headers.get("x-request-id")
    second = llama.get("/health").headers.get("x-request-id")

    assert first
    assert second
    assert first != second


def test_request_id_on_error(llama: TestClient) -> None:
    response = llama.post("/activation", json=activation_of(mlp_node(3, 0, 0)), headers={"X-Request-ID": "bad-layer-1"})

    assert response.status_code == 422
    assert response.headers["x-request-id"] == "bad-layer-1"


def test_cors_localhost_allowed(llama: TestClient) -> None:
    response = llama.get("/health", headers={"Origin": "http://localhost:5173"})

    assert response.headers.get("access-control-allow-origin") == "http://localhost:5173"


def test_cors_localhost_preflight(llama: TestClient) -> None:
    headers = {
        "Origin": "http://127.0.0.1:8080",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    response = llama.options("/activation", headers=headers)

    assert response.status_code == 200
    assert response.headers.get("access-control-allow-origin") == "http://127.0.0.1:8080"


@pytest.mark.parametrize("origin", ["http://evil.example", "http://localhost.evil.example"], ids=["other", "prefix"])
def test_cors_other_origin_denied(llama: TestClient, origin: str) -> None:
    response = llama.get("/health", headers={"Origin": origin})

    assert "access-control-allow-origin" not in response.headers


def test_cors_other_preflight_denied(llama: TestClient) -> None:
    headers = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
    response = llama.options("/activation", headers=headers)

    assert "access-control-allow-origin" not in response.headers



# Server errors


@pytest.fixture(scope="module")
def broken_tokenizer(tiny_llama: Checkpoint) -> Iterator[TestClient]:
    """A service whose tokenizer raises, so that /tokenize fails with an unexpected error."""

    def load_with_broken_tokenizer(settings: Settings) -> ModelRuntime:
        runtime = prepare(settings, tiny_llama.loaded)

        def encode(text: str) -> list[int]:
            raise RuntimeError("tokenizer failure injected by the test")

        runtime.encode = encode  # type: ignore[method-assign]
        return runtime

    app = create_app(service_settings(), load=load_with_broken_tokenizer)
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_until_healthy(client)
        yield client


def test_server_error_body(broken_tokenizer: TestClient) -> None:
    response = broken_tokenizer.post("/tokenize", json={"prompt": PROMPT}, headers={"X-Request-ID": "fails-1"})

    assert response.status_code == 500
    assert "fails-1" in response.json()["detail"]
    assert "Traceback" not in response.text
    assert "injected" not in response.text



def test_server_error_request_id(broken_tokenizer: TestClient) -> None:
    response = broken_tokenizer.post("/tokenize", json={"prompt": PROMPT}, headers={"X-Request-ID": "fails-2"})

    assert response.status_code == 500
    assert response.headers.get("x-request-id") == "fails-2"



def test_server_error_cors(broken_tokenizer: TestClient) -> None:
    response = broken_tokenizer.post("/tokenize", json={"prompt": PROMPT}, headers={"Origin": "http://localhost:5173"})

    assert response.status_code == 500
    assert response.headers.get("access-control-allow-origin") == "http://localhost:5173"
