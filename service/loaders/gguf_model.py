"""Load a Llama-family model from a GGUF file, dequantizing every tensor to float32.

llama.cpp's converter stores the rows of the Q and K projections permuted so that each
head's rotary pairs are adjacent (its interleaved rotary layout). The loader undoes that
permutation, so the model runs with the Hugging Face layout, where the pairs are the
first and second halves of each head.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.loaders.errors import ModelFileError
from service.loaders.state import load_state
from service.model.base import ModelConfig
from service.model.llama import LlamaModel

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]

_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(.+)")


def field_value(reader: Any, key: str, path: Path) -> Any:
    field = reader.fields.get(key)
    if field is None:
        raise ModelFileError(path, f"GGUF metadata key {key!r} is missing")
    return field.contents()


def config_from_gguf(reader: Any, path: Path) -> ModelConfig:
    architecture = field_value(reader, "general.architecture", path)
    if architecture != "llama":
        raise ModelFileError(path, f"GGUF architecture {architecture!r} is not supported; only 'llama' is")

    def value(name: str) -> Any:
        return field_value(reader, f"llama.{name}", path)

    n_heads = int(value("attention.head_count"))
    d_model = int(value("embedding_length"))
    n_kv_heads = int(value("attention.head_count_kv")) if "llama.attention.head_count_kv" in reader.fields else n_heads
    vocab_size = len(field_value(reader, "tokenizer.ggml.tokens", path))
    if "llama.vocab_size" in reader.fields:
        vocab_size = int(value("vocab_size"))
    has_output = any(tensor.name == "output.weight" for tensor in reader.tensors)
    rope_theta = float(value("rope.freq_base")) if "llama.rope.freq_base" in reader.fields else 10000.0
    return ModelConfig(
        architecture="llama",
        n_layers=int(value("block_count")),
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        d_head=d_model // n_heads,
        d_mlp=int(value("feed_forward_length")),
        vocab_size=vocab_size,
        norm_eps=float(value("attention.layer_norm_rms_epsilon")),
        max_positions=int(value("context_length")),
        rope_theta=rope_theta,
        tie_word_embeddings=not has_output,
        attention_bias=any(tensor.name.endswith("attn_q.bias") for tensor in reader.tensors),
    )


def unpermute_rotary_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: per head, interleaved pairs back to halves.

    weight: [n_heads * d_head, ...]; in the file, row 2i of a head contains what the
    Hugging Face layout keeps at row i, and row 2i + 1 what it keeps at d_head/2 + i.
    """
    rows = weight.shape[0]
    pairs = rows // n_heads // 2
    # [n_heads, pairs, 2, ...] -> [n_heads, 2, pairs, ...]
    return weight.reshape(n_heads, pairs, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _LAYER_NAME.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_TENSORS:
        return f"model.layers.{match.group(1)}.{_LAYER_TENSORS[match.group(2)]}"
    return None


def load_gguf_model(path: Path, reader: Any, progress: ProgressCallback | None = None) -> LlamaModel:
    """Build a float32 `LlamaModel` on the CPU from an open `gguf.GGUFReader`."""
    from gguf import quants

    config = config_from_gguf(reader, path)
    state: dict[str, torch.Tensor] = {}
    total = len(reader.tensors)
    for done, tensor in enumerate(reader.tensors, start=1):
        name = hf_name(tensor.name)
        if name is None:
            logger.warning("skipping unknown GGUF tensor %s in %s", tensor.name, path)
            continue
        try:
            array = np.array(quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        except (ValueError, NotImplementedError) as error:
            raise ModelFileError(path, f"tensor {tensor.name} could not be dequantized: {error}") from error
        # GGUF lists dimensions fastest-first; the dequantized array is [rows, columns] already.
        expected = tuple(int(size) for size in reversed(tensor.shape))
        if array.shape != expected:
            array = array.reshape(expected)
        if tensor.name.endswith("attn_q.weight") or tensor.name.endswith("attn_q.bias"):
            array = unpermute_rotary_rows(array, config.n_heads)
        elif tensor.name.endswith("attn_k.weight") or tensor.name.endswith("attn_k.bias"):
            array = unpermute_rotary_rows(array, config.n_kv_heads)
        state[name] = torch.from_numpy(np.ascontiguousarray(array))
        if progress is not None:
            progress(done, total)

    model = LlamaModel(config)
    if config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    load_state(model, state, path)
    return model
