"""Activations, gradients, JVPs and write vectors against independent oracles.

Oracles: values hooked out of `transformers`' full forward pass, autograd through
`transformers`' own submodules (tests/reference.py), and float64 central finite
differences. Derivative tests run the service's model and the reference in float64.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from service.core.locations import RESID_FINAL, ResidualLocation, resid_mid, resid_post, resid_pre
from service.core.nodes import AttentionTrace, LocationSpec, Node, PreOrPost
from service.core.reconstituter import Reconstituter
from service.model.base import Transformer
from tests import reference as ref
from tests.conftest import Checkpoint, assert_close, relative_error

TOKEN_IDS = [5, 80, 17, 250, 3, 99, 42]
N = len(TOKEN_IDS)
LAYER = 1


def mlp(layer: int = LAYER, pre_or_post: str = "post", detach: bool = False) -> LocationSpec:
    return LocationSpec("mlp_neuron", layer, PreOrPost(pre_or_post), detach)


def attention(layer: int = LAYER, pre_or_post: str = "post", detach: bool = False, trace: str = "qk") -> LocationSpec:
    return LocationSpec("attention_head", layer, PreOrPost(pre_or_post), detach, AttentionTrace(trace))


def logits_spec(node_type: str = "logit", detach: bool = False, contrast: tuple[int, int] | None = None) -> LocationSpec:
    return LocationSpec(node_type, None, PreOrPost.POST, detach, contrast=contrast)


@pytest.fixture(scope="module")
def float64_checkpoint(tiny_checkpoint: Checkpoint) -> Iterator[tuple[Transformer, Any]]:
    """The service's model and the reference, both in float64."""
    model = copy.deepcopy(tiny_checkpoint.loaded.model).double()
    model.requires_grad_(False)
    reference = copy.deepcopy(tiny_checkpoint.reference).double()
    reference.requires_grad_(False)
    yield model, reference


def reconstituter(model: Transformer) -> Reconstituter:
    return Reconstituter(model, torch.tensor(TOKEN_IDS))


def reference_location(reference: Any, spec: LocationSpec, resid: torch.Tensor) -> torch.Tensor:
    """Compute a location's activations with the reference model's modules."""
    detach = spec.detach_norm_scale
    if spec.node_type == "mlp_neuron":
        assert spec.layer is not None
        pre, post = ref.mlp_activations(reference, spec.layer, resid, detach)
        return pre if spec.pre_or_post is PreOrPost.PRE else post
    if spec.node_type == "attention_head":
        assert spec.layer is not None
        trace = spec.attention_trace
        logits, probs = ref.attention_activations(
            reference, spec.layer, resid, detach, detach_query=trace is AttentionTrace.K, detach_key=trace is AttentionTrace.Q
        )
        return logits if spec.pre_or_post is PreOrPost.PRE else probs
    logits = ref.final_logits(reference, resid, detach)
    if spec.node_type == "logprob":
        return torch.log_softmax(logits, dim=-1)
    if spec.node_type == "logit_diff":
        assert spec.contrast is not None
        return logits[:, spec.contrast[0]] - logits[:, spec.contrast[1]]
    return logits


def hooked_residual(hooked: ref.Hooked, location: ResidualLocation) -> torch.Tensor:
    if location == RESID_FINAL:
        return hooked.resid_final
    assert location.layer is not None
    if location.name.value == "resid_pre":
        return hooked.resid_pre[location.layer]
    return hooked.resid_mid[location.layer]


# --- activations -------------------------------------------------------------------------

ACTIVATION_CASES = {
    "mlp_pre": mlp(pre_or_post="pre"),
    "mlp_post": mlp(),
    "attention_pre": attention(pre_or_post="pre"),
    "attention_post": attention(),
    "logit": logits_spec(),
    "logprob": logits_spec("logprob"),
    "logit_diff": logits_spec("logit_diff", contrast=(7, 11)),
}


