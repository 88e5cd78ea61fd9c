"""The GPT-2 family: LayerNorm, learned positions, fused QKV attention and a GELU MLP.

Module and parameter names equal the keys of Hugging Face `GPT2LMHeadModel`
checkpoints (`transformer.h.0.attn.c_attn.weight`, ...). The projections are stored as
GPT-2's `Conv1D` stores them, [d_in, d_out], so `x @ weight + bias` applies them.
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
from service.model.layers import LayerNorm, causal_attention, detach_qkv


class Conv1D(nn.Module):
    """An affine map with its weight stored [d_in, d_out]."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_in, d_out))
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight + self.bias


class GPT2Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.c_attn = Conv1D(config.d_model, 3 * config.n_heads * config.d_head)
        self.c_proj = Conv1D(config.n_heads * config.d_head, config.d_model)

    def forward(self, x: Tensor, detach: AttentionDetach = NO_DETACH) -> AttentionOutput:
        n = x.shape[0]
        shape = (n, self.config.n_heads, self.config.d_head)
        query, key, value = (part.view(shape) for part in self.c_attn(x).chunk(3, dim=-1))
        query, key, value = detach_qkv(query, key, value, detach)
        logits, probs, values, mixed = causal_attention(query, key, value)
        out = self.c_proj(mixed.reshape(n, -1))
        return AttentionOutput(logits=logits, probs=probs, values=values, out=out)

    def head_output_weight(self, head: int) -> Tensor:
        d_head = self.config.d_head
        # c_proj.weight: [n_heads * d_head, d_model]; head h owns rows h*d_head:(h+1)*d_head.
        return self.c_proj.weight[head * d_head : (head + 1) * d_head]


class GPT2MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = Conv1D(config.d_model, config.d_mlp)
        self.c_proj = Conv1D(config.d_mlp, config.d_model)

    def forward(self, x: Tensor) -> MlpOutput:
        pre = self.c_fc(x)
        post = F.gelu(pre, approximate="tanh")
        return MlpOutput(pre=pre, post=post, out=self.c_proj(post))

    def output_weight(self) -> Tensor:
        return self.c_proj.weight


class GPT2Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.d_model, config.norm_eps)
        self.attn = GPT2Attention(config)
        self.ln_2 = LayerNorm(config.d_model, config.norm_eps)
        self.mlp = GPT2MLP(config)

    @property
    def attention_norm(self) -> Norm:
        return self.ln_1

    @property
    def attention(self) -> GPT2Attention:
        return self.attn

    @property
    def mlp_norm(self) -> Norm:
        return self.ln_2


class GPT2Backbone(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.max_positions, config.d_model)
        self.h = nn.ModuleList(GPT2Block(config) for _ in range(config.n_layers))
        self.ln_f = LayerNorm(config.d_model, config.norm_eps)


class GPT2Model(Transformer):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = GPT2Backbone(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def block(self, layer: int) -> Block:
        gpt2_block: GPT2Block = self.transformer.h[layer]  # type: ignore[assignment]
        return gpt2_block

    def embed(self, token_ids: Tensor) -> Tensor:
        positions = torch.arange(token_ids.shape[0], device=token_ids.device)
        embedded: Tensor = self.transformer.wte(token_ids) + self.transformer.wpe(positions)
        return embedded

    @property
    def final_norm(self) -> Norm:
        return self.transformer.ln_f

    def unembed(self, normed: Tensor) -> Tensor:
        logits: Tensor = self.lm_head(normed)
        return logits
