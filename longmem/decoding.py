"""Decoders: the next-token logits of a growing sequence with memory, one step at a time.

A decoder owns the local context of a batch of sequences and the memory they read and
write. `prefill(input_ids, attention_mask)` memorizes the prompt's whole segments before its
last tokens (`LongMemForCausalLM.split_prompt`), keeps the rest as local context and returns
the logits for the first new token; `step(tokens)` appends one token per row and returns the
logits for the next. When the local context grows past `segment_length`, its older half is
written into memory and dropped, so the local context always holds 1..segment_length tokens.

`RecomputeDecoder` is the reference: every step runs the backbone and the SideNet over the
whole local context. The generation loop (sampling, stopping, streaming) lives in
`longmem.generation` and drives any decoder.

Left padding: rows of different prompt lengths are left-padded and given an `attention_mask`
(1 = real token). Padding is never written into memory and never attended to.

Shapes: B rows, N prompt tokens, T local-context tokens, V vocabulary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from longmem.memory import MemoryBank
    from longmem.model import LongMemForCausalLM


class Decoder(Protocol):
    memory: "MemoryBank"

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
        return out.logits[:, -1].float()  # (B, V)


def make_decoder(model, memory, incremental: bool = True):  # TEMP: the decode branch's version replaces this at merge
    return RecomputeDecoder(model, memory)
