"""Decoders: the next-token logits of a growing sequence with memory, one step at a time.

A decoder owns the local context of a batch of sequences and the memory they read and
write. `prefill(input_ids, attention_mask)` memorizes each prompt's whole segments before its
last tokens (`LongMemForCausalLM.split_prompt` of the row's own length), keeps the rest as local
context and returns the logits for the first new token; `step(tokens)` appends one token per row
and returns the logits for the next. When a row's local context grows past `segment_length`, its
older half is written into that row's memory and dropped, so every row's local context always
holds 1..segment_length tokens.

Rows are independent: rows of different prompt lengths are left-padded and given an
`attention_mask` (1 = real token), and each row is split, memorized, overflows and is decoded
exactly as it would be alone in a batch of one (up to float rounding). Padding is never written
into memory and never attended to.

`RecomputeDecoder` is the reference: every step runs the backbone and the SideNet over the
whole local context. `IncrementalDecoder` computes the same logits with key/value caches: each
step runs the backbone and the SideNet on the new token only, and the memory-augmented layer
retrieves for that token's query only. `make_decoder` picks one. The generation loop
(sampling, stopping, streaming) lives in `longmem.generation` and drives any decoder.

Both decoders expose `retrieval`: what the memory-augmented layer retrieved for the newest
position (the token whose next-token logits were just returned), a `Retrieval` whose fields are
(B, Hkv, G, k): query head h = j*G + g of row b searched kv head j, at [b, j, g]. None when the
memory held nothing.

Shapes: B rows, N prompt tokens, P memorized prompt-prefix tokens, T local-context tokens, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from longmem.errors import LongMemError
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


def prompt_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The (B, N) int64 0/1 mask of a left-padded prompt (all ones when None), checked."""
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.long)
    if attention_mask.shape != input_ids.shape:
        raise LongMemError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids "
                           f"{tuple(input_ids.shape)}; pass the mask the tokenizer returned with the ids")
    mask = attention_mask.to(input_ids.device, torch.long)
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise LongMemError("attention_mask is not left padding (a 0 after a 1 in a row); "
                           "pad prompts on the left (tokenizer.padding_side = 'left')")
    return mask


@dataclass
class Window:
    """The local contexts of B rows, left-padded: row b's n_b real tokens (1..segment_length between steps)
    are its last n_b columns; column 0 holds a real token of some row."""
    ids: torch.Tensor   # (B, T), T = max n_b
    mask: torch.Tensor  # (B, T) int64 0/1, 1 = real token

    @classmethod
    def prefill(cls, model: "LongMemForCausalLM", memory: "MemoryBank", input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None) -> "Window":
        """Memorize every row's prompt prefix, split by its own length, and return the rows' local contexts.

        The prefixes go through one `memorize` as a right-padded (B, P) matrix, so row b's segments start at
        its first real token, as they would alone (right padding leaves the real tokens' keys/values exact)."""
        N = input_ids.shape[1]
        mask = prompt_mask(input_ids, attention_mask)
        n = mask.sum(dim=1)                                                        # (B,) real tokens per row
        prefix = torch.tensor([model.split_prompt(int(x))[0] for x in n.tolist()], device=n.device)  # (B,)
        P = int(prefix.max())
        if P:
            cols = torch.arange(P, device=n.device)                                # (P,)
            src = ((N - n)[:, None] + cols).clamp(max=N - 1)                       # (B, P) prefix columns in input
            model.memorize(input_ids.gather(1, src), memory, (cols < prefix[:, None]).long())  # right-padded
        local = n - prefix                                                         # (B,) 1..segment_length
        T = int(local.max())
        cols = torch.arange(T, device=n.device)                                    # (T,)
        return cls(input_ids[:, N - T:], (cols >= T - local[:, None]).long())      # (B, T) each, left-padded

    @property
    def attention_mask(self) -> torch.Tensor | None:
        """mask, or None when no row is padded."""
        return None if bool(self.mask.all()) else self.mask

    def append(self, tokens: torch.Tensor) -> "Window":
        """tokens (B,) or (B, 1), one real token per row -> the window (B, T + 1)."""
        B = self.ids.shape[0]
        return Window(torch.cat([self.ids, tokens.view(B, 1)], dim=1),
                      torch.cat([self.mask, self.mask.new_ones(B, 1)], dim=1))

    def spill(self, model: "LongMemForCausalLM", memory: "MemoryBank") -> "Window | None":
        """Every row holding more than segment_length tokens writes its older half into its memory (one
        `memorize` for all of them, the other rows masked out) and drops it -> the new window, re-left-padded;
        None when no row overflows."""
        seg = model.config.segment_length
        half = seg // 2
        over = self.mask.sum(dim=1) > seg  # (B,); such a row holds seg + 1 tokens: all T = seg + 1 columns
        if not bool(over.any()):
            return None
        older = over[:, None].expand(-1, half).long()       # (B, half) 1 on the overflowing rows' older half
        model.memorize(self.ids[:, :half], memory, older)
        mask = self.mask.clone()
        mask[:, :half] -= older                              # (B, T) the older halves are now padding
        first = int(mask.any(dim=0).long().argmax())        # the first column holding a real token
        return Window(self.ids[:, first:], mask[:, first:])  # (B, T - first) each


