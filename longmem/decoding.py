"""Decoders: the next-token logits of a growing sequence with memory, one step at a time.

A decoder owns the local context of a batch of sequences and the memory they read and
write. `prefill(input_ids, attention_mask)` memorizes the prompt's whole segments before its
last tokens (`LongMemForCausalLM.split_prompt`), keeps the rest as local context and returns
the logits for the first new token; `step(tokens)` appends one token per row and returns the
logits for the next. When the local context grows past `segment_length`, its older half is
written into memory and dropped, so the local context always holds 1..segment_length tokens.

`RecomputeDecoder` is the reference: every step runs the backbone and the SideNet over the
whole local context. `IncrementalDecoder` computes the same logits with key/value caches: each
step runs the backbone and the SideNet on the new token only, and the memory-augmented layer
retrieves for that token's query only. `make_decoder` picks one. The generation loop
(sampling, stopping, streaming) lives in `longmem.generation` and drives any decoder.

Both decoders expose `retrieval`: what the memory-augmented layer retrieved for the newest
position (the token whose next-token logits were just returned), a `Retrieval` whose fields are
(B, Hkv, G, k): query head h = j*G + g of row b searched kv head j, at [b, j, g]. None when the
memory held nothing.

Left padding: rows of different prompt lengths are left-padded and given an `attention_mask`
(1 = real token). Padding is never written into memory and never attended to.

Shapes: B rows, N prompt tokens, T local-context tokens, V vocabulary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from longmem.memory import Retrieval
from longmem.runtime import cast_unless_autocast
from longmem.sidenet import SegmentContext, SideNetCache

if TYPE_CHECKING:
    from longmem.memory import MemoryBank
    from longmem.model import LongMemForCausalLM


def newest_position(retrieval: Retrieval | None, T: int) -> Retrieval | None:
    """A forward's retrieval over T tokens, fields (B, Hkv, G*T, k) -> that of its last token, (B, Hkv, G, k)."""
    if retrieval is None:
        return None
    B, Hkv, Q, k = retrieval.slots.shape
    last = lambda t: t.view(B, Hkv, Q // T, T, k)[:, :, :, -1]  # (B, Hkv, G, k); query (g, t) is at g*T + t
    return Retrieval(last(retrieval.slots), last(retrieval.valid), last(retrieval.scores))


class Decoder(Protocol):
    memory: "MemoryBank"
    retrieval: Retrieval | None  # the newest position's retrieval, fields (B, Hkv, G, k), or None

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, N), attention_mask (B, N) or None -> float32 logits (B, V) for the first new token."""
        ...

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,) appended to every row -> float32 logits (B, V) for the next token."""
        ...


class RecomputeDecoder:
    """The reference decoder: re-runs the model over the whole local context for every token."""

    def __init__(self, model: "LongMemForCausalLM", memory: "MemoryBank"):
        self.model = model
        self.memory = memory
        self.ctx: torch.Tensor | None = None   # (B, T) local context
        self.mask: torch.Tensor | None = None  # (B, T) 0/1, or None when no row is padded
        self.retrieval: Retrieval | None = None

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None
        prefix, _ = self.model.split_prompt(input_ids.shape[1])
        if prefix:
            self.model.memorize(input_ids[:, :prefix], self.memory,
                                None if attention_mask is None else attention_mask[:, :prefix])
        self.ctx = input_ids[:, prefix:]
        self.mask = None if attention_mask is None else attention_mask[:, prefix:]
        return self._logits()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.ctx = torch.cat([self.ctx, tokens.view(-1, 1)], dim=1)
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        seg = self.model.config.segment_length
        if self.ctx.shape[1] > seg:  # the window overflows: its older half goes into memory
            half = seg // 2
            self.model.memorize(self.ctx[:, :half], self.memory, None if self.mask is None else self.mask[:, :half])
            self.ctx = self.ctx[:, half:]
            self.mask = None if self.mask is None else self.mask[:, half:]
        return self._logits()

    def _logits(self) -> torch.Tensor:
        out = self.model(self.ctx, memory=self.memory, attention_mask=self.mask, update_memory=False)
        self.retrieval = newest_position(out.retrieval, self.ctx.shape[1])
        return out.logits[:, -1].float()  # (B, V)


