"""Sparse autoencoders: file formats, encoding, latents as nodes, and bad files.

Expected encodings are computed by hand from the same tensors the files hold; latent
activations are checked against encoding activations hooked out of `transformers`'
forward pass, and derivatives against autograd through `transformers`' submodules and
finite differences.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from service.core.locations import resid_mid, resid_post, resid_pre
from service.core.nodes import AttentionTrace, LocationSpec, Node, PreOrPost
from service.core.reconstituter import Reconstituter
from service.loaders.autoencoders import AutoencoderSource, load_autoencoders, load_openai, load_saelens
from service.loaders.errors import ModelFileError
from service.model.autoencoder import AutoencoderInput, AutoencoderSet
from tests import reference as ref
from tests.conftest import Checkpoint, assert_close, relative_error

TOKEN_IDS = [5, 80, 17, 250, 3, 99, 42]
N = len(TOKEN_IDS)
LAYER = 1
N_LATENTS = 64
HOOKS = {
    AutoencoderInput.RESID_DELTA_MLP: "hook_mlp_out",
    AutoencoderInput.RESID_DELTA_ATTN: "hook_attn_out",
    AutoencoderInput.RESID_PRE: "hook_resid_pre",
    AutoencoderInput.MLP_POST_ACT: "mlp.hook_post",
}


def random_tensors(d_in: int, seed: int = 0, with_threshold: bool = False) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        "W_enc": torch.randn(d_in, N_LATENTS, generator=generator) / d_in**0.5,
        "b_enc": 0.1 * torch.randn(N_LATENTS, generator=generator),
        "W_dec": torch.randn(N_LATENTS, d_in, generator=generator) / N_LATENTS**0.5,
        "b_dec": 0.1 * torch.randn(d_in, generator=generator),
    }
    if with_threshold:
        tensors["threshold"] = 0.05 + 0.1 * torch.rand(N_LATENTS, generator=generator)
    return tensors


def write_saelens(
    directory: Path,
    d_in: int,
    source: AutoencoderInput = AutoencoderInput.RESID_DELTA_MLP,
    layer: int = LAYER,
    seed: int = 0,
    **config: Any,
) -> dict[str, torch.Tensor]:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = random_tensors(d_in, seed, with_threshold=config.get("architecture") == "jumprelu")
    cfg = {
        "architecture": "standard",
        "d_in": d_in,
        "d_sae": N_LATENTS,
        "hook_name": f"blocks.{layer}.{HOOKS[source]}",
        "hook_layer": layer,
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        **config,
    }
    (directory / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(directory / "sae_weights.safetensors"))
    return tensors


def encode_by_hand(tensors: dict[str, torch.Tensor], x: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    """The encoder written out independently: affine map, then the architecture's activation."""
    x = x.double()
    if config.get("apply_b_dec_to_input"):
        x = x - tensors["b_dec"].double()
    pre = x @ tensors["W_enc"].double() + tensors["b_enc"].double()
    architecture = config.get("architecture", "standard")
    k = config.get("k", (config.get("activation_fn_kwargs") or {}).get("k"))
    if architecture == "topk" or config.get("activation_fn_str") == "topk":
        latents = torch.zeros_like(pre)
        for row in range(pre.shape[0]):
            order = sorted(range(pre.shape[1]), key=lambda column: -float(pre[row, column]))[:k]
            for column in order:
                latents[row, column] = max(float(pre[row, column]), 0.0)
        return latents
    if architecture == "jumprelu":
        return pre * (pre > tensors["threshold"].double())
    return pre.clamp_min(0.0)


