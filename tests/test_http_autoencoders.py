"""Autoencoder latents and value traces through the HTTP app, on the tiny checkpoints."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.loaders.autoencoders import AutoencoderSource, load_autoencoders
from service.runtime import prepare
from service.settings import Settings
from tests import reference as ref
from tests.conftest import Checkpoint
from tests.test_autoencoders import ARCHITECTURES, encode_by_hand, write_saelens

TOKEN_IDS = [5, 80, 17, 250, 3, 99, 42]
LAYER = 1
AUTOENCODER = "mlp-out"


@pytest.fixture(scope="module")
def served(
    tiny_checkpoint: Checkpoint, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TestClient, dict[str, torch.Tensor]]]:
    directory = tmp_path_factory.mktemp("autoencoder") / "layer1"
    config = ARCHITECTURES["topk"]
    tensors = write_saelens(directory, tiny_checkpoint.loaded.model.config.d_model, **config)
    sets = load_autoencoders([AutoencoderSource(AUTOENCODER, Path(directory))], tiny_checkpoint.loaded.model.config)
    settings = Settings(device="cpu", autoencoders=[])
    app = create_app(settings, load=lambda settings: prepare(settings, tiny_checkpoint.loaded, sets))
    with TestClient(app) as client:
        deadline = time.monotonic() + 30
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "the app did not become ready"
            time.sleep(0.02)
        yield client, tensors


def post(client: TestClient, path: str, body: dict[str, Any], status: int = 200) -> dict[str, Any]:
    response = client.post(path, json={"token_ids": TOKEN_IDS, **body})
    assert response.status_code == status, response.text
    result: dict[str, Any] = response.json()
    return result


def latent(token: int, index: int, layer: int = LAYER, autoencoder: str = AUTOENCODER) -> dict[str, Any]:
    return {"type": "autoencoder_latent", "autoencoder": autoencoder, "layer": layer, "token": token, "latent": index}


def latent_location(**options: Any) -> dict[str, Any]:
    return {"type": "autoencoder_latent", "autoencoder": AUTOENCODER, "layer": LAYER, **options}


def test_model_lists_autoencoder(served: tuple[TestClient, Any]) -> None:
    client, _ = served
    autoencoders = client.get("/model").json()["autoencoders"]
    assert autoencoders == [
        {"id": AUTOENCODER, "input": "resid_delta_mlp", "layers": [LAYER], "n_latents": 64, "activation": "topk(k=5)"}
    ]


def test_top_latents_match_hooked_encoding(served: tuple[TestClient, Any], tiny_checkpoint: Checkpoint) -> None:
    client, tensors = served
    result = post(client, "/activation", {"location": latent_location(), "token": -1, "top_k": 3})
    hooked = ref.Hooked(tiny_checkpoint.reference, TOKEN_IDS)
    expected = encode_by_hand(tensors, hooked.mlp_out[LAYER], ARCHITECTURES["topk"])[-1]
    values, indices = expected.topk(3)
    assert [entry["node"]["latent"] for entry in result["top"]] == indices.tolist()
    for entry, value in zip(result["top"], values.tolist()):
        assert entry["activation"] == pytest.approx(value, abs=1e-5)
        assert entry["node"]["autoencoder"] == AUTOENCODER
        assert entry["node"]["token"] == len(TOKEN_IDS) - 1


def test_latent_gradient_and_direct_effects(served: tuple[TestClient, Any]) -> None:
    client, _ = served
    top = post(client, "/activation", {"location": latent_location(), "token": 5, "top_k": 1})["top"][0]["node"]
    target = {"type": "mlp_neuron", "layer": 2, "token": 5, "neuron": 4}
    upstream = [top, latent(6, top["latent"])]
    result = post(client, "/gradient", {"trace_config": {"node": target}, "upstream_nodes": upstream})
    jvp = post(client, "/jvp", {"write": {"node": top}, "downstream": {"type": "mlp_neuron", "layer": 2}})
    assert result["direct_effects"][0] == pytest.approx(jvp["jvp"][5][4], rel=1e-4, abs=1e-7)
    assert jvp["write_location"] == {"name": "resid_post", "layer": LAYER}
    assert result["direct_effects"][1] == pytest.approx(0.0, abs=1e-7), "token 6 writes after token 5 reads"


def test_latent_as_gradient_target(served: tuple[TestClient, Any]) -> None:
    client, _ = served
    result = post(client, "/gradient", {"trace_config": {"node": latent(4, 9), "pre_or_post_act": "pre"}})
    assert result["residual_location"] == {"name": "resid_mid", "layer": LAYER}
    assert len(result["gradient"]) == len(TOKEN_IDS)


def test_latent_jvp_downstream_shape(served: tuple[TestClient, Any]) -> None:
    client, _ = served
    writer = {"type": "attention_head", "layer": 0, "token": 4, "attended_token": 1, "head": 2}
    result = post(client, "/jvp", {"write": {"node": writer}, "downstream": latent_location()})
    assert result["upstream"] is True
    assert (len(result["jvp"]), len(result["jvp"][0])) == (len(TOKEN_IDS), 64)


def test_value_trace_sums_to_direct_effects(served: tuple[TestClient, Any]) -> None:
    client, _ = served
    downstream = {"node": {"type": "mlp_neuron", "layer": 2, "token": 6, "neuron": 1}}
    location = {"type": "attention_head", "layer": 1, "attention_trace_type": "v", "downstream_trace_config": downstream}
    traced = post(client, "/activation", {"location": location})["activations"]
    writers = [{"type": "attention_head", "layer": 1, "token": 6, "attended_token": s, "head": 0} for s in range(7)]
    effects = post(client, "/gradient", {"trace_config": downstream, "upstream_nodes": writers})["direct_effects"]
    for attended in range(7):
        assert traced[6][attended][0] == pytest.approx(effects[attended], rel=1e-4, abs=1e-7)


def test_value_trace_rejects_earlier_downstream(served: tuple[TestClient, Any]) -> None:
    client, _ = served
    downstream = {"node": {"type": "attention_head", "layer": 1, "token": 6, "attended_token": 0, "head": 0}}
    node = {"type": "attention_head", "layer": 1, "token": 6, "attended_token": 2, "head": 1}
    body = {"trace_config": {"node": node, "attention_trace_type": "v", "downstream_trace_config": downstream}}
    result = post(client, "/gradient", body, status=422)
    assert "before the traced head's write lands in resid_mid[1]" in result["detail"]


@pytest.mark.parametrize(
    ("node", "fragment"),
    [
        (latent(2, 64), "latent 64 is out of range: autoencoder 'mlp-out' has 64 latents (0-63)"),
        (latent(2, 1, autoencoder="attn-out"), "autoencoder 'attn-out' is not loaded; loaded autoencoders: mlp-out"),
        (latent(2, 1, layer=0), "layer 0 has no autoencoder 'mlp-out'; it covers layers 1"),
    ],
    ids=["latent_range", "unknown_id", "uncovered_layer"],
)
def test_bad_latent_requests(served: tuple[TestClient, Any], node: dict[str, Any], fragment: str) -> None:
    client, _ = served
    result = post(client, "/activation", {"trace_config": {"node": node}}, status=422)
    assert fragment in result["detail"]


def test_large_location_needs_token_or_top_k(tiny_llama: Checkpoint) -> None:
    settings = Settings(device="cpu", autoencoders=[], max_response_values=1000)
    app = create_app(settings, load=lambda settings: prepare(settings, tiny_llama.loaded))
    with TestClient(app) as client:
        while client.get("/health").status_code != 200:
            time.sleep(0.02)
        logits = {"type": "logit"}
        whole = client.post("/activation", json={"token_ids": TOKEN_IDS, "location": logits})
        one_token = client.post("/activation", json={"token_ids": TOKEN_IDS, "location": logits, "token": -1})
        top = client.post("/activation", json={"token_ids": TOKEN_IDS, "location": logits, "top_k": 5})
        jvp = client.post(
            "/jvp",
            json={
                "token_ids": TOKEN_IDS,
                "write": {"node": {"type": "mlp_neuron", "layer": 0, "token": 1, "neuron": 2}},
                "downstream": logits,
            },
        )
    assert whole.status_code == 413
    assert "the response would hold 2240 numbers, over the limit of 1000" in whole.json()["detail"]
    assert one_token.status_code == 200
    assert top.status_code == 200
    assert jvp.status_code == 413