@pytest.mark.parametrize("name", ACTIVATION_CASES)
def test_activations_match_hooked_forward(tiny_checkpoint: Checkpoint, name: str) -> None:
    spec = ACTIVATION_CASES[name]
    core = reconstituter(tiny_checkpoint.loaded.model)
    hooked = ref.Hooked(tiny_checkpoint.reference, TOKEN_IDS)
    actual = core.activations(spec)

    if name == "mlp_pre":
        expected = hooked.mlp_pre[LAYER]
    elif name == "mlp_post":
        expected = hooked.mlp_post[LAYER]
    elif name == "attention_post":
        expected = hooked.attention_probs[LAYER]
    elif name == "attention_pre":
        # transformers does not expose the logits; recompute them from the hooked residual.
        with torch.no_grad():
            expected, _ = ref.attention_activations(tiny_checkpoint.reference, LAYER, hooked.resid_pre[LAYER])
    else:
        with torch.no_grad():
            expected = reference_location(tiny_checkpoint.reference, spec, hooked.resid_final)
        if name == "logit":
            assert_close(expected, hooked.logits, "logits")

    if name == "attention_pre":
        finite = torch.isfinite(expected)
        assert torch.equal(torch.isfinite(actual), finite)
        assert_close(actual[finite], expected[finite], "activation")
    else:
        assert_close(actual, expected, "activation")


def test_single_node_activation_indexes_location(tiny_checkpoint: Checkpoint) -> None:
    core = reconstituter(tiny_checkpoint.loaded.model)
    hooked = ref.Hooked(tiny_checkpoint.reference, TOKEN_IDS)
    node = Node(mlp(), (3, 5))
    assert core.activation(node) == pytest.approx(float(hooked.mlp_post[LAYER][3, 5]), abs=1e-5)
    head = Node(attention(), (4, 2, 1))
    assert core.activation(head) == pytest.approx(float(hooked.attention_probs[LAYER][4, 2, 1]), abs=1e-5)


def test_residual_locations_match_hooked(tiny_checkpoint: Checkpoint) -> None:
    core = reconstituter(tiny_checkpoint.loaded.model)
    hooked = ref.Hooked(tiny_checkpoint.reference, TOKEN_IDS)
    for layer in range(tiny_checkpoint.loaded.model.config.n_layers):
        assert_close(core.stream.at(resid_pre(layer)), hooked.resid_pre[layer], "hidden_states")
        assert_close(core.stream.at(resid_mid(layer)), hooked.resid_mid[layer], "hidden_states")
    assert_close(core.stream.at(RESID_FINAL), hooked.resid_final, "hidden_states")


# --- gradients ---------------------------------------------------------------------------

GRADIENT_CASES = {
    "mlp_pre": (mlp(pre_or_post="pre"), (5, 3)),
    "mlp_post": (mlp(), (5, 3)),
    "attention_pre_qk": (attention(pre_or_post="pre"), (5, 2, 1)),
    "attention_post_qk": (attention(), (5, 2, 1)),
    "attention_post_q": (attention(trace="q"), (5, 2, 1)),
    "attention_post_k": (attention(trace="k"), (5, 2, 1)),
    "attention_pre_k": (attention(pre_or_post="pre", trace="k"), (6, 0, 3)),
    "logit": (logits_spec(), (6, 17)),
    "logprob": (logits_spec("logprob"), (6, 17)),
    "logit_diff": (logits_spec("logit_diff", contrast=(17, 42)), (6,)),
}


def reference_gradient(reference: Any, node: Node, resid: torch.Tensor) -> tuple[float, torch.Tensor]:
    leaf = resid.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        value = reference_location(reference, node.spec, leaf)[node.index]
        (gradient,) = torch.autograd.grad(value, leaf)
    return float(value.detach()), gradient


