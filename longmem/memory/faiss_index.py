"""faiss backends (`faiss-ivf`, `faiss-hnsw`): one faiss index per batch row and key/value head.

faiss is an optional dependency (`pip install 'longmem[faiss]'`), imported when such a retriever
is made. A row's chunks get ids in write order; each index holds the vectors of ids
[first, next). FIFO eviction only ever removes the oldest ids, so the chunks a row holds are
exactly the newest `num_chunks` ids and a search is restricted to that id range
(`IDSelectorRange`): an evicted chunk is never returned. Evicted vectors are dropped by a
rebuild once they outnumber the live ones; an IVF index is also retrained once its row has grown
4x past the chunks it was trained on. Rows holding fewer than `min_chunks` chunks are searched
exactly (no index is worth building for them).

Shapes: Hkv key/value heads, Q queries per head, n chunks, D head dim.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from longmem.errors import LongMemError
from longmem.memory.retrieval import Retrieval, Retriever

if TYPE_CHECKING:
    from longmem.memory.bank import MemoryBank


def import_faiss():
    try:
        import faiss
    except ImportError as e:
        raise LongMemError("the faiss retrievers need faiss: pip install 'longmem[faiss]' (or faiss-cpu), "
                           "or use --retriever exact or torch-ivf") from e
    return faiss


class _Row:
    """One row's faiss indexes (one per kv head) and the slot of every id they hold."""

    def __init__(self, indexes: list, slots: np.ndarray, trained_on: int):
        self.indexes = indexes
        self._slots = slots.astype(np.int64)  # (capacity,) slot of each id, the first `total` in use
        self.total = len(slots)               # ids given out; the newest num_chunks of them are live
        self.trained_on = trained_on

    @property
    def id_slot(self) -> np.ndarray:
        """(total,) the slot of each id."""
        return self._slots[:self.total]

    def append(self, slots: np.ndarray) -> None:
        """Give the next ids to `slots` (n,); the table doubles when full, so a write costs O(n) amortised."""
        if self.total + len(slots) > len(self._slots):
            grown = np.empty(max(2 * len(self._slots), self.total + len(slots)), dtype=np.int64)
            grown[:self.total] = self.id_slot
            self._slots = grown
        self._slots[self.total:self.total + len(slots)] = slots
        self.total += len(slots)


