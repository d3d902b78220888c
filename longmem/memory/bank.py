"""`MemoryBank`: the long-term memory, one bank per batch row, passed into `forward` like a cache.

Each row holds a FIFO ring of chunks. A chunk is `chunk_size` consecutive tokens of the
memory layer's keys and values; its search key is the mean of its token keys, per
key/value head. Tokens that do not fill a chunk yet wait in a pending buffer (they are not
retrievable until their chunk completes); padding is never written. When a row is full the
oldest chunks are overwritten, so a row always holds exactly its most recent `capacity`
chunked tokens. Storage grows on demand up to capacity, so a short memory costs little.

A row's *stream* is every token written into it since its last reset (padding excluded); the
row counts them (`written`), and its stored chunks are the complete chunks of the stream's
newest `capacity` chunked tokens (`held_span`, the one statement of the eviction rule).

Banks are values: `to`, `offload`, `select`, `stack` and `split` return new banks, so single-sequence
memories can be batched (`MemoryBank.stack([a, b])`) and unbatched (`bank.split()`).

Placement: a bank's storage and index live on `device`. An *offloaded* bank (`compute_device=`, e.g.
storage in CPU memory, pinned, for a model on a GPU) answers for another device: `search` moves the
queries to the bank and its result back, `gather` moves only the retrieved chunks (from a pinned
staging buffer, without blocking), and `write` takes keys/values from anywhere.

The bank owns its retrieval index (`retriever`, longmem.memory.retrieval) and drives it: every
chunk written, every row reset, and a rebuild whenever a bank is derived or loaded. With
`dtype="int8"` keys, values and search keys are stored as int8 with one float16 scale per vector
(longmem.memory.quant) and read back in bfloat16. Each chunk keeps the token ids it was written
with, when given (`write(..., token_ids=)`), so a memory can show what it holds as text.

Shapes: B rows, Hkv key/value heads, S chunk slots, C chunk_size, D head dim, T tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from longmem.config import MEMORY_DTYPES
from longmem.errors import LongMemError
from longmem.io import save_safetensors
from longmem.memory.quant import COMPUTE_DTYPE, SCALE_DTYPE, dequantize, quantize
from longmem.memory.retrieval import ExactRetriever, Retrieval, Retriever, make_retriever

FORMAT = "longmem.memory/3"          # + token ids of the memorized tokens; int8 memories with their scales
PREVIOUS_FORMAT = "longmem.memory/2"  # still read: token ids unknown (-1)
LEGACY_FORMAT = "longmem.memory/1"    # still read: no checksum to verify, `written` rebuilt from the counters
SLOTTED = ("keys", "values", "chunk_keys", "token_ids")      # tensors with a chunk-slot dim (dim 2)
SCALES = ("key_scales", "value_scales", "chunk_key_scales")  # int8 memories only; also slotted
COUNTERS = ("num_chunks", "next_slot", "pending_keys", "pending_values", "pending_token_ids", "num_pending", "written")
NO_TOKEN = -1  # token id stored where `write` was given none


def held_span(written, capacity: int, chunk_size: int):
    """Stream positions [start, end) a row holds retrievable after `written` tokens: the complete chunks, and of
    them the newest `capacity` tokens (the FIFO rule; the bank counts its chunks with it). `written` is an int, or
    a tensor of rows' counts (then start and end are tensors too)."""
    end = written // chunk_size * chunk_size
    return (end - capacity).clamp(min=0) if torch.is_tensor(end) else max(0, end - capacity), end


def checksum(tensors: dict[str, torch.Tensor], header: str) -> str:
    """sha256 of `header` and the tensors' bytes, taken in name order (what `save` stores and `load` verifies)."""
    h = hashlib.sha256(header.encode())
    for name in sorted(tensors):
        h.update(tensors[name].contiguous().view(torch.uint8).numpy())  # logical (C) order; no copy if contiguous
    return h.hexdigest()