ARCHITECTURES = {
    "standard": {"architecture": "standard"},
    "standard_b_dec_input": {"architecture": "standard", "apply_b_dec_to_input": True},
    "topk": {"architecture": "topk", "k": 5},
    "topk_legacy_kwargs": {"architecture": "standard", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 4}},
    "jumprelu": {"architecture": "jumprelu"},
}


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_saelens_encode_decode_by_hand(tmp_path: Path, name: str) -> None:
    config = ARCHITECTURES[name]
    tensors = write_saelens(tmp_path / name, 32, **config)
    autoencoder, source, layer = load_saelens(tmp_path / name)
    x = torch.randn(9, 32, generator=torch.Generator().manual_seed(4))

    latents = autoencoder.encode(x)
    assert source is AutoencoderInput.RESID_DELTA_MLP
    assert layer == LAYER
    assert_close(latents, encode_by_hand(tensors, x, config).float(), "activation")
    expected_decoding = latents.double() @ tensors["W_dec"].double() + tensors["b_dec"].double()
    assert_close(autoencoder.decode(latents), expected_decoding.float(), "activation")


@pytest.mark.parametrize("name", ["topk", "topk_legacy_kwargs"])
def test_topk_never_acts_as_relu(tmp_path: Path, name: str) -> None:
    config = ARCHITECTURES[name]
    tensors = write_saelens(tmp_path / name, 32, **config)
    autoencoder, _, _ = load_saelens(tmp_path / name)
    x = torch.randn(20, 32, generator=torch.Generator().manual_seed(5))
    k = config.get("k", 4)
    active = (autoencoder.encode(x) != 0).sum(dim=-1)
    relu_active = (encode_by_hand(tensors, x, {"architecture": "standard"}) != 0).sum(dim=-1)
    assert int(active.max()) <= k
    assert int(relu_active.min()) > k, "the test input must give ReLU more than k active latents"


@pytest.mark.parametrize("activation", ["ReLU", "TopK"])
def test_openai_state_dict_by_hand(tmp_path: Path, activation: str) -> None:
    generator = torch.Generator().manual_seed(6)
    d_in = 32
    state: dict[str, Any] = {
        "pre_bias": 0.1 * torch.randn(d_in, generator=generator),
        "encoder.weight": torch.randn(N_LATENTS, d_in, generator=generator) / d_in**0.5,
        "latent_bias": 0.1 * torch.randn(N_LATENTS, generator=generator),
        "decoder.weight": torch.randn(d_in, N_LATENTS, generator=generator) / N_LATENTS**0.5,
        "activation": activation,
    }
    if activation == "TopK":
        state["activation_state_dict"] = {"k": 3, "postact_fn": "ReLU"}
    path = tmp_path / "ae.pt"
    torch.save(state, path)
    autoencoder = load_openai(path)
    x = torch.randn(6, d_in, generator=generator)

    pre = (x - state["pre_bias"]) @ state["encoder.weight"].T + state["latent_bias"]
    if activation == "TopK":
        values, indices = pre.topk(3, dim=-1)
        expected = torch.zeros_like(pre).scatter(-1, indices, values.clamp_min(0))
    else:
        expected = pre.clamp_min(0)
    assert_close(autoencoder.encode(x), expected, "activation")
    assert_close(autoencoder.decode(expected), expected @ state["decoder.weight"].T + state["pre_bias"], "activation")


# --- latents as nodes on the tiny model ---------------------------------------------------


def load_sets(tmp_path: Path, checkpoint: Checkpoint, config: dict[str, Any]) -> tuple[dict[str, AutoencoderSet], dict]:
    model_config = checkpoint.loaded.model.config
    sources = []
    tensors = {}
    for position, source in enumerate(AutoencoderInput):
        width = model_config.d_mlp if source is AutoencoderInput.MLP_POST_ACT else model_config.d_model
        directory = tmp_path / source.value
        tensors[source] = write_saelens(directory, width, source, seed=position, **config)
        sources.append(AutoencoderSource(source.value, directory))
    return load_autoencoders(sources, model_config), tensors


def hooked_input(hooked: ref.Hooked, source: AutoencoderInput, layer: int) -> torch.Tensor:
    if source is AutoencoderInput.MLP_POST_ACT:
        return hooked.mlp_post[layer]
    if source is AutoencoderInput.RESID_DELTA_MLP:
        return hooked.mlp_out[layer]
    if source is AutoencoderInput.RESID_DELTA_ATTN:
        return hooked.attention_out[layer]
    return hooked.resid_pre[layer]


