"""The loaded model, its tokenizer and autoencoders, on the configured device."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from service.loaders import EMBEDDED_MODEL, LoadedModel, embedded_autoencoder_sources, load_model
from service.loaders.autoencoders import AutoencoderSource, load_autoencoders
from service.model.autoencoder import AutoencoderSet
from service.model.base import ModelConfig, Transformer
from service.settings import Settings

logger = logging.getLogger(__name__)


@dataclass
class ModelRuntime:
    settings: Settings
    loaded: LoadedModel
    autoencoders: dict[str, AutoencoderSet] = field(default_factory=dict)

    @property
    def model(self) -> Transformer:
        return self.loaded.model

    @property
    def config(self) -> ModelConfig:
        return self.loaded.model.config

    @property
    def model_id(self) -> str:
        return self.loaded.model_id

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self.loaded.tokenizer.encode(text).ids
        return ids

    def decode_each(self, token_ids: list[int]) -> list[str]:
        decoded: list[str] = self.loaded.tokenizer.decode_batch([[token_id] for token_id in token_ids], skip_special_tokens=False)
        return decoded

    def info(self) -> dict[str, Any]:
        config = self.config
        return {
            "id": self.model_id,
            "architecture": config.architecture,
            "n_layers": config.n_layers,
            "d_model": config.d_model,
            "n_heads": config.n_heads,
            "n_kv_heads": config.n_kv_heads,
            "d_head": config.d_head,
            "d_mlp": config.d_mlp,
            "vocab_size": config.vocab_size,
            "max_tokens": self.settings.max_tokens,
            "max_top_k": self.settings.max_top_k,
            "max_upstream_nodes": self.settings.max_upstream_nodes,
            "max_body_bytes": self.settings.max_body_bytes,
            "max_response_values": self.settings.max_response_values,
            "max_queue": self.settings.max_queue,
            "dtype": self.settings.dtype,
            "device": str(self.model.device),
            "autoencoders": [autoencoder.info() for autoencoder in self.autoencoders.values()],
        }


def prepare(
    settings: Settings, loaded: LoadedModel, autoencoders: dict[str, AutoencoderSet] | None = None
) -> ModelRuntime:
    """Move a loaded model and its autoencoders to the configured device and dtype, frozen."""
    # NOTE: the tests run on the CPU in float32 only; the CUDA and bfloat16 paths have not
    # been checked against the oracles on a GPU.
    model = loaded.model.to(device=settings.device, dtype=settings.torch_dtype)
    model.eval()
    model.requires_grad_(False)
    loaded.model = model
    moved = {name: item.to(settings.device, settings.torch_dtype) for name, item in (autoencoders or {}).items()}
    return ModelRuntime(settings, loaded, moved)


def autoencoder_sources(settings: Settings) -> list[AutoencoderSource]:
    """Return the configured autoencoders, or the ones shipped for the embedded model."""
    if settings.autoencoders is not None:
        return [AutoencoderSource.parse(text) for text in settings.autoencoders]
    if settings.model != EMBEDDED_MODEL:
        return []
    return embedded_autoencoder_sources()


def load_runtime(settings: Settings) -> ModelRuntime:
    """Load the configured model and log what was loaded and how long it took."""
    started = time.monotonic()
    logger.info("loading model %s onto %s as %s", settings.model, settings.device, settings.dtype)
    loaded = load_model(settings.model)
    autoencoders = load_autoencoders(autoencoder_sources(settings), loaded.model.config)
    runtime = prepare(settings, loaded, autoencoders)
    config = runtime.config
    logger.info(
        "loaded model id=%s family=%s device=%s dtype=%s parameters=%d layers=%d autoencoders=%s load_time=%.1fs",
        runtime.model_id,
        config.architecture,
        runtime.model.device,
        settings.dtype,
        runtime.model.parameter_count(),
        config.n_layers,
        ",".join(runtime.autoencoders) or "none",
        time.monotonic() - started,
    )
    return runtime