class IncrementalDecoder:
    """The same logits as `RecomputeDecoder`, with key/value caches: one token per step through both networks.

    The backbone keeps its own HuggingFace `DynamicCache`, the SideNet a `SideNetCache`; both cover the
    local context. The prompt's local part and, after every overflow, the kept half are run in one
    forward that rebuilds both caches, so positions restart at 0 exactly as in the reference (and in
    training). The memory is written only by `memorize` (the prompt's prefix, each overflow's older half),
    as in the reference.
    """

    def __init__(self, model: "LongMemForCausalLM", memory: "MemoryBank"):
        self.model = model
        self.memory = memory
        self.ctx: torch.Tensor | None = None   # (B, T) local context: the tokens both caches hold
        self.mask: torch.Tensor | None = None  # (B, T) 0/1, or None when no row is padded
        self.retrieval: Retrieval | None = None
        self._backbone_cache = None            # the backbone's HuggingFace DynamicCache over ctx
        self._sidenet_cache = None             # SideNetCache over ctx
        self._next_position: torch.Tensor | None = None  # (B,) position of the next token: real tokens in ctx

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.model._check_memory(self.memory, input_ids.shape[0])
        prefix, _ = self.model.split_prompt(input_ids.shape[1])
        if prefix:
            self.model.memorize(input_ids[:, :prefix], self.memory,
                                None if attention_mask is None else attention_mask[:, :prefix])
        self.ctx = input_ids[:, prefix:]
        self.mask = None if attention_mask is None else attention_mask[:, prefix:]
        return self._rebuild()

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        B = self.ctx.shape[0]
        tokens = tokens.view(B, 1)
        self.ctx = torch.cat([self.ctx, tokens], dim=1)
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(B, 1)], dim=1)
        seg = self.model.config.segment_length
        if self.ctx.shape[1] > seg:  # the window overflows: its older half goes into memory, as in the reference
            half = seg // 2
            self.model.memorize(self.ctx[:, :half], self.memory, None if self.mask is None else self.mask[:, :half])
            self.ctx = self.ctx[:, half:]
            self.mask = None if self.mask is None else self.mask[:, half:]
            return self._rebuild()
        position_ids = self._next_position.view(B, 1)
        key_mask = None if self.mask is None else self.mask.bool()[:, None, None, :]  # (B, 1, 1, T) keys
        logits = self._forward(tokens, position_ids, key_mask)
        self._next_position = self._next_position + 1
        return logits

    def _rebuild(self) -> torch.Tensor:
        """One forward over the whole local context into fresh caches -> logits (B, V) for the next token."""
        from longmem.model import causal_padding_mask, position_ids_from_mask

        if self.mask is not None and bool(self.mask.all()):
            self.mask = None
        B, T = self.ctx.shape
        c = self.model.config
        self._backbone_cache = self.model.adapter.new_cache()
        self._sidenet_cache = SideNetCache(c.sidenet_layers, c.segment_length)
        if self.mask is None:
            position_ids = torch.arange(T, device=self.ctx.device).expand(B, T)
            self._next_position = torch.full((B,), T, dtype=torch.long, device=self.ctx.device)
        else:
            position_ids = position_ids_from_mask(self.mask)
            self._next_position = self.mask.long().sum(dim=1)
        attn_mask = None if self.mask is None else causal_padding_mask(self.mask)  # (B, 1, T, T)
        return self._forward(self.ctx, position_ids, attn_mask)

    def _forward(self, input_ids, position_ids, attn_mask) -> torch.Tensor:
        """input_ids, position_ids (B, T): new tokens after the cached ones (T = 1 in a step) -> float32 (B, V).

        `LongMemForCausalLM.forward` with both caches and update_memory=False, for the last token's logits."""
        m = self.model
        bb = m.adapter.run(input_ids, self.mask, position_ids, m.config.memory_layer, cache=self._backbone_cache)
        ctx = SegmentContext(positions=m.adapter.positions(bb.hidden_states[0], position_ids), attn_mask=attn_mask,
                             memory=self.memory, cache=self._sidenet_cache)
        hidden, retrieval = m.sidenet(bb.hidden_states, ctx)  # (B, T, d)
        self.retrieval = newest_position(retrieval, input_ids.shape[1])
        head = m.adapter.lm_head
        return head(cast_unless_autocast(hidden[:, -1], head.weight.dtype)).float()  # (B, V)


def make_decoder(model: "LongMemForCausalLM", memory: "MemoryBank", incremental: bool = True) -> Decoder:
    """The decoder `generate` drives: `IncrementalDecoder` (default) or the reference `RecomputeDecoder`."""
    return IncrementalDecoder(model, memory) if incremental else RecomputeDecoder(model, memory)