class FaissRetriever(Retriever):
    """faiss IVF-flat (`kind="ivf"`) or HNSW-flat (`kind="hnsw"`) inner-product search, per row and kv head.

    IVF: `nlist` = sqrt(chunks) lists (at least 16) trained by k-means on the row's keys, `nprobe` of them
    searched. HNSW: `M` neighbours per node, `ef_search` candidates kept while searching."""

    def __init__(self, kind: str = "ivf", nprobe: int = 32, M: int = 32, ef_search: int = 128,
                 min_chunks: int = 1024):
        assert kind in ("ivf", "hnsw"), kind
        self.faiss = import_faiss()
        self.kind, self.nprobe, self.M, self.ef_search, self.min_chunks = kind, nprobe, M, ef_search, min_chunks
        self.name = f"faiss-{kind}"
        self.rows: list[_Row | None] = []

    def fresh(self) -> "FaissRetriever":
        return FaissRetriever(self.kind, self.nprobe, self.M, self.ef_search, self.min_chunks)

    # ---- lifecycle -----------------------------------------------------------------------------
    def _build(self, bank: "MemoryBank", row: int) -> _Row | None:
        n = int(bank.num_chunks[row])
        if n < self.min_chunks:
            return None
        slots = bank.write_order(row)               # (n,) oldest first: ids 0..n-1
        keys = bank.row_search_keys(row, slots)       # (Hkv, n, D) float32
        D = keys.shape[-1]
        faiss, indexes = self.faiss, []
        for x in keys.cpu().numpy():
            x = np.ascontiguousarray(x)
            if self.kind == "ivf":
                nlist = max(16, int(math.sqrt(n)))
                index = faiss.IndexIVFFlat(faiss.IndexFlatIP(D), D, nlist, faiss.METRIC_INNER_PRODUCT)
                index.cp.min_points_per_centroid = 1  # no warning for small rows: they still train fine
                index.train(x)
                index.add_with_ids(x, np.arange(n, dtype=np.int64))
            else:
                index = faiss.IndexHNSWFlat(D, self.M, faiss.METRIC_INNER_PRODUCT)
                index.add(x)  # ids are the insertion order, 0..n-1
            indexes.append(index)
        return _Row(indexes, slots.cpu().numpy(), trained_on=n)

    def rebuild(self, bank: "MemoryBank") -> None:
        self.faiss.omp_set_num_threads(torch.get_num_threads())
        self.rows = [self._build(bank, b) for b in range(bank.batch_size)]

    def reset(self, bank: "MemoryBank", rows: torch.Tensor | None) -> None:
        for b in range(bank.batch_size) if rows is None else rows.tolist():
            self.rows[b] = None

    def added(self, bank: "MemoryBank", row: int, slots: torch.Tensor) -> None:
        if len(self.rows) != bank.batch_size:  # a new bank's first write
            self.rows = [None] * bank.batch_size
        r, n = self.rows[row], int(bank.num_chunks[row])
        if r is None or r.total + len(slots) > 2 * max(n, self.min_chunks) or \
                (self.kind == "ivf" and n > 4 * r.trained_on):
            self.rows[row] = self._build(bank, row)  # first index, too many evicted ids, or outgrown lists
            return
        first = r.total
        keys = bank.row_search_keys(row, slots).cpu().numpy()  # (Hkv, n', D)
        ids = np.arange(first, first + len(slots), dtype=np.int64)
        for index, x in zip(r.indexes, keys):
            x = np.ascontiguousarray(x)
            if self.kind == "ivf":
                index.add_with_ids(x, ids)
            else:
                index.add(x)
        r.append(slots.cpu().numpy())

    # ---- search --------------------------------------------------------------------------------
    def search(self, bank: "MemoryBank", queries: torch.Tensor, k: int) -> Retrieval:
        B, H, Q, D = queries.shape
        if len(self.rows) != bank.batch_size:
            self.rows = [None] * bank.batch_size
        slots = torch.zeros(B, H, Q, k, dtype=torch.long)
        scores = torch.full((B, H, Q, k), float("-inf"))
        faiss = self.faiss
        for b in range(B):
            n, r = int(bank.num_chunks[b]), self.rows[b]
            if n == 0:
                continue
            if r is None:  # a small row: exact
                order = bank.write_order(b)
                s = queries[b].float() @ bank.row_search_keys(b, order).transpose(-1, -2)  # (Hkv, Q, n)
                top = s.topk(min(k, n), dim=-1)
                scores[b, ..., :top.values.shape[-1]] = top.values.cpu()
                slots[b, ..., :top.indices.shape[-1]] = order[top.indices].cpu()
                continue
            total = r.total
            sel = faiss.IDSelectorRange(total - n, total)  # the live ids: the newest n
            params = (faiss.SearchParametersIVF(sel=sel, nprobe=self.nprobe) if self.kind == "ivf"
                      else faiss.SearchParametersHNSW(sel=sel, efSearch=max(self.ef_search, k)))
            q = queries[b].float().cpu().numpy()  # (Hkv, Q, D)
            for h, index in enumerate(r.indexes):
                dist, ids = index.search(np.ascontiguousarray(q[h]), k, params=params)  # (Q, k) each
                assert ids.shape == (Q, k)
                found = ids >= 0
                scores[b, h] = torch.from_numpy(np.where(found, dist, -np.inf).astype(np.float32))
                slots[b, h] = torch.from_numpy(np.where(found, r.id_slot[np.maximum(ids, 0)], 0))
        dev = queries.device
        scores = scores.to(dev)
        return Retrieval(slots.to(dev), torch.isfinite(scores), scores)
