"""Retrieval backends: which memory chunks each query attends to.

A backend is a `Retriever`: an index that its `MemoryBank` drives through the bank's whole
life. The bank tells it which chunk slots were written (`added`; a written slot that held a
chunk is an eviction), which rows were emptied (`reset`), and asks it to rebuild from the
bank's contents after `load`, `to`, `select` and `stack` (`rebuild`); the index is never saved.
`search(bank, queries, k)` returns, for every query, the slots of the k chunks whose search key
(mean of the chunk's token keys) has the largest inner product with it, per key/value head
and per batch row. `ExactRetriever` is the reference every approximate backend is tested against.

The backend is one setting, a name in `RETRIEVERS` with optional integer settings
('faiss-ivf:nprobe=8'; `LongMemConfig.retriever`, the `retriever=` argument of
`new_memory`/`load_memory`, the CLI's `--retriever`), made by `make_retriever`.

Shapes: B rows, Hkv key/value heads, Q queries per head, S chunk slots in use, D head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from longmem.config import parse_retriever
from longmem.errors import LongMemError

if TYPE_CHECKING:
    from longmem.memory.bank import MemoryBank


@dataclass
class Retrieval:
    """The chunks found for each query: what `search` returns and `LongMemOutput.retrieval` reports.

    Every field is (B, Hkv, Q, k). In the model's output Q = G*T (G query heads per key/value
    head, T tokens): query head h searches kv head h // G, and its token t is at index (h % G)*T + t.
    """
    slots: torch.Tensor   # (B, Hkv, Q, k) int64 chunk slots in the bank
    valid: torch.Tensor   # (B, Hkv, Q, k) bool: False where the row holds fewer than k chunks
    scores: torch.Tensor  # (B, Hkv, Q, k) inner products (-inf where not valid)

    def to(self, device: torch.device | str) -> "Retrieval":
        """The same retrieval on `device`."""
        return Retrieval(self.slots.to(device), self.valid.to(device), self.scores.to(device))

    def top(self, k: int) -> "Retrieval":
        """The best k of each query's chunks (every backend returns them best first)."""
        return Retrieval(self.slots[..., :k], self.valid[..., :k], self.scores[..., :k])


class Retriever:
    """An index over one bank's chunk search keys, kept in step with the bank by the bank's calls.

    The base class keeps no state: every hook is a no-op and `fresh` returns the same object.
    Stateful indexes override the hooks and return a new empty index from `fresh`.
    """
    name = ""

    def fresh(self) -> "Retriever":
        """An empty index with the same settings, for a new bank (banks as values never share an index)."""
        return self

    def added(self, bank: "MemoryBank", row: int, slots: torch.Tensor) -> None:
        """The chunks at `slots` (n,) of `row` were just written, oldest first (replacing what they held)."""

    def reset(self, bank: "MemoryBank", rows: torch.Tensor | None) -> None:
        """`rows` (indices; None = all) were emptied."""

    def rebuild(self, bank: "MemoryBank") -> None:
        """Build from the bank's current contents (after load, to, select, stack)."""

    def search(self, bank: "MemoryBank", queries: torch.Tensor, k: int) -> Retrieval:
        """queries (B, Hkv, Q, D) -> the top-k chunk slots of each query's row and head (k <= slots in use)."""
        raise NotImplementedError


class PerRowIndex(Retriever):
    """An index kept per batch row (the approximate backends): `rows[b]` is built from row b's stored chunks
    (`_build`, None while the row is too small to index), extended as chunks are written (`_extend`) and rebuilt
    when the subclass finds it stale (`_extend` returns False)."""

    def __init__(self):
        self.rows: list = []

    def _build(self, bank: "MemoryBank", row: int):
        raise NotImplementedError

    def _extend(self, index, bank: "MemoryBank", row: int, slots: torch.Tensor) -> bool:
        """Add the chunks at `slots` to row `row`'s index; False: rebuild it instead."""
        raise NotImplementedError

    def _sized(self, bank: "MemoryBank") -> None:
        if len(self.rows) != bank.batch_size:  # a new bank's first write or search
            self.rows = [None] * bank.batch_size

    def rebuild(self, bank: "MemoryBank") -> None:
        self.rows = [self._build(bank, b) for b in range(bank.batch_size)]

    def reset(self, bank: "MemoryBank", rows: torch.Tensor | None) -> None:
        for b in range(bank.batch_size) if rows is None else rows.tolist():
            self.rows[b] = None

    def added(self, bank: "MemoryBank", row: int, slots: torch.Tensor) -> None:
        self._sized(bank)
        index = self.rows[row]
        if index is None or not self._extend(index, bank, row, slots):
            self.rows[row] = self._build(bank, row)


