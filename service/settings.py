"""Service settings from SERVICE_* environment variables and command-line flags."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LOCALHOST_ORIGIN_REGEX = r"https?://(localhost|127\.0\.0\.1|\[::1\])(:[0-9]+)?"


class Settings(BaseSettings):
    """Every setting of the service; the environment variable is SERVICE_ plus the name in capitals."""

    model_config = SettingsConfigDict(env_prefix="SERVICE_", extra="forbid")

    model: str = Field(
        "smollm2",
        description="Model source: 'smollm2' (the embedded SmolLM2-135M-Instruct), a .gguf file, "
        "a Hugging Face-format directory or a Hugging Face Hub model id.",
    )
    device: str = Field("auto", description="Torch device: 'auto' (cuda when available, else cpu), 'cpu' or 'cuda[:N]'.")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Parameter dtype; bfloat16 only on a GPU.")
    max_tokens: int = Field(512, ge=1, le=65536, description="Maximum tokens per request.")
    max_top_k: int = Field(1000, ge=1, description="Maximum top_k of a whole-location /activation request.")
    max_upstream_nodes: int = Field(256, ge=1, description="Maximum upstream_nodes of a /gradient request.")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="Maximum request body size, in bytes.")
    max_response_values: int = Field(
        4_000_000,
        ge=1000,
        description="Maximum numbers in one response tensor; larger whole-location or JVP requests get 413.",
    )
    max_queue: int = Field(
        16, ge=0, description="Maximum requests waiting for the model worker; more get 503 with Retry-After."
    )
    api_key: SecretStr | None = Field(
        None,
        description="If set, every route but /health needs the header 'Authorization: Bearer <key>'.",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Origins allowed by CORS. Empty means localhost origins on any port.",
    )
    autoencoders: list[str] | None = Field(
        None,
        description="Autoencoders to load, each 'ID=PATH[;input=NAME][;layer=N]': PATH is a SAELens "
        "directory or an OpenAI .pt file (which needs input and layer); entries that share an ID form one "
        "autoencoder with one layer each. Unset means the autoencoders shipped for the embedded model, "
        "when it is the model; an empty list loads none.",
    )
    host: str = Field("127.0.0.1", description="Address the HTTP server binds.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port the HTTP server binds.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Logging level.")

    @field_validator("device")
    @classmethod
    def check_device(cls, value: str) -> str:
        if value == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(value)
        except RuntimeError as error:
            raise ValueError(f"device {value!r} is not a torch device: use 'auto', 'cpu' or 'cuda[:N]'") from error
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {value!r} was requested, but torch finds no CUDA device")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device {value!r} is not supported: use 'auto', 'cpu' or 'cuda[:N]'")
        return value

    @field_validator("autoencoders")
    @classmethod
    def check_autoencoders(cls, value: list[str] | None) -> list[str] | None:
        from service.loaders.autoencoders import AutoencoderSource

        for text in value or []:
            AutoencoderSource.parse(text)
        return value

    @model_validator(mode="after")
    def check_dtype_device(self) -> Settings:
        if self.dtype == "bfloat16" and not self.device.startswith("cuda"):
            raise ValueError("dtype 'bfloat16' needs a CUDA device; use float32 on the CPU")
        return self

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.dtype == "bfloat16" else torch.float32