def latent_spec(source: AutoencoderInput, pre_or_post: str = "post", detach: bool = False) -> LocationSpec:
    return LocationSpec(
        "autoencoder_latent",
        LAYER,
        PreOrPost(pre_or_post),
        detach,
        autoencoder=source.value,
        autoencoder_input=source,
    )


@pytest.mark.parametrize("config_name", ["standard", "topk"])
@pytest.mark.parametrize("source", list(AutoencoderInput), ids=lambda source: source.value)
def test_latents_match_hooked_encoding(
    tmp_path: Path, tiny_checkpoint: Checkpoint, source: AutoencoderInput, config_name: str
) -> None:
    config = ARCHITECTURES[config_name]
    sets, tensors = load_sets(tmp_path, tiny_checkpoint, config)
    core = Reconstituter(tiny_checkpoint.loaded.model, torch.tensor(TOKEN_IDS), sets)
    hooked = ref.Hooked(tiny_checkpoint.reference, TOKEN_IDS)
    expected = encode_by_hand(tensors[source], hooked_input(hooked, source, LAYER), config)
    assert_close(core.activations(latent_spec(source)), expected.float(), "activation")


def float64_core(checkpoint: Checkpoint, sets: dict[str, AutoencoderSet]) -> tuple[Reconstituter, Any]:
    model = copy.deepcopy(checkpoint.loaded.model).double()
    model.requires_grad_(False)
    reference = copy.deepcopy(checkpoint.reference).double()
    reference.requires_grad_(False)
    sets64 = {name: copy.deepcopy(item).to("cpu", torch.float64) for name, item in sets.items()}
    return Reconstituter(model, torch.tensor(TOKEN_IDS), sets64), reference


def reference_input(reference: Any, source: AutoencoderInput, resid: torch.Tensor) -> torch.Tensor:
    """The autoencoder's input recomputed from a residual with transformers' submodules."""
    block = ref.layer_module(reference, LAYER)
    if source is AutoencoderInput.MLP_POST_ACT:
        return ref.mlp_activations(reference, LAYER, resid)[1]
    if source is AutoencoderInput.RESID_DELTA_MLP:
        if ref.is_llama(reference):
            return block.mlp(block.post_attention_layernorm(resid[None]))[0]
        return block.mlp(block.ln_2(resid[None]))[0]
    if source is AutoencoderInput.RESID_DELTA_ATTN:
        _, probs = ref.attention_activations(reference, LAYER, resid)
        _, _, value = ref.query_key_value(reference, LAYER, resid)
        out = sum(
            probs[:, :, head] @ value[head] @ ref.head_output_matrix(reference, LAYER, head) for head in range(value.shape[0])
        )
        if not ref.is_llama(reference):
            out = out + block.attn.c_proj.bias
        return out
    return resid


@pytest.mark.parametrize("source", list(AutoencoderInput), ids=lambda source: source.value)
def test_latent_gradient_matches_reference(tmp_path: Path, tiny_checkpoint: Checkpoint, source: AutoencoderInput) -> None:
    sets, tensors = load_sets(tmp_path, tiny_checkpoint, ARCHITECTURES["standard"])
    core, reference = float64_core(tiny_checkpoint, sets)
    spec = latent_spec(source, pre_or_post="pre")
    node = Node(spec, (5, 7))
    result = core.gradient(node)

    leaf = core.stream.at(result.residual_location).clone().requires_grad_(True)
    with torch.enable_grad():
        pre = reference_input(reference, source, leaf) @ tensors[source]["W_enc"].double() + tensors[source]["b_enc"].double()
        (expected,) = torch.autograd.grad(pre[node.index], leaf)
    assert relative_error(result.gradient, expected) < 1e-4
    assert float(expected.abs().max()) > 0


