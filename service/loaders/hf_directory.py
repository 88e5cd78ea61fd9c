"""Load a model from a Hugging Face-format directory: config.json plus weight files."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from service.loaders.errors import ModelFileError
from service.loaders.state import load_state
from service.model.base import ModelConfig, Transformer
from service.model.gpt2 import GPT2Model
from service.model.llama import LlamaModel

logger = logging.getLogger(__name__)

LLAMA_MODEL_TYPES = ("llama", "qwen2", "mistral")
GPT2_MODEL_TYPES = ("gpt2",)


def read_json(path: Path) -> dict[str, Any]:
    try:
        with path.open(encoding="utf-8") as file:
            data = json.load(file)
    except FileNotFoundError as error:
        raise ModelFileError(path, "file not found") from error
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelFileError(path, f"not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ModelFileError(path, "expected a JSON object")
    return data


def _require(config: dict[str, Any], key: str, path: Path) -> Any:
    if key not in config or config[key] is None:
        raise ModelFileError(path, f"missing key {key!r}")
    return config[key]


def llama_config(config: dict[str, Any], path: Path) -> ModelConfig:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ModelFileError(path, f"rope type {rope_type!r} is not supported; only 'default' is")
    rope_theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))
    if config.get("hidden_act", "silu") != "silu":
        raise ModelFileError(path, f"hidden_act {config['hidden_act']!r} is not supported; only 'silu' is")
    d_model = int(_require(config, "hidden_size", path))
    n_heads = int(_require(config, "num_attention_heads", path))
    return ModelConfig(
        architecture="llama",
        n_layers=int(_require(config, "num_hidden_layers", path)),
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
        d_head=int(config.get("head_dim") or d_model // n_heads),
        d_mlp=int(_require(config, "intermediate_size", path)),
        vocab_size=int(_require(config, "vocab_size", path)),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        max_positions=int(config.get("max_position_embeddings", 2048)),
        rope_theta=float(rope_theta),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
    )


def gpt2_config(config: dict[str, Any], path: Path) -> ModelConfig:
    activation = config.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ModelFileError(path, f"activation_function {activation!r} is not supported; only 'gelu_new' is")
    for flag, supported in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
        if bool(config.get(flag, supported)) != supported:
            raise ModelFileError(path, f"{flag}={config[flag]!r} is not supported")
    d_model = int(_require(config, "n_embd", path))
    n_heads = int(_require(config, "n_head", path))
    return ModelConfig(
        architecture="gpt2",
        n_layers=int(_require(config, "n_layer", path)),
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=n_heads,
        d_head=d_model // n_heads,
        d_mlp=int(config.get("n_inner") or 4 * d_model),
        vocab_size=int(_require(config, "vocab_size", path)),
        norm_eps=float(config.get("layer_norm_epsilon", 1e-5)),
        max_positions=int(config.get("n_positions", 1024)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
    )


def read_weights(directory: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """Read every tensor of the checkpoint; return them with the file (or index) they came from."""
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    pickled = directory / "pytorch_model.bin"
    if single.exists():
        return read_safetensors(single), single
    if index.exists():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        if not shards:
            raise ModelFileError(index, "weight_map is empty")
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            shard_path = directory / shard
            if not shard_path.exists():
                raise ModelFileError(shard_path, "shard named in the index not found")
            state.update(read_safetensors(shard_path))
        return state, index
    if pickled.exists():
        try:
            loaded = torch.load(str(pickled), map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:
            raise ModelFileError(pickled, f"weights could not be read: {error}") from error
        if not isinstance(loaded, dict):
            raise ModelFileError(pickled, "expected a state dict")
        return loaded, pickled
    raise ModelFileError(directory, "no model.safetensors, model.safetensors.index.json or pytorch_model.bin found")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(path)))
    except (SafetensorError, OSError) as error:
        raise ModelFileError(path, f"weights could not be read: {error}") from error


def gpt2_state(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename checkpoint keys to `GPT2Model`'s: add the `transformer.` prefix, drop mask buffers."""
    renamed: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        if name != "lm_head.weight" and not name.startswith("transformer."):
            name = f"transformer.{name}"
        renamed[name] = tensor
    if config.tie_word_embeddings and "transformer.wte.weight" in renamed:
        renamed["lm_head.weight"] = renamed["transformer.wte.weight"]
    return renamed


def llama_state(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    renamed = dict(state)
    # Checkpoints may carry rotary tables; the model computes its own.
    for name in [name for name in renamed if name.endswith("rotary_emb.inv_freq")]:
        del renamed[name]
    if config.tie_word_embeddings and "model.embed_tokens.weight" in renamed:
        renamed["lm_head.weight"] = renamed["model.embed_tokens.weight"]
    return renamed


def load_hf_directory(directory: Path) -> Transformer:
    """Build a float32 model on the CPU from `directory`."""
    config_path = directory / "config.json"
    raw = read_json(config_path)
    model_type = raw.get("model_type")
    model: Transformer
    if model_type in LLAMA_MODEL_TYPES:
        config = llama_config(raw, config_path)
        model = LlamaModel(config)
        rename = llama_state
    elif model_type in GPT2_MODEL_TYPES:
        config = gpt2_config(raw, config_path)
        model = GPT2Model(config)
        rename = gpt2_state
    else:
        supported = ", ".join(LLAMA_MODEL_TYPES + GPT2_MODEL_TYPES)
        raise ModelFileError(config_path, f"model_type {model_type!r} is not supported; expected one of {supported}")

    state, weights_path = read_weights(directory)
    state = {name: tensor.float() for name, tensor in rename(state, config).items()}
    load_state(model, state, weights_path)
    return model


def load_hf_tokenizer(directory: Path) -> Tokenizer:
    """Read tokenizer.json, or build a byte-level BPE tokenizer from vocab.json and merges.txt."""
    tokenizer_json = directory / "tokenizer.json"
    vocab, merges = directory / "vocab.json", directory / "merges.txt"
    if tokenizer_json.exists():
        try:
            return Tokenizer.from_file(str(tokenizer_json))
        except Exception as error:  # tokenizers raises a bare Exception for malformed files
            raise ModelFileError(tokenizer_json, f"tokenizer could not be read: {error}") from error
    if vocab.exists() and merges.exists():
        try:
            tokenizer = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
        except Exception as error:  # tokenizers raises a bare Exception for malformed files
            raise ModelFileError(vocab, f"tokenizer could not be read with {merges.name}: {error}") from error
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        return tokenizer
    raise ModelFileError(directory, "no tokenizer.json, or vocab.json and merges.txt, found")
