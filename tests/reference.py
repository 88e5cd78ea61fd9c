"""Oracles built from `transformers` modules, independent of the service's model code.

Each function recomputes one layer's activations from a residual tensor with the
reference model's own submodules (its norms, projections, rotary embedding and
activation functions), so autograd through it is an independent check of the
service's gradients. Shapes are for one prompt: residuals are [n, d_model].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def is_llama(reference: Any) -> bool:
    return reference.config.model_type == "llama"


def layer_module(reference: Any, layer: int) -> Any:
    return reference.model.layers[layer] if is_llama(reference) else reference.transformer.h[layer]


def detached_scale_norm(norm: Any, reference: Any) -> Callable[[Tensor], Tensor]:
    """Return the norm with its 1/rms (or 1/std) scale treated as a constant, written out by hand."""
    eps = norm.variance_epsilon if is_llama(reference) else norm.eps

    def apply(x: Tensor) -> Tensor:
        if is_llama(reference):
            scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps).detach()
            return norm.weight * (x * scale)
        centered = x - x.mean(-1, keepdim=True)
        scale = torch.rsqrt(centered.pow(2).mean(-1, keepdim=True) + eps).detach()
        return centered * scale * norm.weight + norm.bias

    return apply


def norm_function(norm: Any, reference: Any, detach_scale: bool) -> Callable[[Tensor], Tensor]:
    if detach_scale:
        return detached_scale_norm(norm, reference)
    return lambda x: norm(x)  # noqa: PLW0108 - the module is called for its forward


def mlp_activations(reference: Any, layer: int, resid_mid: Tensor, detach_scale: bool = False) -> tuple[Tensor, Tensor]:
    """Return (pre, post), each [n, d_mlp]."""
    block = layer_module(reference, layer)
    if is_llama(reference):
        normed = norm_function(block.post_attention_layernorm, reference, detach_scale)(resid_mid)
        pre = block.mlp.gate_proj(normed)
        post = block.mlp.act_fn(pre) * block.mlp.up_proj(normed)
        return pre, post
    normed = norm_function(block.ln_2, reference, detach_scale)(resid_mid)
    pre = block.mlp.c_fc(normed)
    return pre, block.mlp.act(pre)


def mlp_output_rows(reference: Any, layer: int) -> Tensor:
    """Return [d_mlp, d_model]: row i is what neuron i writes per unit of post-activation."""
    block = layer_module(reference, layer)
    if is_llama(reference):
        return block.mlp.down_proj.weight.T
    return block.mlp.c_proj.weight


def query_key_value(reference: Any, layer: int, resid_pre: Tensor, detach_scale: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Return query, key and value, each [n_heads, n, d_head], key and value repeated per query head."""
    block = layer_module(reference, layer)
    config = reference.config
    n = resid_pre.shape[0]
    if is_llama(reference):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

        attention = block.self_attn
        normed = norm_function(block.input_layernorm, reference, detach_scale)(resid_pre)[None]
        d_head = attention.head_dim
        query = attention.q_proj(normed).view(1, n, -1, d_head).transpose(1, 2)
        key = attention.k_proj(normed).view(1, n, -1, d_head).transpose(1, 2)
        value = attention.v_proj(normed).view(1, n, -1, d_head).transpose(1, 2)
        cos, sin = reference.model.rotary_emb(normed, torch.arange(n)[None])
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        groups = config.num_attention_heads // config.num_key_value_heads
        return query[0], repeat_kv(key, groups)[0], repeat_kv(value, groups)[0]

    normed = norm_function(block.ln_1, reference, detach_scale)(resid_pre)
    query, key, value = block.attn.c_attn(normed).split(config.n_embd, dim=-1)
    n_heads = config.n_head

    def heads(x: Tensor) -> Tensor:
        return x.view(n, n_heads, -1).transpose(0, 1)

    return heads(query), heads(key), heads(value)


