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


def topk_by_blocks(scores: torch.Tensor, k: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over the last dim of scores (..., S) in two stages: the k blocks of `block` columns with the
    largest maxima hold the top k (each holds at least one score >= the k-th), then a top-k over those blocks.

    Returns (values, indices) like `torch.topk` (sorted, largest first); S must be a multiple of `block`, with at
    least k blocks. The values equal `torch.topk`'s; with ties at the k-th value, which of the tied columns is
    returned may differ (as between any two top-k implementations)."""
    *lead, S = scores.shape
    blocks = scores.view(*lead, S // block, block)                           # (..., nb, block)
    best = blocks.amax(dim=-1).topk(k, dim=-1, sorted=False).indices         # (..., k) block numbers
    cand = blocks.gather(-2, best[..., None].expand(*best.shape, block))     # (..., k, block)
    values, i = cand.flatten(-2).topk(k, dim=-1)                             # (..., k) over k*block candidates
    return values, best.gather(-1, i // block) * block + i % block


class ExactRetriever(Retriever):
    """Brute-force inner-product search over every stored chunk: the reference backend.

    Scores are computed in the storage dtype (float16 is upcast on CPU, where it has no fast
    matmul; int8 search keys are dequantised to bfloat16). The top-k is one `torch.topk` over all
    slots; `block=` switches to a two-stage top-k through block maxima (`topk_by_blocks`, the same
    scores), which measured 1.5x slower on a 2-core CPU at 65k tokens (benchmarks/segment_forward.py),
    so it is opt-in. With a
    float32 memory the result is exactly the float32 brute-force top-k (slots too, unless scores
    tie at the k-th place); with bfloat16 (the default) near-ties can be ordered differently than
    in float32. Queries are processed in blocks so at most `max_scores` scores exist at once.
    """
    name = "exact"

    def __init__(self, max_scores: int = 1 << 25, block: int | None = None):
        self.max_scores = max_scores  # score elements materialised at once
        self.block = block            # columns per block of the two-stage top-k (None: one flat top-k)

    def search(self, bank: "MemoryBank", queries: torch.Tensor, k: int) -> Retrieval:
        B, Hkv, Q, D = queries.shape
        S = bank.slots_in_use
        assert k <= S, (k, S)
        keys = bank.search_keys(S)  # (B, Hkv, S, D) in the scoring dtype
        dtype = torch.float32 if keys.dtype == torch.float16 and keys.device.type == "cpu" else keys.dtype
        bs = self.block or S
        staged = S >= 4 * k * bs  # two stages only once the blocks outnumber k by far
        Sp = -(-S // bs) * bs if staged else S  # columns padded to whole blocks (padding scores -inf)
        keys = keys.to(dtype)
        if Sp > S:
            keys = torch.cat([keys, keys.new_zeros(B, Hkv, Sp - S, D)], dim=2)  # (B, Hkv, Sp, D)
        keys = keys.transpose(-1, -2)  # (B, Hkv, D, Sp)
        # slots past a row's chunk count hold nothing (rows fill at different rates)
        empty = torch.arange(Sp, device=keys.device) >= bank.num_chunks[:, None]  # (B, Sp)
        empty = empty[:, None, None, :] if bool(empty.any()) else None            # (B, 1, 1, Sp)
        qblock = max(1, self.max_scores // max(1, B * Hkv * Sp))
        out_scores, out_slots = [], []
        for start in range(0, Q, qblock):
            s = queries[:, :, start:start + qblock].to(dtype) @ keys  # (B, Hkv, q, Sp), in the scoring dtype
            if empty is not None:
                s.masked_fill_(empty, float("-inf"))
            values, slots = topk_by_blocks(s, k, bs) if staged else s.topk(k, dim=-1)
            out_scores.append(values)
            out_slots.append(slots)
        scores = torch.cat(out_scores, dim=2)  # (B, Hkv, Q, k)
        return Retrieval(torch.cat(out_slots, dim=2), torch.isfinite(scores), scores)


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
