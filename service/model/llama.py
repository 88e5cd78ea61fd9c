"""The Llama family: RMSNorm, rotary grouped-query attention and a gated SiLU MLP.

Module and parameter names equal the keys of Hugging Face `LlamaForCausalLM`
checkpoints (`model.layers.0.self_attn.q_proj.weight`, ...), so a checkpoint loads
with `load_state_dict`. Rotary embeddings use the Hugging Face layout: the first and
second halves of each head's dimensions form the rotated pairs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from service.model.base import (
    NO_DETACH,
    AttentionDetach,
    AttentionOutput,
    Block,
    ModelConfig,
    MlpOutput,
    Norm,
    Transformer,
)
from service.model.layers import RMSNorm, causal_attention, detach_qkv


def rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d_q = config.n_heads * config.d_head
        d_kv = config.n_kv_heads * config.d_head
        self.q_proj = nn.Linear(config.d_model, d_q, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.d_model, d_kv, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.d_model, d_kv, bias=config.attention_bias)
        self.o_proj = nn.Linear(d_q, config.d_model, bias=False)

    def rotary(self, n: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """Return cos and sin tables, [n, 1, d_head], for positions 0..n-1."""
        assert self.config.rope_theta is not None, "Llama-family models need rope_theta"
        d_head = self.config.d_head
        exponents = torch.arange(0, d_head, 2, dtype=torch.float32, device=like.device) / d_head
        inverse_frequency = 1.0 / (self.config.rope_theta**exponents)
        positions = torch.arange(n, dtype=torch.float32, device=like.device)
        angles = torch.outer(positions, inverse_frequency)
        angles = torch.cat((angles, angles), dim=-1)[:, None, :]
        return angles.cos().to(like.dtype), angles.sin().to(like.dtype)

    def forward(self, x: Tensor, detach: AttentionDetach = NO_DETACH) -> AttentionOutput:
        n = x.shape[0]
        d_head = self.config.d_head
        query = self.q_proj(x).view(n, self.config.n_heads, d_head)
        key = self.k_proj(x).view(n, self.config.n_kv_heads, d_head)
        value = self.v_proj(x).view(n, self.config.n_kv_heads, d_head)

        cos, sin = self.rotary(n, x)
        query = query * cos + rotate_half(query) * sin
        key = key * cos + rotate_half(key) * sin

        query, key, value = detach_qkv(query, key, value, detach)
        logits, probs, values, mixed = causal_attention(query, key, value)
        out = self.o_proj(mixed.reshape(n, -1))
        return AttentionOutput(logits=logits, probs=probs, values=values, out=out)

    def head_output_weight(self, head: int) -> Tensor:
        d_head = self.config.d_head
        # o_proj.weight: [d_model, n_heads * d_head]; head h owns columns h*d_head:(h+1)*d_head.
        return self.o_proj.weight[:, head * d_head : (head + 1) * d_head].T


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.d_mlp, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.d_mlp, bias=False)
        self.down_proj = nn.Linear(config.d_mlp, config.d_model, bias=False)

    def forward(self, x: Tensor) -> MlpOutput:
        pre = self.gate_proj(x)
        post = F.silu(pre) * self.up_proj(x)
        return MlpOutput(pre=pre, post=post, out=self.down_proj(post))

    def output_weight(self) -> Tensor:
        # down_proj.weight: [d_model, d_mlp]
        return self.down_proj.weight.T


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = LlamaMLP(config)

    @property
    def attention_norm(self) -> Norm:
        return self.input_layernorm

    @property
    def attention(self) -> LlamaAttention:
        return self.self_attn

    @property
    def mlp_norm(self) -> Norm:
        return self.post_attention_layernorm


class LlamaBackbone(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)


class LlamaModel(Transformer):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaBackbone(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def block(self, layer: int) -> Block:
        decoder_layer: LlamaDecoderLayer = self.model.layers[layer]  # type: ignore[assignment]
        return decoder_layer

    def embed(self, token_ids: Tensor) -> Tensor:
        embedded: Tensor = self.model.embed_tokens(token_ids)
        return embedded

    @property
    def final_norm(self) -> Norm:
        return self.model.norm

    def unembed(self, normed: Tensor) -> Tensor:
        logits: Tensor = self.lm_head(normed)
        return logits