def attention_activations(
    reference: Any,
    layer: int,
    resid_pre: Tensor,
    detach_scale: bool = False,
    detach_query: bool = False,
    detach_key: bool = False,
) -> tuple[Tensor, Tensor]:
    """Return (logits, probs), each [n_query, n_key, n_heads], logits -inf where masked."""
    query, key, _ = query_key_value(reference, layer, resid_pre, detach_scale)
    if detach_query:
        query = query.detach()
    if detach_key:
        key = key.detach()
    d_head = query.shape[-1]
    logits = query @ key.transpose(-1, -2) / d_head**0.5  # [n_heads, n_query, n_key]
    n = logits.shape[-1]
    mask = torch.ones(n, n, dtype=torch.bool).triu(1)
    logits = logits.masked_fill(mask, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return logits.permute(1, 2, 0), probs.permute(1, 2, 0)


def head_output_matrix(reference: Any, layer: int, head: int) -> Tensor:
    """Return [d_head, d_model], the output map of one head."""
    block = layer_module(reference, layer)
    if is_llama(reference):
        d_head = block.self_attn.head_dim
        return block.self_attn.o_proj.weight[:, head * d_head : (head + 1) * d_head].T
    d_head = reference.config.n_embd // reference.config.n_head
    return block.attn.c_proj.weight[head * d_head : (head + 1) * d_head]


def head_write(reference: Any, layer: int, resid_pre: Tensor, token: int, attended: int, head: int) -> Tensor:
    """Return [n, d_model], head `head`'s write through (token, attended), zero at other tokens."""
    _, probs = attention_activations(reference, layer, resid_pre)
    _, _, value = query_key_value(reference, layer, resid_pre)
    direction = probs[token, attended, head] * value[head, attended] @ head_output_matrix(reference, layer, head)
    write = torch.zeros_like(resid_pre)
    write[token] = direction
    return write


def value_trace(
    reference: Any, layer: int, resid_pre: Tensor, downstream_gradient: Tensor, detach_scale: bool = False
) -> Tensor:
    """Return [n_query, n_key, n_heads]: each head's write at (t, s) dotted with the gradient at t.

    Query and key are detached, so derivatives reach the residual through the values only.
    """
    _, probs = attention_activations(reference, layer, resid_pre.detach(), detach_scale)
    _, _, value = query_key_value(reference, layer, resid_pre, detach_scale)
    n_heads = value.shape[0]
    columns = []
    for head in range(n_heads):
        # [n_key, d_model] write direction of each key's value, then dotted with each query's gradient
        writes = value[head] @ head_output_matrix(reference, layer, head)
        columns.append(probs[:, :, head] * (downstream_gradient @ writes.T))
    return torch.stack(columns, dim=-1)


def final_logits(reference: Any, resid_final: Tensor, detach_scale: bool = False) -> Tensor:
    if is_llama(reference):
        norm = reference.model.norm
    else:
        norm = reference.transformer.ln_f
    return reference.lm_head(norm_function(norm, reference, detach_scale)(resid_final))


class Hooked:
    """Residuals and block outputs hooked out of one full forward pass of the reference model."""

    def __init__(self, reference: Any, token_ids: list[int]) -> None:
        self.resid_mid: dict[int, Tensor] = {}
        self.mlp_out: dict[int, Tensor] = {}
        self.attention_out: dict[int, Tensor] = {}
        self.mlp_pre: dict[int, Tensor] = {}
        self.mlp_post: dict[int, Tensor] = {}
        handles = []
        n_layers = reference.config.num_hidden_layers
        for layer in range(n_layers):
            block = layer_module(reference, layer)
            if is_llama(reference):
                second_norm, mlp, attention = block.post_attention_layernorm, block.mlp, block.self_attn
                pre_module, post_module = mlp.gate_proj, mlp.down_proj
            else:
                second_norm, mlp, attention = block.ln_2, block.mlp, block.attn
                pre_module, post_module = mlp.c_fc, mlp.c_proj
            handles.append(second_norm.register_forward_pre_hook(self._store_input(self.resid_mid, layer)))
            handles.append(mlp.register_forward_hook(self._store_output(self.mlp_out, layer)))
            handles.append(attention.register_forward_hook(self._store_output(self.attention_out, layer)))
            handles.append(pre_module.register_forward_hook(self._store_output(self.mlp_pre, layer)))
            handles.append(post_module.register_forward_pre_hook(self._store_input(self.mlp_post, layer)))
        final_norm = reference.model.norm if is_llama(reference) else reference.transformer.ln_f
        final: dict[int, Tensor] = {}
        handles.append(final_norm.register_forward_pre_hook(self._store_input(final, 0)))
        try:
            with torch.no_grad():
                output = reference(torch.tensor([token_ids]), output_hidden_states=True, output_attentions=True)
        finally:
            for handle in handles:
                handle.remove()
        self.resid_pre = {layer: output.hidden_states[layer][0] for layer in range(n_layers)}
        self.resid_final = final[0]
        self.logits = output.logits[0]
        # transformers returns attention probabilities [batch, heads, query, key]
        self.attention_probs = {layer: output.attentions[layer][0].permute(1, 2, 0) for layer in range(n_layers)}

    @staticmethod
    def _store_input(store: dict[int, Tensor], key: int) -> Callable[..., None]:
        def hook(module: Any, inputs: tuple[Tensor, ...]) -> None:
            store[key] = inputs[0][0].detach()

        return hook

    @staticmethod
    def _store_output(store: dict[int, Tensor], key: int) -> Callable[..., None]:
        def hook(module: Any, inputs: Any, output: Any) -> None:
            tensor = output[0] if isinstance(output, tuple) else output
            store[key] = tensor[0].detach()

        return hook