def ivf_nlist(chunks: int, scale: int = 1) -> int:
    """Lists of an inverted-file index over `chunks` vectors: scale x sqrt(chunks) (faiss's guidance is 1-16 x),
    at most chunks / 8 (so that k-means has points to place every centroid), at least 16, and never more lists than
    chunks (a row indexed from fewer than 16 chunks, with a small `min_chunks`: one list per chunk)."""
    return min(chunks, max(16, min(scale * int(math.sqrt(chunks)), chunks // 8)))


def topk_by_blocks(scores: torch.Tensor, k: int, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over the last dim of scores (..., S) in two stages. The columns are dealt into `blocks` strided
    blocks (column c is in block c % blocks); the k blocks with the largest maxima hold the top k (each of the top k
    lies in a block whose maximum is at least the k-th value), then one top-k over those k blocks' columns.

    Returns (values, indices) like `torch.topk` (sorted, largest first); S must be a multiple of `blocks`, with
    blocks >= k. The values equal `torch.topk`'s; with ties at the k-th value, which of the tied columns is returned
    may differ (as between any two top-k implementations). Strided rather than contiguous blocks, because the maxima
    are then a reduction across rows of the (S/blocks, blocks) view, which vectorises along the blocks.

    bfloat16 maxima are taken over the int16 bit patterns, 6x faster on CPU than the bfloat16 reduction. The bit
    patterns order positive numbers correctly and negative ones backwards, so a block's integer maximum is its true
    maximum whenever that is positive. Where a row has at least k blocks with a positive maximum, its top k are
    positive too and those blocks are chosen exactly as by their true maxima; other rows (rare: the k-th best score
    is negative) get one flat `torch.topk`."""
    *lead, S = scores.shape
    m = S // blocks
    view = scores.view(*lead, m, blocks)                                      # (..., m, blocks): block = column
    fallback = None
    if scores.dtype == torch.bfloat16:
        maxima = view.view(torch.int16).amax(dim=-2)                          # (..., blocks) exact where > 0
        fallback = (maxima > 0).sum(dim=-1) < k                               # (...) rows to redo flat
    else:
        maxima = view.amax(dim=-2)                                            # (..., blocks)
    best = maxima.topk(k, dim=-1, sorted=False).indices                       # (..., k) block numbers
    cand = view.gather(-1, best[..., None, :].expand(*lead, m, k))            # (..., m, k) their columns
    values, i = cand.flatten(-2).topk(k, dim=-1)                              # (..., k) over m*k candidates
    indices = best.gather(-1, i % k) + blocks * (i // k)
    if fallback is not None and bool(fallback.any()):
        values[fallback], indices[fallback] = scores[fallback].topk(k, dim=-1)
    return values, indices


def merge_topk(values: list[torch.Tensor], indices: list[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top k (sorted) of the union of several top-k results (q, k_i) each: the top k of a union lie in the top k
    of its parts."""
    if len(values) == 1:
        return values[0], indices[0]
    v, i = torch.cat(values, dim=-1).topk(k, dim=-1)                          # (q, k)
    return v, torch.cat(indices, dim=-1).gather(-1, i)


class ExactRetriever(Retriever):
    """Brute-force inner-product search over every stored chunk: the reference backend.

    Scores are computed in the storage dtype (float16 is upcast on CPU, where it has no fast matmul; int8 search keys
    are dequantised to bfloat16). With a float32 memory the result is exactly the float32 brute-force top-k (slots
    too, unless scores tie at the k-th place); with bfloat16 (the default) near-ties can be ordered differently than
    in float32.

    Two schedules, the same result:
    - **batched** (GPUs, and searches whose scores fit in one tile, like a decoding step): one matmul over all rows
      and heads and one `torch.topk`, queries taken in blocks so at most `max_scores` scores exist at once.
    - **tiled** (CPU): row by row and head by head, blocks of up to 256 queries against tiles of slots, `tile` scores
      at a time (default 8M: 256 x 32,768, 16 MB in bfloat16, held in the last-level cache), written into one
      reused buffer, each tile's top k found in two stages through `blocks` strided block maxima
      (`topk_by_blocks`), and the tiles' results merged. On a 2-core CPU at 65k memory tokens (1,024 queries x 12
      heads x 16,384 chunks) this measured 2.9x faster than the batched schedule, 3.2x at 1M: the batched matmul
      spends most of its time faulting in the pages of a fresh score tensor per block and streaming it through
      memory, and the flat top-k reads every score at a lower rate than the integer block maxima do
      (benchmarks/segment_forward.py times both).
    """
    name = "exact"

    def __init__(self, max_scores: int = 1 << 25, tile: int = 1 << 23, blocks: int = 256, query_block: int = 256):
        self.max_scores = max_scores    # batched: score elements materialised at once
        self.tile = tile                # tiled: score elements per tile
        self.blocks = blocks            # tiled: strided blocks of a tile's two-stage top-k
        self.query_block = query_block  # tiled: queries per tile

    def search(self, bank: "MemoryBank", queries: torch.Tensor, k: int) -> Retrieval:
        B, Hkv, Q, D = queries.shape
        S = bank.slots_in_use
        assert k <= S, (k, S)
        cpu = bank.device.type == "cpu"
        dtype = torch.float32 if bank.compute_dtype == torch.float16 and cpu else bank.compute_dtype  # scoring dtype
        if cpu and B * Hkv * Q * S > self.tile:
            values, slots = self._tiled(bank, queries.to(dtype), k)
        else:
            keys = bank.search_keys(S).to(dtype)  # (B, Hkv, S, D)
            values, slots = self._batched(keys, queries.to(dtype), bank.num_chunks, k)
        return Retrieval(slots, torch.isfinite(values), values)

    def _batched(self, keys: torch.Tensor, queries: torch.Tensor, num_chunks: torch.Tensor, k: int):
        """keys (B, Hkv, S, D), queries (B, Hkv, Q, D) -> scores and slots (B, Hkv, Q, k)."""
        B, Hkv, Q, _ = queries.shape
        S = keys.shape[2]
        keys = keys.transpose(-1, -2)  # (B, Hkv, D, S)
        # slots past a row's chunk count hold nothing (rows fill at different rates)
        empty = torch.arange(S, device=keys.device) >= num_chunks[:, None]  # (B, S)
        empty = empty[:, None, None, :] if bool(empty.any()) else None      # (B, 1, 1, S)
        qblock = max(1, self.max_scores // max(1, B * Hkv * S))
        out_scores, out_slots = [], []
        for start in range(0, Q, qblock):
            s = queries[:, :, start:start + qblock] @ keys  # (B, Hkv, q, S), in the scoring dtype
            if empty is not None:
                s.masked_fill_(empty, float("-inf"))
            values, slots = s.topk(k, dim=-1)
            out_scores.append(values)
            out_slots.append(slots)
        return torch.cat(out_scores, dim=2), torch.cat(out_slots, dim=2)

    def tile_shape(self, Q: int, k: int) -> tuple[int, int]:
        """(queries, slots) of one tile of the tiled schedule for Q queries: `query_block` queries against `tile`
        scores' worth of slots, a whole number of blocks when the tile is large enough to take two stages."""
        qb = min(Q, self.query_block)
        width = max(k, self.tile // qb)
        return qb, (width // self.blocks * self.blocks if width >= 8 * self.blocks else width)

    def _tiled(self, bank: "MemoryBank", queries: torch.Tensor, k: int):
        """queries (B, Hkv, Q, D) in the scoring dtype -> scores and slots (B, Hkv, Q, k); a row's slots past its
        chunk count are never scored (-inf / slot 0 where a row holds fewer than k chunks). The keys are read a row
        and head at a time (`MemoryBank.head_search_keys`)."""
        B, Hkv, Q, _ = queries.shape
        qb, width = self.tile_shape(Q, k)
        buf = torch.empty(qb, width, dtype=queries.dtype)  # (qb, width) one tile's scores, reused
        values = torch.full((B, Hkv, Q, k), float("-inf"), dtype=queries.dtype)
        slots = torch.zeros(B, Hkv, Q, k, dtype=torch.long)
        for b, n in enumerate(bank.num_chunks.tolist()):
            for h in range(Hkv):
                kt = bank.head_search_keys(b, h, n).to(queries.dtype).t()  # (D, n)
                for q0 in range(0, Q, qb) if n else ():
                    q = queries[b, h, q0:q0 + qb]  # (q, D)
                    values[b, h, q0:q0 + qb], slots[b, h, q0:q0 + qb] = self._head_topk(q, kt, k, buf)
        return values, slots

    def _head_topk(self, q: torch.Tensor, kt: torch.Tensor, k: int, buf: torch.Tensor):
        """q (q, D) against kt (D, n), n >= 1, tile by tile through `buf` -> the top k scores and slots (q, k)."""
        nb, width, n = self.blocks, buf.shape[1], kt.shape[1]
        found_v, found_i = [], []
        for t0 in range(0, n, width):
            w = min(width, n - t0)
            staged = w >= 8 * nb and k <= nb  # two stages pay once blocks hold 8+ columns
            s = buf[:len(q), :-(-w // nb) * nb if staged else max(w, k)]  # padded to whole blocks / to k columns
            torch.mm(q, kt[:, t0:t0 + w], out=s[:, :w])
            s[:, w:] = float("-inf")
            v, i = topk_by_blocks(s, k, nb) if staged else s.topk(k, dim=-1)  # (q, k) each
            found_v.append(v)
            found_i.append(i + t0)
        return merge_topk(found_v, found_i, k)


def make_retriever(spec: str) -> Retriever:
    """A new index of the named backend, with the settings the spec gives ('faiss-ivf:nprobe=8'; `parse_retriever`)
    and the defaults for the rest (faiss is imported only for faiss-*)."""
    name, settings = parse_retriever(spec)
    if name == "exact":
        return ExactRetriever(**settings)
    if name == "torch-ivf":
        from longmem.memory.torch_ivf import TorchIVFRetriever
        return TorchIVFRetriever(**settings)
    from longmem.memory.faiss_index import FaissRetriever
    return FaissRetriever(name.split("-")[1], **settings)