class Decoder(Protocol):
    memory: "MemoryBank"
    retrieval: Retrieval | None  # the newest position's retrieval, fields (B, Hkv, G, k), or None

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, N) left-padded, attention_mask (B, N) or None -> float32 logits (B, V) for the first new
        token."""
        ...

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,) appended to every row -> float32 logits (B, V) for the next token."""
        ...


class RecomputeDecoder:
    """The reference decoder: re-runs the model over the whole local context for every token."""

    def __init__(self, model: "LongMemForCausalLM", memory: "MemoryBank"):
        self.model = model
        self.memory = memory
        self.window: Window | None = None  # the rows' local contexts
        self.retrieval: Retrieval | None = None

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.window = Window.prefill(self.model, self.memory, input_ids, attention_mask)
        return self._logits()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.window = self.window.append(tokens)
        self.window = self.window.spill(self.model, self.memory) or self.window
        return self._logits()

    def _logits(self) -> torch.Tensor:
        w = self.window
        out = self.model(w.ids, memory=self.memory, attention_mask=w.attention_mask, update_memory=False)
        self.retrieval = newest_position(out.retrieval, w.ids.shape[1])
        return out.logits[:, -1].float()  # (B, V)


class IncrementalDecoder:
    """The same logits as `RecomputeDecoder`, with key/value caches: one token per step through both networks.

    The backbone keeps its own HuggingFace `DynamicCache`, the SideNet a `SideNetCache`; both cover the
    window (the left-padded local contexts). The prompt's local parts and, after any row overflows, the
    new window are run in one forward that rebuilds both caches, so every row's positions restart at 0
    exactly as in the reference (and in training); the rows that did not overflow are recomputed the same.
    The memory is written only by `memorize` (the prompts' prefixes, each overflow's older half), as in the
    reference.
    """

    def __init__(self, model: "LongMemForCausalLM", memory: "MemoryBank"):
        self.model = model
        self.memory = memory
        self.window: Window | None = None      # the rows' local contexts: the tokens both caches hold
        self.retrieval: Retrieval | None = None
        self._backbone_cache = None            # the backbone's HuggingFace DynamicCache over the window
        self._sidenet_cache = None             # SideNetCache over the window
        self._next_position: torch.Tensor | None = None  # (B,) position of the next token: real tokens per row

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.model._check_memory(self.memory, input_ids.shape[0])
        self.window = Window.prefill(self.model, self.memory, input_ids, attention_mask)
        return self._rebuild()

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        B = self.window.ids.shape[0]
        tokens = tokens.view(B, 1)
        self.window = self.window.append(tokens)
        spilled = self.window.spill(self.model, self.memory)
        if spilled is not None:  # a row overflowed and wrote its older half, as in the reference
            self.window = spilled
            return self._rebuild()
        # between rebuilds the window only gains real columns, so it is padded iff it was at the rebuild
        mask = self.window.attention_mask
        key_mask = None if mask is None else mask.bool()[:, None, None, :]  # (B, 1, 1, T) keys
        logits = self._forward(tokens, self._next_position.view(B, 1), mask, key_mask)
        self._next_position = self._next_position + 1
        return logits

    def _rebuild(self) -> torch.Tensor:
        """One forward over the whole window into fresh caches -> logits (B, V) for the next token."""
        from longmem.model import causal_padding_mask, position_ids_from_mask

        ids, mask = self.window.ids, self.window.attention_mask
        c = self.model.config
        self._backbone_cache = self.model.adapter.new_cache()
        self._sidenet_cache = SideNetCache(c.sidenet_layers, c.segment_length)
        position_ids = position_ids_from_mask(self.window.mask)  # (B, T); 0..T-1 in unpadded rows
        self._next_position = self.window.mask.sum(dim=1)        # (B,)
        attn_mask = None if mask is None else causal_padding_mask(mask)  # (B, 1, T, T)
        return self._forward(ids, position_ids, mask, attn_mask)

    def _forward(self, input_ids, position_ids, mask, attn_mask) -> torch.Tensor:
        """input_ids, position_ids (B, T): new tokens after the cached ones (T = 1 in a step); mask (B, P + T) over
        the cached and new tokens, or None -> float32 (B, V).

        `LongMemForCausalLM.forward` with both caches and update_memory=False, for the last token's logits."""
        m = self.model
        bb = m.adapter.run(input_ids, mask, position_ids, m.config.memory_layer, cache=self._backbone_cache)
        ctx = SegmentContext(positions=m.adapter.positions(bb.hidden_states[0], position_ids), attn_mask=attn_mask,
                             memory=self.memory, cache=self._sidenet_cache)
        hidden, retrieval = m.sidenet(bb.hidden_states, ctx)  # (B, T, d)
        self.retrieval = newest_position(retrieval, input_ids.shape[1])
        head = m.adapter.lm_head
        return head(cast_unless_autocast(hidden[:, -1], head.weight.dtype)).float()  # (B, V)


def make_decoder(model: "LongMemForCausalLM", memory: "MemoryBank", incremental: bool = True) -> Decoder:
    """The decoder `generate` drives: `IncrementalDecoder` (default) or the reference `RecomputeDecoder`."""
    return IncrementalDecoder(model, memory) if incremental else RecomputeDecoder(model, memory)