def _cat(tensors: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """torch.cat with CPU autocast off (under it, cat refuses float16 tensors: fp16 memories and int8 scales)."""
    with torch.autocast("cpu", enabled=False):
        return torch.cat(tensors, dim)


def _concrete(device: torch.device | str) -> torch.device:
    """"cuda" -> "cuda:N" (the current device), as a model's and a tensor's device are named; others unchanged."""
    device = torch.device(device)
    return torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" and device.index is None \
        else device


def _pad_slots(t: torch.Tensor, slots: int, pin_memory: bool = False) -> torch.Tensor:
    """(B, Hkv, S, ...) -> a new (B, Hkv, slots, ...) tensor (pinned if asked), t's slots first, zero-filled past S."""
    out = torch.zeros(*t.shape[:2], slots, *t.shape[3:], dtype=t.dtype, device=t.device, pin_memory=pin_memory)
    out[:, :, :t.shape[2]] = t
    return out


@dataclass(frozen=True)
class MemorySpec:
    """What a memory must agree on with the model that reads it."""
    num_kv_heads: int
    head_dim: int
    chunk_size: int
    capacity: int            # tokens per row (a multiple of chunk_size)
    dtype: str = "bfloat16"  # storage dtype
    fingerprint: str = ""    # backbone fingerprint + memory layer: who encoded the keys

    def check_compatible(self, other: "MemorySpec") -> None:
        """Raise if a memory written under `other` cannot be read by a model expecting `self`."""
        for name in ("fingerprint", "num_kv_heads", "head_dim", "chunk_size"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                raise LongMemError(f"this memory was written for a different model ({name} {theirs!r}, the model has "
                                   f"{mine!r}); rebuild it with this model's memorize")


class MemoryBank:
    def __init__(self, spec: MemorySpec, batch_size: int, device: torch.device | str = "cpu",
                 retriever: Retriever | str | None = None, compute_device: torch.device | str | None = None,
                 pin_memory: bool = False):
        """`device`: where the storage and the index live. `compute_device` (offloading): the device of the model
        that reads it, where `search` and `gather` return their results (None: `device`, no offloading).
        `pin_memory`: keep the chunk storage in page-locked CPU memory (needs a CPU `device` and CUDA)."""
        if spec.capacity % spec.chunk_size:
            raise LongMemError(f"memory capacity {spec.capacity} must be a multiple of chunk_size {spec.chunk_size}")
        if spec.dtype not in MEMORY_DTYPES:
            raise LongMemError(f"memory dtype {spec.dtype!r} is not one of {', '.join(MEMORY_DTYPES)}")
        device = torch.device(device)
        if pin_memory and (device.type != "cpu" or not torch.cuda.is_available()):
            raise LongMemError(f"pin_memory needs the memory in CPU memory and a CUDA device (memory on {device}, CUDA "
                               f"{'available' if torch.cuda.is_available() else 'not available'}); drop pin_memory")
        self.spec = spec
        self.batch_size = batch_size
        self.offload_to = None if compute_device is None else _concrete(compute_device)  # None: not offloaded
        self.pin_memory = pin_memory
        self.retriever = make_retriever(retriever) if isinstance(retriever, str) else retriever or ExactRetriever()
        self.quantized = spec.dtype == "int8"
        self.dtype = getattr(torch, spec.dtype)                       # storage dtype
        self.compute_dtype = COMPUTE_DTYPE if self.quantized else self.dtype  # what gather and tokens return
        B, H, C, D = batch_size, spec.num_kv_heads, spec.chunk_size, spec.head_dim
        self.max_chunks = spec.capacity // C
        self.keys = torch.empty(B, H, 0, C, D, dtype=self.dtype, device=device)    # (B, Hkv, S, C, D)
        self.values = torch.empty(B, H, 0, C, D, dtype=self.dtype, device=device)  # (B, Hkv, S, C, D)
        self.chunk_keys = torch.empty(B, H, 0, D, dtype=self.dtype, device=device)  # (B, Hkv, S, D)
        self.token_ids = torch.empty(B, 1, 0, C, dtype=torch.int32, device=device)  # (B, 1, S, C), NO_TOKEN if unknown
        if self.quantized:  # one float16 scale per token vector and per chunk key (longmem.memory.quant)
            self.key_scales = torch.empty(B, H, 0, C, dtype=SCALE_DTYPE, device=device)    # (B, Hkv, S, C)
            self.value_scales = torch.empty(B, H, 0, C, dtype=SCALE_DTYPE, device=device)  # (B, Hkv, S, C)
            self.chunk_key_scales = torch.empty(B, H, 0, dtype=SCALE_DTYPE, device=device)  # (B, Hkv, S)
        self.num_chunks = torch.zeros(B, dtype=torch.long, device=device)  # chunks held per row
        self.next_slot = torch.zeros(B, dtype=torch.long, device=device)   # ring write position per row
        # tokens waiting for their chunk to complete, kept unquantised
        self.pending_keys = torch.zeros(B, C, H, D, dtype=self.compute_dtype, device=device)    # (B, C, Hkv, D)
        self.pending_values = torch.zeros(B, C, H, D, dtype=self.compute_dtype, device=device)  # (B, C, Hkv, D)
        self.pending_token_ids = torch.full((B, C), NO_TOKEN, dtype=torch.int32, device=device)  # (B, C)
        self.num_pending = torch.zeros(B, dtype=torch.long, device=device)
        self.written = torch.zeros(B, dtype=torch.long, device=device)  # tokens written per row since its reset

    @property
    def slotted(self) -> tuple[str, ...]:
        """Names of the tensors with a chunk-slot dim (dim 2)."""
        return SLOTTED + (SCALES if self.quantized else ())

    @property
    def state(self) -> tuple[str, ...]:
        """Names of every tensor that makes up the bank's contents (what `save` writes)."""
        return self.slotted + COUNTERS

    # ---- sizes --------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the storage and the index live."""
        return self.keys.device

    @property
    def compute_device(self) -> torch.device:
        """Where `search` and `gather` return their results: the reading model's device."""
        return self.device if self.offload_to is None else self.offload_to

    @property
    def sizes(self) -> torch.Tensor:
        """(B,) retrievable tokens held by each row (pending tokens not counted); `written` counts all tokens."""
        return self.num_chunks * self.spec.chunk_size

    @property
    def slots_in_use(self) -> int:
        return int(self.num_chunks.max())

    def __len__(self) -> int:
        """Retrievable tokens in the fullest row (so after `reset(rows=[0])` it still counts the other rows);
        `sizes` gives every row's."""
        return int(self.sizes.max())

    @classmethod
    def full_size(cls, spec: MemorySpec, batch_size: int = 1) -> int:
        """Bytes of the tensors of a saved bank of `spec` whose rows are full (a file adds its JSON header)."""
        one_slot = cls(dataclasses.replace(spec, capacity=spec.chunk_size), batch_size)
        one_slot._grow(1)
        counters = sum(getattr(one_slot, n).numel() * getattr(one_slot, n).element_size() for n in COUNTERS)
        return one_slot.nbytes() * (spec.capacity // spec.chunk_size) + counters

    def nbytes(self) -> int:
        """Bytes of the chunk storage allocated (keys, values, chunk keys, token ids, int8 scales)."""
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in self.slotted)

    def __repr__(self) -> str:
        place = "" if self.offload_to is None else \
            f", offloaded to {self.device}{' (pinned)' if self.pin_memory else ''} for {self.offload_to}"
        return (f"MemoryBank(rows={self.batch_size}, tokens={self.sizes.tolist()}, capacity={self.spec.capacity}, "
                f"chunk_size={self.spec.chunk_size}, dtype={self.spec.dtype}, retriever={self.retriever.name}{place})")

    # ---- write ----------------------------------------------------------------------
    def _grow(self, needed: int) -> None:
        S = self.keys.shape[2]
        if needed <= S:
            return
        new = min(self.max_chunks, max(needed, 2 * S, 64))  # doubling: each slot is copied O(1) times on average
        for name in self.slotted:
            setattr(self, name, _pad_slots(getattr(self, name), new, self.pin_memory))

    def _store(self, b: int, slots: torch.Tensor, ck: torch.Tensor, cv: torch.Tensor, ids: torch.Tensor) -> None:
        """Write chunks ck, cv (Hkv, n, C, D) and their token ids (n, C) of row b into `slots` (n,)."""
        mean = ck.float().mean(dim=2)  # (Hkv, n, D) the chunks' search keys
        self.token_ids[b, 0, slots] = ids
        if not self.quantized:
            self.keys[b][:, slots] = ck
            self.values[b][:, slots] = cv
            self.chunk_keys[b][:, slots] = mean.to(self.dtype)
            return
        for data, scale, x in ((self.keys, self.key_scales, ck), (self.values, self.value_scales, cv),
                               (self.chunk_keys, self.chunk_key_scales, mean)):
            q, s = quantize(x)
            data[b][:, slots] = q
            scale[b][:, slots] = s

    @torch.no_grad()
    def write(self, keys: torch.Tensor, values: torch.Tensor, attention_mask: torch.Tensor | None = None,
              token_ids: torch.Tensor | None = None) -> None:
        """Append a segment's keys/values (B, T, Hkv, D); positions where attention_mask == 0 are skipped.
        `token_ids` (B, T), when given, are stored with their tokens (`readable` shows them as text)."""
        B, T, H, D = keys.shape
        assert (B, H, D) == (self.batch_size, self.spec.num_kv_heads, self.spec.head_dim), (keys.shape, self.spec)
        assert values.shape == keys.shape
        assert token_ids is None or token_ids.shape == (B, T), (None if token_ids is None else token_ids.shape, B, T)
        C = self.spec.chunk_size
        keys, values = keys.to(self.device, self.compute_dtype), values.to(self.device, self.compute_dtype)
        if token_ids is None:
            token_ids = torch.full((B, T), NO_TOKEN, dtype=torch.int32, device=self.device)
        token_ids = token_ids.to(self.device, torch.int32)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device).bool()
        for b in range(B):
            k, v, t = keys[b], values[b], token_ids[b]  # (T, Hkv, D), (T,)
            if attention_mask is not None:
                keep = attention_mask[b]
                k, v, t = k[keep], v[keep], t[keep]
            self.written[b] += k.shape[0]
            p = int(self.num_pending[b])
            k = _cat([self.pending_keys[b, :p], k])    # (p + T', Hkv, D)
            v = _cat([self.pending_values[b, :p], v])
            t = _cat([self.pending_token_ids[b, :p], t])  # (p + T',)
            n_new = k.shape[0] // C
            rest = k.shape[0] - n_new * C
            self.pending_keys[b, :rest] = k[n_new * C:]
            self.pending_values[b, :rest] = v[n_new * C:]
            self.pending_token_ids[b, :rest] = t[n_new * C:]
            self.num_pending[b] = rest
            if n_new == 0:
                continue
            drop = max(0, n_new - self.max_chunks)  # a write longer than the capacity keeps its newest chunks
            ck = k[drop * C:n_new * C].view(-1, C, H, D).permute(2, 0, 1, 3)  # (Hkv, n, C, D)
            cv = v[drop * C:n_new * C].view(-1, C, H, D).permute(2, 0, 1, 3)
            self._grow(min(self.max_chunks, int(self.num_chunks[b]) + n_new))
            slots = (self.next_slot[b] + torch.arange(drop, n_new, device=self.device)) % self.max_chunks
            self._store(b, slots, ck, cv, t[drop * C:n_new * C].view(-1, C))
            self.next_slot[b] = (self.next_slot[b] + n_new) % self.max_chunks
            start, end = held_span(int(self.written[b]), self.spec.capacity, C)
            self.num_chunks[b] = (end - start) // C
            self.retriever.added(self, b, slots)

    def _rows(self, rows: Iterable[int] | torch.Tensor) -> torch.Tensor:
        """Row indices, or a bool mask of batch_size entries -> (n,) int64 indices, checked to be in range."""
        idx = rows if torch.is_tensor(rows) else torch.as_tensor(list(rows))
        if idx.dtype == torch.bool:
            if idx.shape != (self.batch_size,):
                raise LongMemError(f"a row mask needs {self.batch_size} entries (one per row), not {tuple(idx.shape)}")
            idx = idx.nonzero()
        idx = idx.to(self.device, torch.long).flatten()
        bad = (idx < 0) | (idx >= self.batch_size)
        if bool(bad.any()):
            raise LongMemError(f"row {int(idx[bad][0])} is out of range: this memory has rows 0..{self.batch_size - 1}")
        return idx

    def reset(self, rows: Iterable[int] | torch.Tensor | None = None) -> None:
        """Forget everything in `rows` (indices, or a bool mask over the rows; all rows when None)."""
        idx = slice(None) if rows is None else self._rows(rows)
        for t in (self.num_chunks, self.next_slot, self.num_pending, self.written):
            t[idx] = 0
        self.retriever.reset(self, None if rows is None else idx)

    def advance(self, counts: torch.Tensor) -> None:
        """Count `counts` (B,) more tokens per row as written without storing them: `written`, the chunk
        alignment (`num_pending`), the ring position (`next_slot`) and `num_chunks` move as `write` moves them, but
        the tokens' keys and values (and the pending buffer's) are not kept. Exact only for tokens that are evicted
        before anything reads them, i.e. followed by `write`s that push them out of `held_span` (`memorize` skips
        leading segments this way)."""
        counts = torch.as_tensor(counts, dtype=torch.long, device=self.device)
        C = self.spec.chunk_size
        total = self.num_pending + counts  # (B,) tokens waiting for a chunk, had they been written
        self.next_slot.copy_((self.next_slot + total // C) % self.max_chunks)
        self.num_pending.copy_(total % C)
        self.written += counts
        start, end = held_span(self.written, self.spec.capacity, C)  # (B,) each
        self.num_chunks.copy_((end - start) // C)
        self._grow(self.slots_in_use)

    # ---- banks as values -----------------------------------------------------------------
    def _derived(self, batch_size: int, state, device=None, placement: tuple | None = None) -> "MemoryBank":
        """A new bank with this spec and a fresh index of this retriever, whose tensors (all of `state`) are
        state(name, tensor); the index is rebuilt from them. placement: (compute_device, pin_memory), default
        this bank's."""
        offload_to, pin = (self.offload_to, self.pin_memory) if placement is None else placement
        bank = type(self)(self.spec, batch_size, device=device or self.device, retriever=self.retriever.fresh(),
                          compute_device=offload_to, pin_memory=pin)
        for name in self.state:
            t = state(name, getattr(self, name))
            setattr(bank, name, t.pin_memory() if pin and name in self.slotted and not t.is_pinned() else t)
        bank.retriever.rebuild(bank)
        return bank

    def to(self, device: torch.device | str) -> "MemoryBank":
        """A copy of this bank on `device` (same spec, retriever and contents), read by a model on `device` (an
        offloaded bank comes back in place)."""
        return self._derived(self.batch_size, lambda name, t: t.to(device, copy=True), device, (None, False))

    def offload(self, compute_device: torch.device | str, pin_memory: bool | None = None) -> "MemoryBank":
        """A copy of this bank in CPU memory, read by a model on `compute_device`: searched on the CPU, only the
        retrieved chunks move to `compute_device`. pin_memory (default: when `compute_device` is CUDA) keeps the
        storage page-locked so those moves do not block."""
        compute_device = _concrete(compute_device)
        pin = compute_device.type == "cuda" if pin_memory is None else pin_memory
        return self._derived(self.batch_size, lambda name, t: t.to("cpu", copy=True), "cpu", (compute_device, pin))

    def select(self, rows: Iterable[int] | torch.Tensor) -> "MemoryBank":
        """A new bank of the given rows (indices, repeats allowed, or a bool mask), in that order; copies."""
        idx = self._rows(rows)
        return self._derived(len(idx), lambda name, t: t[idx])

    def split(self) -> list["MemoryBank"]:
        """One single-row bank per row (copies): the inverse of `stack`."""
        return [self.select([b]) for b in range(self.batch_size)]

    @classmethod
    def stack(cls, banks: Iterable["MemoryBank"]) -> "MemoryBank":
        """One bank holding the rows of `banks` in order (copies, with the first bank's retriever); they must
        share spec and device. Their storage is zero-padded to the largest (slots past a row's chunks are unused)."""
        banks = list(banks)
        if not banks:
            raise LongMemError("MemoryBank.stack needs at least one bank")
        first = banks[0]
        for other in banks[1:]:
            if (other.spec, other.device) != (first.spec, first.device):
                raise LongMemError(f"cannot stack memories of different specs or devices ({other.spec} on "
                                   f"{other.device} vs {first.spec} on {first.device}); build them with one model")
            if other.offload_to != first.offload_to:
                raise LongMemError(f"cannot stack memories of different placements (offloaded for "
                                   f"{other.offload_to} vs {first.offload_to}); offload them alike (memory.offload)")
        slots = max(b.keys.shape[2] for b in banks)
        sized = lambda name, t: _pad_slots(t, slots) if name in first.slotted else t
        return first._derived(sum(b.batch_size for b in banks),
                              lambda name, _: _cat([sized(name, getattr(b, name)) for b in banks]))

    # ---- read -----------------------------------------------------------------------
    def search(self, queries: torch.Tensor, k: int) -> Retrieval:
        """queries (B, Hkv, Q, D) -> the top-k chunk slots per query (k clipped to what is stored). An offloaded
        bank searches on its own device and returns the result on `compute_device`."""
        if self.offload_to is None:
            return self.retriever.search(self, queries, min(k, self.slots_in_use))
        found = self.retriever.search(self, queries.to(self.device), min(k, self.slots_in_use))
        return found.to(self.offload_to)

    def search_keys(self, slots: int | None = None) -> torch.Tensor:
        """(B, Hkv, S, D) chunk search keys of the first `slots` slots (default: all allocated), dequantised."""
        S = self.chunk_keys.shape[2] if slots is None else slots
        if not self.quantized:
            return self.chunk_keys[:, :, :S]
        return dequantize(self.chunk_keys[:, :, :S], self.chunk_key_scales[:, :, :S])

    def head_search_keys(self, row: int, head: int, n: int) -> torch.Tensor:
        """(n, D) search keys of the first `n` slots of `row`'s kv head `head`, dequantised (the tiled exact search
        reads them a head at a time, so an int8 memory is never dequantised whole)."""
        keys = self.chunk_keys[row, head, :n]
        if not self.quantized:
            return keys
        return dequantize(keys, self.chunk_key_scales[row, head, :n])

    def row_search_keys(self, row: int, slots: torch.Tensor) -> torch.Tensor:
        """(Hkv, n, D) float32 search keys of `slots` (n,) in `row` (what approximate indexes hold)."""
        keys = self.chunk_keys[row][:, slots]
        if self.quantized:
            return dequantize(keys, self.chunk_key_scales[row][:, slots], torch.float32)
        return keys.float()

    def gather(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """slots (B, Hkv, Q, k) -> token keys and values (B, Hkv, Q, k*C, D) on `compute_device` (int8 memories:
        dequantised there, so an offloaded int8 bank moves int8)."""
        B, H, Q, k = slots.shape
        S, C, D = self.keys.shape[2], self.spec.chunk_size, self.spec.head_dim
        slots = slots.to(self.device)
        offsets = torch.arange(B * H, device=self.device).view(B, H, 1, 1) * S
        flat = (slots + offsets).reshape(-1)                          # (B*Hkv*Q*k,) rows of the flat table
        out = []
        for data, scales in ((self.keys, "key_scales"), (self.values, "value_scales")):
            x = self._take(data.view(B * H * S, C * D), flat)         # (B*Hkv*Q*k, C*D)
            if self.quantized:
                s = self._take(getattr(self, scales).view(B * H * S, C), flat)  # (B*Hkv*Q*k, C)
                x = dequantize(x.view(-1, C, D), s)                    # (B*Hkv*Q*k, C, D)
            out.append(x.reshape(B, H, Q, k * C, D))
        return out[0], out[1]

    def _take(self, table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """table (N, E) on the bank's device, rows (n,) -> table[rows] (n, E) on `compute_device`. Offloaded: through
        a staging buffer (page-locked when the bank is, which the host allocator keeps until the copy is done)
        and a copy that does not block from pinned memory."""
        if self.offload_to is None:
            return table.index_select(0, rows)
        staged = torch.empty(len(rows), table.shape[1], dtype=table.dtype, pin_memory=self.pin_memory)  # (n, E)
        torch.index_select(table, 0, rows, out=staged)
        return staged.to(self.offload_to, non_blocking=self.pin_memory)

    def tokens(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row `row`'s stored keys and values in write order (oldest first): (Hkv, N, D) each."""
        order = self.write_order(row)
        H, D = self.spec.num_kv_heads, self.spec.head_dim
        keys, values = self.keys[row][:, order], self.values[row][:, order]  # (Hkv, n, C, D)
        if self.quantized:
            keys = dequantize(keys, self.key_scales[row][:, order])
            values = dequantize(values, self.value_scales[row][:, order])
        return keys.reshape(H, -1, D), values.reshape(H, -1, D)

    def write_order(self, row: int) -> torch.Tensor:
        """(n,) the slots of row `row`'s stored chunks, oldest first."""
        n, start = int(self.num_chunks[row]), int(self.next_slot[row])
        return (start - n + torch.arange(n, device=self.device)) % self.max_chunks

    def chunk_positions(self, row: int) -> torch.Tensor:
        """(n,) stream position of each stored chunk's first token, in write order (the order of `tokens`)."""
        start, end = held_span(int(self.written[row]), self.spec.capacity, self.spec.chunk_size)
        return torch.arange(start, end, self.spec.chunk_size)

    def slot_positions(self, row: int, slots: torch.Tensor) -> torch.Tensor:
        """Stream position of the first token of the chunk in each of `slots` (any shape) of row `row`, which must
        hold a chunk there."""
        n, oldest = int(self.num_chunks[row]), int(self.next_slot[row] - self.num_chunks[row])
        age = (slots.cpu() - oldest) % self.max_chunks  # 0 = the oldest stored chunk
        assert bool((age < n).all()), "a slot that holds no chunk"
        return self.chunk_positions(row)[age]

    def chunk_token_ids(self, row: int, slots: torch.Tensor) -> torch.Tensor:
        """(..., C) token ids (int32, NO_TOKEN where not recorded) of the chunks in `slots` (...) of row `row`."""
        return self.token_ids[row, 0][slots.to(self.device)]

    # ---- persistence ------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the bank atomically as safetensors; the header holds the spec and a checksum of the tensors."""
        S = self.slots_in_use
        tensors = {name: getattr(self, name).cpu() for name in self.state}
        tensors.update({name: tensors[name][:, :, :S] for name in self.slotted})
        meta = {"format": FORMAT, "spec": json.dumps(dataclasses.asdict(self.spec)), "batch_size": str(self.batch_size)}
        meta["sha256"] = checksum(tensors, meta["spec"] + meta["batch_size"])
        save_safetensors(path, tensors, metadata=meta)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu", expect: MemorySpec | None = None,
             retriever: Retriever | str | None = None, compute_device: torch.device | str | None = None,
             pin_memory: bool = False) -> "MemoryBank":
        """Load a bank saved by `save`; `expect` (a model's `memory_spec()`) checks it belongs to that model.
        The retriever's index is built from the loaded contents. compute_device, pin_memory: as for the
        constructor (offloading).

        The checksum of the tensor bytes is verified. Files of the previous formats load too: format 2 without
        token ids (shown as unknown), format 1 also without that check, and its chunk positions count from the
        oldest chunk it holds (`written` was not saved)."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise LongMemError(f"memory file not found: {path}; check the path")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise LongMemError(f"memory file {path} is corrupt or truncated ({e}); re-create it with memorize") from e
        fmt = meta.get("format")
        if fmt not in (FORMAT, PREVIOUS_FORMAT, LEGACY_FORMAT):
            raise LongMemError(f"{path} is not a longmem memory file (format {fmt!r}, expected {FORMAT!r})")
        try:
            if fmt != LEGACY_FORMAT and meta.get("sha256") != checksum(tensors, meta["spec"] + meta["batch_size"]):
                raise LongMemError(f"memory file {path} fails its checksum: its bytes changed since it was saved; "
                                   f"re-create it with memorize")
            spec = MemorySpec(**json.loads(meta["spec"]))
            bank = cls(spec, int(meta["batch_size"]), device, retriever, compute_device, pin_memory)
            if fmt == LEGACY_FORMAT:
                tensors["written"] = tensors["num_chunks"] * spec.chunk_size + tensors["num_pending"]
            if fmt != FORMAT:
                B, S, C = bank.batch_size, tensors["keys"].shape[2], spec.chunk_size
                tensors["token_ids"] = torch.full((B, 1, S, C), NO_TOKEN, dtype=torch.int32)
                tensors["pending_token_ids"] = torch.full((B, C), NO_TOKEN, dtype=torch.int32)
            bank._restore(tensors)
        except (KeyError, TypeError, ValueError, AssertionError, json.JSONDecodeError) as e:
            raise LongMemError(f"memory file {path} has inconsistent contents ({type(e).__name__}: {e}); "
                               f"re-create it with memorize") from e
        if expect is not None:
            expect.check_compatible(spec)
        bank.retriever.rebuild(bank)
        return bank

    def _restore(self, t: dict[str, torch.Tensor]) -> None:
        B, H, C, D = self.batch_size, self.spec.num_kv_heads, self.spec.chunk_size, self.spec.head_dim
        S = t["keys"].shape[2]
        expected = {"keys": (B, H, S, C, D), "values": (B, H, S, C, D), "chunk_keys": (B, H, S, D),
                    "token_ids": (B, 1, S, C), "key_scales": (B, H, S, C), "value_scales": (B, H, S, C),
                    "chunk_key_scales": (B, H, S), "num_chunks": (B,), "next_slot": (B,),
                    "pending_keys": (B, C, H, D), "pending_values": (B, C, H, D), "pending_token_ids": (B, C),
                    "num_pending": (B,), "written": (B,)}
        for name in self.state:
            if name not in t:
                raise KeyError(f"missing tensor {name!r}")
            if tuple(t[name].shape) != expected[name]:
                raise ValueError(f"tensor {name!r} has shape {tuple(t[name].shape)}, the header implies {expected[name]}")
        if S > self.max_chunks or bool((t["num_chunks"] > S).any()) or bool((t["num_pending"] >= C).any()):
            raise ValueError("chunk counters exceed the stored data")
        self._grow(S)
        for name in self.state:  # assignment casts to the bank's dtype and device
            stored = getattr(self, name)
            if name in self.slotted:
                stored = stored[:, :, :S]
            stored.copy_(t[name])
