"""Normalization and attention math shared by the model families."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from service.model.base import AttentionDetach


def upcast(x: Tensor) -> Tensor:
    """Return x in at least float32, so half-precision models keep accurate statistics."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class RMSNorm(nn.Module):
    """Root-mean-square normalization with a learned gain (`weight`)."""

    def __init__(self, d_model: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.eps = eps

    def forward(self, x: Tensor, detach_scale: bool = False) -> Tensor:
        x32 = upcast(x)
        scale = torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if detach_scale:
            scale = scale.detach()
        return self.weight * (x32 * scale).to(x.dtype)


class LayerNorm(nn.Module):
    """Layer normalization with a learned gain (`weight`) and bias (`bias`)."""

    def __init__(self, d_model: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model))
        self.eps = eps

    def forward(self, x: Tensor, detach_scale: bool = False) -> Tensor:
        x32 = upcast(x)
        centered = x32 - x32.mean(dim=-1, keepdim=True)
        scale = torch.rsqrt(centered.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if detach_scale:
            scale = scale.detach()
        return (centered * scale).to(x.dtype) * self.weight + self.bias


def detach_qkv(query: Tensor, key: Tensor, value: Tensor, detach: AttentionDetach) -> tuple[Tensor, Tensor, Tensor]:
    return (
        query.detach() if detach.query else query,
        key.detach() if detach.key else key,
        value.detach() if detach.value else value,
    )


def causal_attention(query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Compute scaled causal attention for one prompt.

    query: [n, n_heads, d_head]; key, value: [n, n_kv_heads, d_head]. Query head h reads
    key/value head h // (n_heads // n_kv_heads), the grouped-query convention.
    Returns logits and probs [n_query, n_key, n_heads], the per-query-head values
    [n_key, n_heads, d_head] and the mixed values [n_query, n_heads, d_head].
    """
    n, n_heads, d_head = query.shape
    group_size = n_heads // key.shape[1]
    key = key.repeat_interleave(group_size, dim=1)
    value = value.repeat_interleave(group_size, dim=1)

    logits = torch.einsum("qhd,khd->qkh", query, key) / (d_head**0.5)
    future = torch.ones(n, n, dtype=torch.bool, device=query.device).triu(diagonal=1)
    logits = logits.masked_fill(future[:, :, None], float("-inf"))
    probs = torch.softmax(upcast(logits), dim=1).to(value.dtype)
    mixed = torch.einsum("qkh,khd->qhd", probs, value)
    return logits, probs, value, mixed