@pytest.mark.parametrize("config_name", ["standard", "topk"])
@pytest.mark.parametrize("source", list(AutoencoderInput), ids=lambda source: source.value)
def test_latent_jvp_matches_oracles(
    tmp_path: Path, tiny_checkpoint: Checkpoint, source: AutoencoderInput, config_name: str
) -> None:
    sets, _ = load_sets(tmp_path, tiny_checkpoint, ARCHITECTURES[config_name])
    core, _ = float64_core(tiny_checkpoint, sets)
    spec = latent_spec(source)
    location = core.residual_location(spec)
    write = torch.randn(N, core.model.config.d_model, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    result = core.jvp(spec, write, location)

    function = core.function(spec)
    resid = core.stream.at(location)
    step = 1e-7
    with torch.no_grad():
        difference = (function(resid + step * write) - function(resid - step * write)) / (2 * step)
    assert relative_error(result.jvp, difference) < 1e-6

    for index in [(6, 0), (6, 3), (2, 10), (4, 63)]:
        gradient = core.gradient(Node(spec, index)).gradient
        assert float(result.jvp[index]) == pytest.approx(float((gradient * write).sum()), rel=1e-5, abs=1e-12)


@pytest.mark.parametrize("source", list(AutoencoderInput), ids=lambda source: source.value)
def test_latent_writes_sum_to_reconstruction(tmp_path: Path, tiny_checkpoint: Checkpoint, source: AutoencoderInput) -> None:
    sets, _ = load_sets(tmp_path, tiny_checkpoint, ARCHITECTURES["standard"])
    core, _ = float64_core(tiny_checkpoint, sets)
    spec = latent_spec(source)
    autoencoder = core.autoencoders[source.value].by_layer[LAYER]
    token = 4
    latents = core.activations(spec)
    total = sum(core.write(Node(spec, (token, latent)))[0] for latent in range(N_LATENTS))
    reconstruction = autoencoder.decode(latents[token]) - autoencoder.b_dec
    if source is AutoencoderInput.MLP_POST_ACT:
        reconstruction = reconstruction @ core.model.block(LAYER).mlp.output_weight()
    assert_close(total[token], reconstruction, "float64_exact")

    _, location = core.write(Node(spec, (token, 0)))
    expected_location = {
        AutoencoderInput.MLP_POST_ACT: resid_post(LAYER),
        AutoencoderInput.RESID_DELTA_MLP: resid_post(LAYER),
        AutoencoderInput.RESID_DELTA_ATTN: resid_mid(LAYER),
        AutoencoderInput.RESID_PRE: resid_pre(LAYER),
    }[source]
    assert location == expected_location


def test_latent_direct_effect_on_later_node(tmp_path: Path, tiny_checkpoint: Checkpoint) -> None:
    sets, _ = load_sets(tmp_path, tiny_checkpoint, ARCHITECTURES["topk"])
    core, _ = float64_core(tiny_checkpoint, sets)
    writer = Node(latent_spec(AutoencoderInput.RESID_DELTA_ATTN), (5, 0))
    latents = core.activations(writer.spec)
    writer = Node(writer.spec, (5, int(latents[5].argmax())))
    target = core.gradient(Node(LocationSpec("mlp_neuron", LAYER, PreOrPost.POST, False), (5, 3)))
    vector, _ = core.write(writer)
    effect = core.direct_effect(writer, target)
    assert effect is not None
    assert effect == pytest.approx(float((vector * target.gradient).sum()), rel=1e-12)
    assert float(vector.abs().sum()) > 0


def test_value_trace_onto_latent(tmp_path: Path, tiny_checkpoint: Checkpoint) -> None:
    sets, _ = load_sets(tmp_path, tiny_checkpoint, ARCHITECTURES["standard"])
    core, _ = float64_core(tiny_checkpoint, sets)
    downstream = Node(latent_spec(AutoencoderInput.RESID_DELTA_MLP, pre_or_post="pre"), (6, 2))
    spec = LocationSpec("attention_head", 0, PreOrPost.POST, False, AttentionTrace.V, downstream)
    traced = core.activations(spec)
    gradient = core.gradient(downstream)
    for attended in range(7):
        writer = Node(LocationSpec("attention_head", 0, PreOrPost.POST, False), (6, attended, 1))
        effect = core.direct_effect(writer, gradient)
        assert effect is not None
        assert float(traced[6, attended, 1]) == pytest.approx(effect, rel=1e-9, abs=1e-15)


# --- bad files --------------------------------------------------------------------------


def broken(directory: Path, change: str) -> None:
    config_path = directory / "cfg.json"
    weights_path = directory / "sae_weights.safetensors"
    config = json.loads(config_path.read_text())
    tensors = random_tensors(32)
    if change == "missing_tensor":
        del tensors["b_enc"]
    elif change == "wrong_shape":
        tensors["W_dec"] = tensors["W_dec"][:, :16].contiguous()
    elif change == "unknown_architecture":
        config["architecture"] = "gated_experimental"
    elif change == "normalized":
        config["normalize_activations"] = "expected_average_only_in"
    elif change == "topk_without_k":
        config["architecture"] = "topk"
    elif change == "bad_hook":
        config["hook_name"] = "blocks.1.hook_q"
    elif change == "missing_cfg":
        config_path.unlink()
        return
    elif change == "truncated_weights":
        save_file(tensors, str(weights_path))
        weights_path.write_bytes(weights_path.read_bytes()[:100])
        config_path.write_text(json.dumps(config))
        return
    config_path.write_text(json.dumps(config))
    save_file(tensors, str(weights_path))


BAD_FILES = {
    "missing_tensor": ("sae_weights.safetensors", "b_enc"),
    "wrong_shape": ("sae_weights.safetensors", "W_dec"),
    "unknown_architecture": ("cfg.json", "gated_experimental"),
    "normalized": ("cfg.json", "normalize_activations"),
    "topk_without_k": ("cfg.json", "k"),
    "bad_hook": ("cfg.json", "blocks.1.hook_q"),
    "missing_cfg": ("", "not found"),
    "truncated_weights": ("sae_weights.safetensors", "could not be read"),
}


@pytest.mark.parametrize("change", BAD_FILES)
def test_bad_autoencoder_file_names_problem(tmp_path: Path, tiny_llama: Checkpoint, change: str) -> None:
    directory = tmp_path / "ae"
    write_saelens(directory, 32)
    broken(directory, change)
    file_name, problem = BAD_FILES[change]
    with pytest.raises(ModelFileError) as raised:
        load_autoencoders([AutoencoderSource("ae", directory)], tiny_llama.loaded.model.config)
    assert str(directory / file_name).rstrip("/") in str(raised.value)
    assert problem in str(raised.value)


def test_autoencoder_width_must_fit_model(tmp_path: Path, tiny_llama: Checkpoint) -> None:
    write_saelens(tmp_path / "wide", 40)
    with pytest.raises(ModelFileError, match="d_in is 40, but the model's resid_delta_mlp has width 32"):
        load_autoencoders([AutoencoderSource("ae", tmp_path / "wide")], tiny_llama.loaded.model.config)


def test_autoencoder_layer_must_exist(tmp_path: Path, tiny_llama: Checkpoint) -> None:
    write_saelens(tmp_path / "deep", 32, layer=7)
    with pytest.raises(ModelFileError, match="layer 7 is out of range"):
        load_autoencoders([AutoencoderSource("ae", tmp_path / "deep")], tiny_llama.loaded.model.config)


def test_openai_file_needs_input_and_layer(tmp_path: Path, tiny_llama: Checkpoint) -> None:
    path = tmp_path / "ae.pt"
    torch.save({"pre_bias": torch.zeros(32)}, path)
    with pytest.raises(ModelFileError, match="encoder.weight"):
        load_openai(path)
    with pytest.raises(ModelFileError, match="needs input=NAME and layer=N"):
        load_autoencoders([AutoencoderSource("ae", path)], tiny_llama.loaded.model.config)


@pytest.mark.parametrize(
    "text",
    ["no-equals-sign", "bad id!=x", "ae=x;input=resid_post", "ae=x;colour=red"],
)
def test_autoencoder_setting_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError):
        AutoencoderSource.parse(text)


def test_autoencoder_setting_parses_options() -> None:
    source = AutoencoderSource.parse("mlp=/tmp/ae.pt;input=mlp_post_act;layer=3")
    assert source.id == "mlp"
    assert source.path == Path("/tmp/ae.pt")
    assert source.input is AutoencoderInput.MLP_POST_ACT
    assert source.layer == 3