@pytest.mark.parametrize("detach", [False, True], ids=["scale_live", "scale_detached"])
@pytest.mark.parametrize("name", GRADIENT_CASES)
def test_gradient_matches_reference_autograd(
    float64_checkpoint: tuple[Transformer, Any], name: str, detach: bool
) -> None:
    model, reference = float64_checkpoint
    base_spec, index = GRADIENT_CASES[name]
    node = Node(LocationSpec(**{**base_spec.__dict__, "detach_norm_scale": detach}), index)
    core = reconstituter(model)
    result = core.gradient(node)
    expected_value, expected_gradient = reference_gradient(reference, node, core.stream.at(result.residual_location))

    # transformers' LlamaRMSNorm takes its statistics in float32 even in a float64 model, so
    # values agree to float32 precision here, not float64.
    assert result.activation == pytest.approx(expected_value, rel=1e-6, abs=1e-9)
    assert relative_error(result.gradient, expected_gradient) < 1e-4
    assert float(expected_gradient.abs().max()) > 0, "the oracle gradient is zero, so the case checks nothing"


@pytest.mark.parametrize("name", ["mlp_post", "attention_post_qk", "logit"])
def test_detached_scale_changes_gradient_only(float64_checkpoint: tuple[Transformer, Any], name: str) -> None:
    model, _ = float64_checkpoint
    base_spec, index = GRADIENT_CASES[name]
    live = reconstituter(model).gradient(Node(LocationSpec(**{**base_spec.__dict__, "detach_norm_scale": False}), index))
    detached = reconstituter(model).gradient(Node(LocationSpec(**{**base_spec.__dict__, "detach_norm_scale": True}), index))
    assert live.activation == detached.activation
    assert relative_error(detached.gradient, live.gradient) > 1e-3


def test_query_and_key_traces_sum_to_full(float64_checkpoint: tuple[Transformer, Any]) -> None:
    model, _ = float64_checkpoint
    index = (5, 2, 1)
    gradients = {
        trace: reconstituter(model).gradient(Node(attention(pre_or_post="pre", trace=trace), index)).gradient
        for trace in ("q", "k", "qk")
    }
    # The logit is bilinear in query and key, so the two one-sided gradients add up to the full one.
    assert_close(gradients["q"] + gradients["k"], gradients["qk"], "float64_exact")


