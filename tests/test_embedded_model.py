"""End-to-end checks on the embedded SmolLM2-135M-Instruct model, through the HTTP app.

The references run `transformers`' LlamaForCausalLM, read from the same GGUF file, with
its own submodules (tests/reference.py); they share no code with the service's model.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.runtime import prepare
from service.settings import Settings
from tests import reference as ref
from tests.conftest import Checkpoint, relative_error

pytestmark = pytest.mark.real_model

PROMPT = "The capital of France is"
PARIS, LONDON = " Paris", " London"


@pytest.fixture(scope="module")
def client(embedded: Checkpoint) -> Iterator[TestClient]:
    settings = Settings(device="cpu")
    app = create_app(settings, load=lambda settings: prepare(settings, embedded.loaded))
    with TestClient(app) as test_client:
        deadline = time.monotonic() + 60
        while test_client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "the app did not become ready"
            time.sleep(0.05)
        yield test_client


@pytest.fixture(scope="module")
def hooked(embedded: Checkpoint, client: TestClient) -> ref.Hooked:
    token_ids = client.post("/tokenize", json={"prompt": PROMPT}).json()["token_ids"]
    return ref.Hooked(embedded.reference, token_ids)


def single_token_id(client: TestClient, text: str) -> int:
    token_ids: list[int] = client.post("/tokenize", json={"prompt": text}).json()["token_ids"]
    assert len(token_ids) == 1, f"{text!r} is not a single token"
    return token_ids[0]


def post(client: TestClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post(path, json={"prompt": PROMPT, **body})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def test_paris_beats_london(client: TestClient, hooked: ref.Hooked) -> None:
    paris, london = single_token_id(client, PARIS), single_token_id(client, LONDON)
    node = {"type": "logit_diff", "token": -1, "target_token_id": paris, "distractor_token_id": london}
    result = post(client, "/activation", {"trace_config": {"node": node}})
    expected = float(hooked.logits[-1, paris] - hooked.logits[-1, london])
    assert result["activation"] > 0
    assert result["activation"] == pytest.approx(expected, abs=1e-4)
    assert result["tokens"][-1] == " is"


def test_logit_diff_gradient_matches_reference(client: TestClient, embedded: Checkpoint, hooked: ref.Hooked) -> None:
    paris, london = single_token_id(client, PARIS), single_token_id(client, LONDON)
    node = {"type": "logit_diff", "token": -1, "target_token_id": paris, "distractor_token_id": london}
    result = post(client, "/gradient", {"trace_config": {"node": node, "detach_layer_norm_scale": False}})

    leaf = hooked.resid_final.clone().requires_grad_(True)
    logits = ref.final_logits(embedded.reference, leaf)
    (expected,) = torch.autograd.grad(logits[-1, paris] - logits[-1, london], leaf)
    assert relative_error(torch.tensor(result["gradient"]), expected) < 1e-4


def test_mlp_gradient_matches_reference(client: TestClient, embedded: Checkpoint, hooked: ref.Hooked) -> None:
    layer, token, neuron = 12, 4, 321
    node = {"type": "mlp_neuron", "layer": layer, "token": token, "neuron": neuron}
    result = post(client, "/gradient", {"trace_config": {"node": node, "detach_layer_norm_scale": False}})

    leaf = hooked.resid_mid[layer].clone().requires_grad_(True)
    _, post_activation = ref.mlp_activations(embedded.reference, layer, leaf)
    (expected,) = torch.autograd.grad(post_activation[token, neuron], leaf)
    assert result["activation"] == pytest.approx(float(hooked.mlp_post[layer][token, neuron]), abs=1e-5)
    assert relative_error(torch.tensor(result["gradient"]), expected) < 1e-4


def test_attention_gradient_matches_reference(client: TestClient, embedded: Checkpoint, hooked: ref.Hooked) -> None:
    layer, token, attended, head = 9, 4, 1, 5
    node = {"type": "attention_head", "layer": layer, "token": token, "attended_token": attended, "head": head}
    body = {"trace_config": {"node": node, "detach_layer_norm_scale": False, "attention_trace_type": "qk"}}
    result = post(client, "/gradient", body)

    leaf = hooked.resid_pre[layer].clone().requires_grad_(True)
    _, probs = ref.attention_activations(embedded.reference, layer, leaf)
    (expected,) = torch.autograd.grad(probs[token, attended, head], leaf)
    assert result["activation"] == pytest.approx(float(hooked.attention_probs[layer][token, attended, head]), abs=1e-5)
    assert relative_error(torch.tensor(result["gradient"]), expected) < 1e-4


def test_head_write_jvp_matches_reference(client: TestClient, embedded: Checkpoint, hooked: ref.Hooked) -> None:
    write_layer, token, attended, head = 3, 4, 2, 1
    downstream_layer = 10
    writer = {"type": "attention_head", "layer": write_layer, "token": token, "attended_token": attended, "head": head}
    downstream = {"type": "mlp_neuron", "layer": downstream_layer, "detach_layer_norm_scale": False}
    result = post(client, "/jvp", {"write": {"node": writer}, "downstream": downstream})

    with torch.no_grad():
        write = ref.head_write(embedded.reference, write_layer, hooked.resid_pre[write_layer], token, attended, head)

    def downstream_post(resid: torch.Tensor) -> torch.Tensor:
        return ref.mlp_activations(embedded.reference, downstream_layer, resid)[1]

    _, expected = torch.func.jvp(downstream_post, (hooked.resid_mid[downstream_layer],), (write,))
    assert result["upstream"] is True
    assert result["write_location"] == {"name": "resid_mid", "layer": write_layer}
    assert result["residual_location"] == {"name": "resid_mid", "layer": downstream_layer}
    assert relative_error(torch.tensor(result["jvp"]), expected) < 1e-4


def test_direct_effects_match_reference(client: TestClient, embedded: Checkpoint, hooked: ref.Hooked) -> None:
    layer, token, neuron = 12, 4, 321
    writer_layer, attended, head = 5, 0, 2
    node = {"type": "mlp_neuron", "layer": layer, "token": token, "neuron": neuron}
    upstream = [
        {"type": "attention_head", "layer": writer_layer, "token": token, "attended_token": attended, "head": head},
        {"type": "mlp_neuron", "layer": layer + 1, "token": token, "neuron": 0},
    ]
    body = {"trace_config": {"node": node, "detach_layer_norm_scale": False}, "upstream_nodes": upstream}
    result = post(client, "/gradient", body)

    leaf = hooked.resid_mid[layer].clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(ref.mlp_activations(embedded.reference, layer, leaf)[1][token, neuron], leaf)
    with torch.no_grad():
        write = ref.head_write(embedded.reference, writer_layer, hooked.resid_pre[writer_layer], token, attended, head)
    expected = float((write * gradient).sum())
    assert result["direct_effects"][0] == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert result["direct_effects"][1] is None


def test_shipped_autoencoders_encode_hooked_activations(embedded: Checkpoint, hooked: ref.Hooked) -> None:
    from service.core.nodes import LocationSpec, PreOrPost
    from service.core.reconstituter import Reconstituter
    from service.loaders import embedded_autoencoder_sources
    from service.loaders.autoencoders import load_autoencoders

    sources = embedded_autoencoder_sources()
    assert sources, "the autoencoders for the embedded model are missing from service/data/autoencoders"
    sets = load_autoencoders(sources, embedded.loaded.model.config)
    (autoencoder_set,) = sets.values()
    token_ids = torch.tensor(embedded.loaded.tokenizer.encode(PROMPT).ids)
    core = Reconstituter(embedded.loaded.model, token_ids, sets)
    for layer in autoencoder_set.layers:
        autoencoder = autoencoder_set.by_layer[layer]
        spec = LocationSpec(
            "autoencoder_latent",
            layer,
            PreOrPost.POST,
            autoencoder=autoencoder_set.id,
            autoencoder_input=autoencoder_set.input,
        )
        with torch.no_grad():
            expected = autoencoder.encode(hooked.mlp_out[layer])
        actual = core.activations(spec)
        assert float((actual - expected).abs().max()) < 1e-4, f"layer {layer}"
        assert int((actual[1:] != 0).sum(dim=-1).max()) <= (autoencoder.k or autoencoder.n_latents)
