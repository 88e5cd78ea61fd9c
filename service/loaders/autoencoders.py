"""Load sparse autoencoders: SAELens directories and OpenAI `sparse_autoencoder` state dicts.

Every problem with a file raises `ModelFileError` naming the file: a missing tensor or
key, a shape that does not fit the model, an unknown architecture.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from service.loaders.errors import ModelFileError
from service.loaders.hf_directory import read_json
from service.model.autoencoder import ActivationFunction, AutoencoderInput, AutoencoderSet, SparseAutoencoder
from service.model.base import ModelConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AutoencoderSource:
    """One autoencoder file or directory to load, for one layer of one autoencoder set."""

    id: str
    path: Path
    input: AutoencoderInput | None = None
    layer: int | None = None

    @classmethod
    def parse(cls, text: str) -> AutoencoderSource:
        """Parse `ID=PATH[;input=NAME][;layer=N]`."""
        head, *options = text.split(";")
        if "=" not in head:
            raise ValueError(f"autoencoder {text!r} is not ID=PATH[;input=NAME][;layer=N]")
        identifier, path = (part.strip() for part in head.split("=", 1))
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,100}", identifier):
            raise ValueError(f"autoencoder id {identifier!r} must be 1-100 letters, digits, '.', '_' or '-'")
        values: dict[str, str] = {}
        for option in options:
            key, _, value = option.partition("=")
            if key.strip() not in ("input", "layer") or not value:
                raise ValueError(f"autoencoder option {option!r} is not input=NAME or layer=N")
            values[key.strip()] = value.strip()
        try:
            source_input = AutoencoderInput(values["input"]) if "input" in values else None
        except ValueError as error:
            names = ", ".join(item.value for item in AutoencoderInput)
            raise ValueError(f"autoencoder input {values['input']!r} is not one of {names}") from error
        layer = int(values["layer"]) if "layer" in values else None
        return cls(identifier, Path(path).expanduser(), source_input, layer)


# SAELens hook names, by the TransformerLens hook point they name.
_HOOK_INPUTS = {
    "hook_mlp_out": AutoencoderInput.RESID_DELTA_MLP,
    "hook_attn_out": AutoencoderInput.RESID_DELTA_ATTN,
    "hook_resid_pre": AutoencoderInput.RESID_PRE,
    "mlp.hook_post": AutoencoderInput.MLP_POST_ACT,
}
_HOOK_NAME = re.compile(r"blocks\.(\d+)\.(.+)")


def input_from_hook(hook_name: str, path: Path) -> tuple[AutoencoderInput, int]:
    match = _HOOK_NAME.fullmatch(hook_name)
    if not match or match.group(2) not in _HOOK_INPUTS:
        known = ", ".join(f"blocks.N.{name}" for name in _HOOK_INPUTS)
        raise ModelFileError(path, f"hook_name {hook_name!r} is not supported; expected one of {known}")
    return _HOOK_INPUTS[match.group(2)], int(match.group(1))


def _tensor(tensors: dict[str, torch.Tensor], name: str, path: Path) -> torch.Tensor:
    if name not in tensors:
        raise ModelFileError(path, f"missing tensor {name!r}; found {', '.join(sorted(tensors)) or 'none'}")
    tensor = tensors[name]
    if not isinstance(tensor, torch.Tensor):
        raise ModelFileError(path, f"{name!r} is not a tensor")
    return tensor.float()


def saelens_activation(config: dict[str, Any], path: Path) -> tuple[ActivationFunction, int | None]:
    architecture = config.get("architecture", "standard")
    activation_name = str(config.get("activation_fn_str", config.get("activation_fn", "relu"))).lower()
    kwargs = config.get("activation_fn_kwargs") or {}
    if architecture == "topk" or activation_name == "topk":
        k = config.get("k", kwargs.get("k"))
        if not isinstance(k, int) or k < 1:
            raise ModelFileError(path, f"a TopK autoencoder needs a positive integer k, found {k!r}")
        return ActivationFunction.TOPK, k
    if architecture == "jumprelu":
        return ActivationFunction.JUMPRELU, None
    if architecture == "standard":
        if activation_name != "relu":
            raise ModelFileError(path, f"activation function {activation_name!r} is not supported; expected relu or topk")
        return ActivationFunction.RELU, None
    raise ModelFileError(path, f"architecture {architecture!r} is not supported; expected standard, topk or jumprelu")


def load_saelens(directory: Path) -> tuple[SparseAutoencoder, AutoencoderInput, int]:
    """Load a SAELens directory: cfg.json and sae_weights.safetensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_path = directory / "cfg.json"
    config = read_json(config_path)
    normalize = config.get("normalize_activations", "none") or "none"
    if normalize != "none":
        raise ModelFileError(config_path, f"normalize_activations {normalize!r} is not supported; only 'none' is")
    activation, k = saelens_activation(config, config_path)
    hook_name = config.get("hook_name")
    if not isinstance(hook_name, str):
        raise ModelFileError(config_path, "missing key 'hook_name'")
    source_input, layer = input_from_hook(hook_name, config_path)

    weights_path = directory / "sae_weights.safetensors"
    if not weights_path.exists():
        raise ModelFileError(weights_path, "file not found")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as error:
        raise ModelFileError(weights_path, f"weights could not be read: {error}") from error
    threshold = _tensor(tensors, "threshold", weights_path) if activation is ActivationFunction.JUMPRELU else None
    autoencoder = SparseAutoencoder(
        _tensor(tensors, "W_enc", weights_path),
        _tensor(tensors, "b_enc", weights_path),
        _tensor(tensors, "W_dec", weights_path),
        _tensor(tensors, "b_dec", weights_path),
        activation,
        k,
        threshold,
        bool(config.get("apply_b_dec_to_input", False)),
    )
    check_shapes(autoencoder, weights_path)
    declared = {"d_in": config.get("d_in"), "d_sae": config.get("d_sae")}
    actual = {"d_in": autoencoder.d_in, "d_sae": autoencoder.n_latents}
    for key, value in declared.items():
        if value is not None and value != actual[key]:
            raise ModelFileError(config_path, f"{key} is {value}, but the weights have {actual[key]}")
    return autoencoder, source_input, layer


