"""Llama family (Llama, Mistral, Qwen2): RoPE, separate q/k/v projections, grouped-query attention.

The memory stores keys as they leave `k_proj`, before the rotary embedding: LongMem's rule
that memory carries no positions. Local attention in the SideNet applies the backbone's own
rotary embedding (its `rotary_emb` module, so any rope scaling it was trained with applies).
"""

from __future__ import annotations

import torch
from torch import nn

from longmem.backbone.base import AttentionInputs, BackboneAdapter


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LlamaAdapter(BackboneAdapter):
    model_types = ("llama", "mistral", "qwen2")

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.model.layers

    @property
    def final_norm(self) -> nn.Module:
        return self.model.model.norm

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return self.config.num_key_value_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.num_heads

    def kv_hooks(self, layer, sink):
        attn = self.blocks[layer].self_attn

        def capture(name):
            def hook(_module, _inputs, output):  # output: (B, T, Hkv*D)
                sink[name] = output.view(*output.shape[:2], self.num_kv_heads, self.head_dim)  # (B, T, Hkv, D)
            return hook
        return [attn.k_proj.register_forward_hook(capture("k")), attn.v_proj.register_forward_hook(capture("v"))]

    def attention_inputs(self, block, x):
        B, T, _ = x.shape
        h = block.input_layernorm(x)
        attn = block.self_attn
        q = attn.q_proj(h).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)     # (B, Hq, T, D)
        k = attn.k_proj(h).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = attn.v_proj(h).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        return AttentionInputs(q, k, v)

    def positions(self, x, position_ids):
        return self.model.model.rotary_emb(x, position_ids)  # cos, sin: (B, T, D)

    def apply_positions(self, q, k, positions):
        cos, sin = (t.unsqueeze(1) for t in positions)  # (B, 1, T, D)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

    def attention_output(self, block, a):
        return block.self_attn.o_proj(a)

    def mlp_residual(self, block, x):
        return x + block.mlp(block.post_attention_layernorm(x))

    def attention_dropout(self, block):
        return float(block.self_attn.attention_dropout)
