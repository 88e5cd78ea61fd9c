"""The service's model families against `transformers` running the same weights."""

from __future__ import annotations

import pytest
import torch

from service.core.locations import RESID_FINAL, resid_pre
from service.core.residual import ResidualStream
from tests.conftest import Checkpoint, assert_close

PROMPT_IDS = [5, 80, 17, 250, 3, 99, 42, 7]


def compare_with_reference(checkpoint: Checkpoint, token_ids: list[int]) -> None:
    model = checkpoint.loaded.model
    ids = torch.tensor(token_ids)
    with torch.no_grad():
        expected = checkpoint.reference(ids[None], output_hidden_states=True)
        stream = ResidualStream(model, ids)
        logits = model.logits(stream.at(RESID_FINAL))

    assert_close(logits, expected.logits[0], "logits")
    n_layers = model.config.n_layers
    # transformers' last hidden state has the final norm applied, so it is compared through the logits.
    for layer in range(n_layers):
        assert_close(stream.at(resid_pre(layer)), expected.hidden_states[layer][0], "hidden_states")


def test_tiny_checkpoint_matches_transformers(tiny_checkpoint: Checkpoint) -> None:
    compare_with_reference(tiny_checkpoint, PROMPT_IDS)


def test_tiny_checkpoint_config(tiny_checkpoint: Checkpoint) -> None:
    config = tiny_checkpoint.loaded.model.config
    reference = tiny_checkpoint.reference.config
    assert config.n_layers == reference.num_hidden_layers
    assert config.d_model == reference.hidden_size
    assert config.vocab_size == reference.vocab_size


@pytest.mark.real_model
def test_embedded_model_matches_transformers(embedded: Checkpoint) -> None:
    token_ids = embedded.loaded.tokenizer.encode("The capital of France is Paris, and the capital of Italy is").ids
    compare_with_reference(embedded, token_ids)


@pytest.mark.real_model
def test_embedded_model_config(embedded: Checkpoint) -> None:
    config = embedded.loaded.model.config
    assert (config.n_layers, config.d_model, config.n_heads, config.n_kv_heads) == (30, 576, 9, 3)
    assert (config.d_mlp, config.vocab_size) == (1536, 49152)
