"""Backbone adapters: one per HuggingFace architecture family."""

from __future__ import annotations

from torch import nn

from longmem.backbone.base import AttentionInputs, BackboneAdapter, BackboneOutput
from longmem.backbone.gpt2 import GPT2Adapter
from longmem.backbone.llama import LlamaAdapter
from longmem.errors import LongMemError

ADAPTERS: tuple[type[BackboneAdapter], ...] = (GPT2Adapter, LlamaAdapter)
SUPPORTED = tuple(t for a in ADAPTERS for t in a.model_types)


def adapter_for(model: nn.Module) -> BackboneAdapter:
    """The adapter for a HuggingFace causal LM, or a clear error naming what is supported."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls(model)
    raise LongMemError(f"backbone architecture {model_type!r} is not supported; supported: {', '.join(SUPPORTED)}")


__all__ = ["AttentionInputs", "BackboneAdapter", "BackboneOutput", "adapter_for", "SUPPORTED"]