@pytest.mark.parametrize("name", ["mlp_pre", "attention_post_qk", "logprob"])
def test_gradient_matches_finite_differences(float64_checkpoint: tuple[Transformer, Any], name: str) -> None:
    model, _ = float64_checkpoint
    spec, index = GRADIENT_CASES[name]
    node = Node(spec, index)
    core = reconstituter(model)
    result = core.gradient(node)
    resid = core.stream.at(result.residual_location)
    function = core.function(spec)
    direction = torch.randn(resid.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    step = 1e-6
    with torch.no_grad():
        plus = function(resid + step * direction)[node.index]
        minus = function(resid - step * direction)[node.index]
    finite_difference = float((plus - minus) / (2 * step))
    assert float((result.gradient * direction).sum()) == pytest.approx(finite_difference, rel=1e-6)


# --- JVPs --------------------------------------------------------------------------------

JVP_CASES = {
    "mlp_post": mlp(),
    "mlp_pre_detached": mlp(pre_or_post="pre", detach=True),
    "attention_pre_qk": attention(pre_or_post="pre"),
    "attention_post_qk": attention(),
    "attention_post_q": attention(trace="q"),
    "attention_post_k": attention(trace="k"),
    "logprob": logits_spec("logprob"),
}
# Finite differences see the whole function, so they check only specs that detach nothing.
UNDETACHED_JVP_CASES = ["mlp_post", "attention_pre_qk", "attention_post_qk", "logprob"]


def random_write(n_tokens: int, d_model: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n_tokens, d_model, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("name", UNDETACHED_JVP_CASES)
def test_jvp_matches_finite_differences(float64_checkpoint: tuple[Transformer, Any], name: str) -> None:
    model, _ = float64_checkpoint
    spec = JVP_CASES[name]
    core = reconstituter(model)
    location = core.residual_location(spec)
    write = random_write(N, model.config.d_model)
    result = core.jvp(spec, write, location)

    function = core.function(spec)
    resid = core.stream.at(location)
    step = 1e-6
    with torch.no_grad():
        difference = (function(resid + step * write) - function(resid - step * write)) / (2 * step)
    finite = torch.isfinite(difference)
    assert result.upstream
    assert relative_error(result.jvp[finite], difference[finite]) < 1e-6


@pytest.mark.parametrize("name", ["mlp_post", "mlp_pre_detached", "attention_pre_qk", "attention_post_q", "attention_post_k"])
def test_jvp_matches_stacked_gradients(float64_checkpoint: tuple[Transformer, Any], name: str) -> None:
    model, _ = float64_checkpoint
    spec = JVP_CASES[name]
    core = reconstituter(model)
    location = core.residual_location(spec)
    write = random_write(N, model.config.d_model, seed=3)
    jvp = core.jvp(spec, write, location).jvp

    stacked = torch.zeros_like(jvp)
    masked = spec.kind.masked(spec, N)
    for index in torch.cartesian_prod(*(torch.arange(size) for size in jvp.shape)).tolist():
        if masked is not None and bool(masked.expand_as(jvp)[tuple(index)]):
            continue
        gradient = core.gradient(Node(spec, tuple(index))).gradient
        stacked[tuple(index)] = (gradient * write).sum()
    if masked is not None:
        jvp = jvp.masked_fill(masked.expand_as(jvp), 0.0)
    assert relative_error(jvp, stacked) < 1e-5


def test_jvp_of_late_write_is_zero(float64_checkpoint: tuple[Transformer, Any]) -> None:
    model, _ = float64_checkpoint
    core = reconstituter(model)
    spec = mlp(layer=0)
    result = core.jvp(spec, random_write(N, model.config.d_model), resid_post(0))
    assert not result.upstream
    assert result.jvp.shape == (N, model.config.d_mlp)
    assert not bool(result.jvp.any())


# --- write vectors and direct effects ----------------------------------------------------


def test_neuron_writes_sum_to_mlp_output(tiny_checkpoint: Checkpoint) -> None:
    model = tiny_checkpoint.loaded.model
    core = reconstituter(model)
    hooked = ref.Hooked(tiny_checkpoint.reference, TOKEN_IDS)
    token = 4
    total = sum(core.write(Node(mlp(), (token, neuron)))[0] for neuron in range(model.config.d_mlp))
    expected = hooked.mlp_out[LAYER][token]
    if not ref.is_llama(tiny_checkpoint.reference):
        expected = expected - ref.layer_module(tiny_checkpoint.reference, LAYER).mlp.c_proj.bias
    assert_close(total[token], expected, "hidden_states")
    assert not bool(total[torch.arange(N) != token].any())


def test_head_writes_sum_to_attention_output(tiny_checkpoint: Checkpoint) -> None:
    model = tiny_checkpoint.loaded.model
    core = reconstituter(model)
    hooked = ref.Hooked(tiny_checkpoint.reference, TOKEN_IDS)
    token = 5
    total = sum(
        core.write(Node(attention(), (token, attended, head)))[0]
        for attended in range(token + 1)
        for head in range(model.config.n_heads)
    )
    expected = hooked.attention_out[LAYER][token]
    if not ref.is_llama(tiny_checkpoint.reference):
        expected = expected - ref.layer_module(tiny_checkpoint.reference, LAYER).attn.c_proj.bias
    assert_close(total[token], expected, "hidden_states")


def test_head_write_matches_reference(float64_checkpoint: tuple[Transformer, Any]) -> None:
    model, reference = float64_checkpoint
    core = reconstituter(model)
    vector, location = core.write(Node(attention(layer=0), (4, 1, 2)))
    with torch.no_grad():
        expected = ref.head_write(reference, 0, core.stream.at(resid_pre(0)), 4, 1, 2)
    assert location == resid_mid(0)
    assert_close(vector, expected, "float64_through_reference")


def test_direct_effect_is_write_dot_gradient(float64_checkpoint: tuple[Transformer, Any]) -> None:
    model, _ = float64_checkpoint
    core = reconstituter(model)
    target = core.gradient(Node(mlp(layer=2), (5, 7)))
    writer = Node(attention(layer=0), (5, 3, 1))
    vector, _ = core.write(writer)
    assert core.direct_effect(writer, target) == pytest.approx(float((vector * target.gradient).sum()), rel=1e-12)
    late_writer = Node(mlp(layer=2), (5, 1))
    assert core.direct_effect(late_writer, target) is None


def test_direct_effect_predicts_jvp(float64_checkpoint: tuple[Transformer, Any]) -> None:
    model, _ = float64_checkpoint
    core = reconstituter(model)
    writer = Node(mlp(layer=0), (4, 9))
    vector, location = core.write(writer)
    spec = attention(layer=2, pre_or_post="pre")
    jvp = core.jvp(spec, vector, location).jvp
    node = Node(spec, (6, 4, 2))
    effect = core.direct_effect(writer, core.gradient(node))
    assert effect is not None
    assert float(jvp[node.index]) == pytest.approx(effect, rel=1e-9)


# --- value tracing -----------------------------------------------------------------------


def value_spec(layer: int, downstream: Node, detach: bool = False) -> LocationSpec:
    return LocationSpec("attention_head", layer, PreOrPost.POST, detach, AttentionTrace.V, downstream)


@pytest.mark.parametrize("detach", [False, True], ids=["scale_live", "scale_detached"])
def test_value_trace_matches_reference(float64_checkpoint: tuple[Transformer, Any], detach: bool) -> None:
    model, reference = float64_checkpoint
    downstream = Node(logits_spec("logit_diff", contrast=(17, 42)), (6,))
    spec = value_spec(1, downstream, detach)
    core = reconstituter(model)
    resid = core.stream.at(resid_pre(1))
    _, downstream_gradient = reference_gradient(reference, downstream, core.stream.at(RESID_FINAL))

    with torch.no_grad():
        expected = ref.value_trace(reference, 1, resid, downstream_gradient, detach)
    actual = core.activations(spec)
    assert_close(actual, expected, "float64_through_reference")

    node = Node(spec, (6, 2, 1))
    leaf = resid.clone().requires_grad_(True)
    with torch.enable_grad():
        (expected_gradient,) = torch.autograd.grad(
            ref.value_trace(reference, 1, leaf, downstream_gradient, detach)[node.index], leaf
        )
    assert relative_error(core.gradient(node).gradient, expected_gradient) < 1e-5


def test_value_trace_sums_to_direct_effect(float64_checkpoint: tuple[Transformer, Any]) -> None:
    model, _ = float64_checkpoint
    downstream = Node(mlp(layer=2), (6, 4))
    core = reconstituter(model)
    traced = core.activations(value_spec(1, downstream))
    gradient = core.gradient(downstream)
    for head in range(model.config.n_heads):
        for attended in range(7):
            writer = Node(attention(layer=1), (6, attended, head))
            effect = core.direct_effect(writer, gradient)
            assert effect is not None
            assert float(traced[6, attended, head]) == pytest.approx(effect, rel=1e-9, abs=1e-15)


def test_value_trace_jvp_matches_stacked_gradients(float64_checkpoint: tuple[Transformer, Any]) -> None:
    model, _ = float64_checkpoint
    spec = value_spec(0, Node(mlp(layer=1), (5, 2)))
    core = reconstituter(model)
    write = random_write(N, model.config.d_model, seed=5)
    jvp = core.jvp(spec, write, resid_pre(0)).jvp
    for index in [(5, 0, 0), (5, 3, 2), (4, 4, 1), (6, 1, 3)]:
        gradient = core.gradient(Node(spec, index)).gradient
        assert float(jvp[index]) == pytest.approx(float((gradient * write).sum()), rel=1e-9, abs=1e-14)