def load_openai(path: Path) -> SparseAutoencoder:
    """Load an OpenAI `sparse_autoencoder` state dict saved with torch.save."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise ModelFileError(path, "file not found") from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise ModelFileError(path, f"not a readable torch state dict: {error}") from error
    if not isinstance(state, dict):
        raise ModelFileError(path, "expected a state dict")
    activation_name = state.get("activation", "ReLU")
    k = None
    if activation_name == "TopK":
        activation_state = state.get("activation_state_dict") or {}
        k = activation_state.get("k") if isinstance(activation_state, dict) else None
        if not isinstance(k, int) or k < 1:
            raise ModelFileError(path, f"a TopK autoencoder needs activation_state_dict.k, found {k!r}")
        activation = ActivationFunction.TOPK
    elif activation_name == "ReLU":
        activation = ActivationFunction.RELU
    else:
        raise ModelFileError(path, f"activation {activation_name!r} is not supported; expected ReLU or TopK")

    pre_bias = _tensor(state, "pre_bias", path)
    autoencoder = SparseAutoencoder(
        W_enc=_tensor(state, "encoder.weight", path).T.contiguous(),
        b_enc=_tensor(state, "latent_bias", path),
        W_dec=_tensor(state, "decoder.weight", path).T.contiguous(),
        b_dec=pre_bias,
        activation=activation,
        k=k,
        apply_b_dec_to_input=True,
    )
    check_shapes(autoencoder, path)
    return autoencoder


def check_shapes(autoencoder: SparseAutoencoder, path: Path) -> None:
    d_in, n_latents = autoencoder.d_in, autoencoder.n_latents
    expected = {
        "W_enc": (d_in, n_latents),
        "b_enc": (n_latents,),
        "W_dec": (n_latents, d_in),
        "b_dec": (d_in,),
    }
    if autoencoder.threshold is not None:
        expected["threshold"] = (n_latents,)
    for name, shape in expected.items():
        actual = tuple(getattr(autoencoder, name).shape)
        if actual != shape:
            raise ModelFileError(path, f"tensor {name} has shape {actual}, expected {shape}")


def expected_width(source_input: AutoencoderInput, config: ModelConfig) -> int:
    return config.d_mlp if source_input is AutoencoderInput.MLP_POST_ACT else config.d_model


def load_autoencoders(sources: Iterable[AutoencoderSource], config: ModelConfig) -> dict[str, AutoencoderSet]:
    """Load every source and group them into sets by id, checking each against the model."""
    sets: dict[str, AutoencoderSet] = {}
    for source in sources:
        path = source.path
        if (path / "cfg.json").exists():
            autoencoder, file_input, file_layer = load_saelens(path)
        elif path.is_file():
            if source.input is None or source.layer is None:
                raise ModelFileError(path, "an OpenAI autoencoder file needs input=NAME and layer=N in its setting")
            autoencoder = load_openai(path)
            file_input, file_layer = source.input, source.layer
        else:
            raise ModelFileError(path, "not found: expected a SAELens directory with cfg.json or a .pt file")
        source_input = source.input or file_input
        layer = file_layer if source.layer is None else source.layer
        if not 0 <= layer < config.n_layers:
            raise ModelFileError(path, f"layer {layer} is out of range: the model has {config.n_layers} layers")
        width = expected_width(source_input, config)
        if autoencoder.d_in != width:
            raise ModelFileError(
                path, f"d_in is {autoencoder.d_in}, but the model's {source_input.value} has width {width}"
            )

        autoencoder_set = sets.setdefault(source.id, AutoencoderSet(source.id, source_input))
        if autoencoder_set.input is not source_input:
            raise ModelFileError(
                path, f"autoencoder {source.id!r} reads {autoencoder_set.input.value}, this file reads {source_input.value}"
            )
        if layer in autoencoder_set.by_layer:
            raise ModelFileError(path, f"autoencoder {source.id!r} already has layer {layer} from {autoencoder_set.sources[layer]}")
        if autoencoder_set.by_layer and autoencoder.n_latents != autoencoder_set.n_latents:
            raise ModelFileError(
                path, f"{autoencoder.n_latents} latents, but autoencoder {source.id!r} has {autoencoder_set.n_latents}"
            )
        autoencoder_set.by_layer[layer] = autoencoder
        autoencoder_set.sources[layer] = str(path)
        logger.info(
            "loaded autoencoder %s layer %d (%s, %d latents, %s) from %s",
            source.id, layer, source_input.value, autoencoder.n_latents, autoencoder.describe_activation(), path,
        )
    return sets
