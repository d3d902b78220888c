"""GPT-2 family: learned absolute positions (added to H[0]), fused q/k/v projection `c_attn`."""

from __future__ import annotations

import torch
from torch import nn

from longmem.backbone.base import AttentionInputs, BackboneAdapter
from longmem.errors import LongMemError


class GPT2Adapter(BackboneAdapter):
    model_types = ("gpt2",)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        c = self.config
        if not c.scale_attn_weights or c.scale_attn_by_inverse_layer_idx or c.add_cross_attention:
            raise LongMemError("this GPT-2 variant (unscaled, layer-scaled or cross attention) is not supported; "
                               "use a standard GPT-2 configuration")

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.transformer.h

    @property
    def final_norm(self) -> nn.Module:
        return self.model.transformer.ln_f

    @property
    def num_heads(self) -> int:
        return self.config.n_head

    @property
    def num_kv_heads(self) -> int:
        return self.config.n_head

    @property
    def head_dim(self) -> int:
        return self.config.n_embd // self.config.n_head

    def _split(self, fused: torch.Tensor) -> list[torch.Tensor]:
        B, T, _ = fused.shape
        return [t.view(B, T, self.num_heads, self.head_dim) for t in fused.split(self.config.n_embd, dim=2)]  # (B, T, H, D)

    def kv_hooks(self, layer, sink):
        def hook(_module, _inputs, output):  # output: (B, T, 3d)
            _, sink["k"], sink["v"] = self._split(output)
        return [self.blocks[layer].attn.c_attn.register_forward_hook(hook)]

    def attention_inputs(self, block, x):
        q, k, v = self._split(block.attn.c_attn(block.ln_1(x)))  # each (B, T, H, D)
        return AttentionInputs(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H, T, D)

    def attention_output(self, block, a):
        return block.attn.resid_dropout(block.attn.c_proj(a))

    def mlp_residual(self, block, x):
        return x + block.mlp(block.ln_2(x))

    def attention_dropout(self, block):
        return block.attn.attn_dropout.p
