"""The backbone adapter interface: what LongMem needs from a frozen HuggingFace causal LM.

An adapter does two jobs, both through seams HuggingFace supports (no monkeypatching):

1. `run`: one no-grad forward of the frozen backbone returning the per-layer hidden states
   H[0..L] (`output_hidden_states=True`) and the memory layer's per-head keys and values
   *after projection and before any rotary embedding*, captured by forward hooks on the
   projection modules.
2. Block anatomy: the pieces of one decoder block (attention inputs, position scheme,
   output projection, MLP) so that a SideNet layer, which starts as a copy of a backbone
   block, can run it with its own attention (joint local + memory attention).

Shapes: B batch, T tokens, d model width, Hq query heads, Hkv key/value heads, D head dim.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class BackboneOutput:
    hidden_states: tuple[torch.Tensor, ...]
    """L+1 tensors (B, T, d): H[j] is the input of block j; H[L] is the final-normed output."""
    memory_keys: torch.Tensor
    """(B, T, Hkv, D) keys of the memory layer, pre-rotary."""
    memory_values: torch.Tensor
    """(B, T, Hkv, D) values of the memory layer."""


@dataclass
class AttentionInputs:
    q: torch.Tensor  # (B, Hq, T, D), pre-rotary
    k: torch.Tensor  # (B, Hkv, T, D), pre-rotary
    v: torch.Tensor  # (B, Hkv, T, D)


class BackboneAdapter(ABC):
    """Wraps a HuggingFace causal LM of one architecture family."""

    model_types: tuple[str, ...] = ()

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # ---- dimensions ---------------------------------------------------------------
    @property
    @abstractmethod
    def blocks(self) -> nn.ModuleList: ...

    @property
    @abstractmethod
    def final_norm(self) -> nn.Module: ...

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    @abstractmethod
    def num_heads(self) -> int: ...

    @property
    @abstractmethod
    def num_kv_heads(self) -> int: ...

    @property
    @abstractmethod
    def head_dim(self) -> int: ...

    # ---- frozen forward with key/value capture -----------------------------------
    @abstractmethod
    def kv_hooks(self, layer: int, sink: dict) -> list[torch.utils.hooks.RemovableHandle]:
        """Register forward hooks that put (B, T, Hkv, D) tensors in sink['k'] and sink['v']."""

    @torch.no_grad()
    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
            position_ids: torch.Tensor, memory_layer: int, cache: Any = None) -> BackboneOutput:
        """input_ids, position_ids (B, T); attention_mask (B, T) 0/1 or None (no padding).

        cache: the backbone's key/value cache (`new_cache`) holding P earlier tokens, or None (no cache).
        These T tokens attend to the cached ones and are appended to it; attention_mask, when given, then
        covers the cached and the new tokens, (B, P + T). Hidden states and captured keys/values cover the
        new tokens only.
        """
        sink: dict[str, torch.Tensor] = {}
        handles = self.kv_hooks(memory_layer, sink)
        cache_args = {} if cache is None else {self._cache_argument: cache}
        try:
            # the base model (no LM head): the backbone's logits are never needed
            out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                        position_ids=position_ids, output_hidden_states=True,
                                        use_cache=cache is not None, **cache_args)
        finally:
            for h in handles:
                h.remove()
        assert len(out.hidden_states) == self.num_layers + 1
        return BackboneOutput(tuple(out.hidden_states), sink["k"], sink["v"])

    def new_cache(self) -> Any:
        """An empty HuggingFace `DynamicCache` for this backbone, to pass to `run`."""
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.config)  # per-layer kinds (e.g. sliding window) from the config
        except TypeError:  # transformers < 4.56 takes no config
            return DynamicCache()

    @functools.cached_property
    def _cache_argument(self) -> str:
        """The base model's name for the cache argument: `cache` from transformers 5.24, else `past_key_values`."""
        params = inspect.signature(self.model.base_model.forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    # ---- block anatomy (used on the SideNet's copies of backbone blocks) ------------
    @abstractmethod
    def attention_inputs(self, block: nn.Module, x: torch.Tensor) -> AttentionInputs:
        """x: (B, T, d) residual stream -> pre-norm, projected, split into heads."""

    def positions(self, x: torch.Tensor, position_ids: torch.Tensor) -> Any:
        """Whatever `apply_positions` needs for this segment (computed once, shared by all layers)."""
        return None

    def apply_positions(self, q: torch.Tensor, k: torch.Tensor, positions: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The backbone's position scheme inside attention (identity for additive embeddings)."""
        return q, k

    @abstractmethod
    def attention_output(self, block: nn.Module, a: torch.Tensor) -> torch.Tensor:
        """a: (B, T, Hq*D) -> (B, T, d) through the output projection."""

    @abstractmethod
    def mlp_residual(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x + MLP(norm(x)): the second half of a pre-norm block."""

    @abstractmethod
    def attention_dropout(self, block: nn.Module) -> float: ...

    # ---- identity -------------------------------------------------------------
    def fingerprint(self) -> str:
        """A short hash of the architecture and the weights (a strided sample of every tensor).

        Tells a checkpoint or a saved memory which backbone it was built for; two different
        trainings of the same architecture get different fingerprints.
        """
        h = hashlib.sha256()
        h.update(self.config.model_type.encode())
        for name, p in sorted(self.model.state_dict().items()):
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)][:4096].float().cpu()
            h.update(name.encode())
            h.update(str(tuple(p.shape)).encode())
            h.update(sample.numpy().tobytes())
        return h.hexdigest()[:16]
