"""faiss backends (`faiss-ivf`, `faiss-hnsw`): one faiss index per batch row and key/value head.

faiss is an optional dependency (`pip install 'longmem[faiss]'`), imported when such a retriever
is made. A row's chunks get ids in write order; each index holds the vectors of ids
[first, next). FIFO eviction only ever removes the oldest ids, so the chunks a row holds are
exactly the newest `num_chunks` ids and a search is restricted to that id range
(`IDSelectorRange`): an evicted chunk is never returned. Evicted vectors are dropped by a
rebuild once they outnumber the live ones; an IVF index is also retrained once its row has grown
4x past the chunks it was trained on. Rows holding fewer than `min_chunks` chunks are searched
exactly (no index is worth building for them).

IVF lists come from L2 k-means and every chunk goes to its L2-nearest centroid; queries probe the lists whose
centroids have the largest inner product with them (the quantizer is an `IndexFlatIP` over the L2 centroids).
faiss's own inner-product IVF trains spherical k-means (unit-norm centroids), so its lists and probes see only a
key's direction, not its length: on the default model's real keys at the same nprobe (so at the same search cost),
recall@16 went from 0.79 / 0.89 / 0.96 to 0.86 / 0.93 / 0.98 at 65k tokens (nprobe 8 / 16 / 32 of 128 lists) and
from 0.81 / 0.90 to 0.88 / 0.94 at 1M (nprobe 16 / 32 of 512).

HNSW searches by L2 distance after the standard inner-product-to-L2 transform: each key x gets an
extra coordinate sqrt(R^2 - |x|^2) (R: the largest key norm of the index) and each query a 0, so
the nearest keys in L2 are the ones with the largest inner product. An HNSW graph built on inner
products directly navigates badly (recall@16 0.36 vs 0.97 on a head of the default model's real
keys, efSearch 128). A row whose new key is longer than R is rebuilt. Scores are the inner products of
the stored keys, recomputed for the chunks found.

Shapes: Hkv key/value heads, Q queries per head, n chunks, D head dim.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from longmem.errors import LongMemError
from longmem.memory.retrieval import PerRowIndex, Retrieval, ivf_nlist

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

    def __init__(self, indexes: list, slots: np.ndarray, trained_on: int, radii: list[float] | None = None,
                 assigners: list | None = None):
        self.indexes = indexes
        self.radii = radii                    # HNSW: R of each head's index (its largest key norm)
        self.assigners = assigners            # IVF: each head's centroids in an IndexFlatL2 (a chunk's list)
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


def lift(x: np.ndarray, radius: float) -> np.ndarray:
    """keys (n, D) -> (n, D + 1): x with sqrt(R^2 - |x|^2) appended (every |x| <= R), so that
    |q' - x'|^2 = |q|^2 + R^2 - 2 q.x for a query q' = (q, 0): the L2-nearest key is the best inner product."""
    extra = np.sqrt(np.maximum(radius ** 2 - (x.astype(np.float64) ** 2).sum(1), 0)).astype(np.float32)
    return np.ascontiguousarray(np.concatenate([x, extra[:, None]], axis=1))


def add_to_lists(index, assigner, x: np.ndarray, ids: np.ndarray) -> None:
    """Add keys x (n, D) with `ids` (n,) to an IVF index, each in the list of its L2-nearest centroid (`assigner`, an
    IndexFlatL2 over the index's centroids) rather than its inner-product one. (faiss.contrib's `add_preassigned`
    does the same but keeps no reference to `ids`: a temporary array is freed before faiss reads it.)"""
    x = np.ascontiguousarray(x, dtype=np.float32)
    lists = np.ascontiguousarray(assigner.assign(x, 1).reshape(-1), dtype=np.int64)  # (n,)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    faiss = import_faiss()
    index.add_core(len(x), faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(lists))


def norms(x: np.ndarray) -> np.ndarray:
    """(..., D) -> (...) L2 norms, in float64."""
    return np.sqrt((x.astype(np.float64) ** 2).sum(-1))


class FaissRetriever(PerRowIndex):
    """faiss IVF-flat (`kind="ivf"`) or HNSW-flat (`kind="hnsw"`) inner-product search, per row and kv head.

    IVF: `nlist_scale` x sqrt(chunks) lists (`ivf_nlist`) trained by k-means on the row's keys, `nprobe` of them
    searched. HNSW (on the lifted keys, L2): `M` neighbours per node, `ef_search` candidates kept while searching."""

    def __init__(self, kind: str = "ivf", nprobe: int = 32, M: int = 32, ef_search: int = 128,
                 min_chunks: int = 1024, nlist_scale: int = 1):
        assert kind in ("ivf", "hnsw"), kind
        self.faiss = import_faiss()
        self.kind, self.nprobe, self.M, self.ef_search, self.min_chunks = kind, nprobe, M, ef_search, min_chunks
        self.nlist_scale = nlist_scale
        self.name = f"faiss-{kind}"
        super().__init__()

    def fresh(self) -> "FaissRetriever":
        return FaissRetriever(self.kind, self.nprobe, self.M, self.ef_search, self.min_chunks, self.nlist_scale)

    # ---- lifecycle -----------------------------------------------------------------------------
    def _build(self, bank: "MemoryBank", row: int) -> _Row | None:
        n = int(bank.num_chunks[row])
        if n < self.min_chunks:
            return None
        slots = bank.write_order(row)               # (n,) oldest first: ids 0..n-1
        keys = bank.row_search_keys(row, slots)       # (Hkv, n, D) float32
        D = keys.shape[-1]
        faiss, indexes, radii, assigners = self.faiss, [], [], []
        for x in keys.cpu().numpy():
            x = np.ascontiguousarray(x)
            if self.kind == "hnsw":
                radii.append(float(norms(x).max()))
                index = faiss.IndexHNSWFlat(D + 1, self.M)  # L2
                index.add(lift(x, radii[-1]))  # ids are the insertion order, 0..n-1
            else:
                nlist = ivf_nlist(n, self.nlist_scale)
                # L2 k-means with the settings faiss's IVF trains with (10 iterations on at most 256 points per
                # centroid; 25, Kmeans's default, doubles the build for the same recall); min 1 point per centroid:
                # no warning for small rows, they still train fine
                km = faiss.Kmeans(D, nlist, niter=10, min_points_per_centroid=1, seed=1234)
                km.train(x)
                quantizer = faiss.IndexFlatIP(D)  # probing: the centroids with the largest inner product
                quantizer.add(km.centroids)
                index = faiss.IndexIVFFlat(quantizer, D, nlist, faiss.METRIC_INNER_PRODUCT)
                assigners.append(km.index)  # IndexFlatL2 over the centroids
                add_to_lists(index, km.index, x, np.arange(n, dtype=np.int64))
            indexes.append(index)
        return _Row(indexes, slots.cpu().numpy(), trained_on=n, radii=radii or None, assigners=assigners or None)

    def rebuild(self, bank: "MemoryBank") -> None:
        self.faiss.omp_set_num_threads(torch.get_num_threads())
        super().rebuild(bank)

    def _extend(self, r: _Row, bank: "MemoryBank", row: int, slots: torch.Tensor) -> bool:
        n = int(bank.num_chunks[row])
        if r.total + len(slots) > 2 * max(n, self.min_chunks) or (self.kind == "ivf" and n > 4 * r.trained_on):
            return False  # too many evicted ids, or outgrown lists
        first = r.total
        keys = bank.row_search_keys(row, slots).cpu().numpy()  # (Hkv, n', D)
        if r.radii is not None and bool((norms(keys).max(-1) > np.array(r.radii)).any()):
            return False  # a key outside the lifted sphere: lift again
        ids = np.arange(first, first + len(slots), dtype=np.int64)
        for h, (index, x) in enumerate(zip(r.indexes, keys)):
            x = np.ascontiguousarray(x)
            if self.kind == "ivf":
                add_to_lists(index, r.assigners[h], x, ids)
            else:
                index.add(lift(x, r.radii[h]))
        r.append(slots.cpu().numpy())
        return True

    # ---- search --------------------------------------------------------------------------------
    def search(self, bank: "MemoryBank", queries: torch.Tensor, k: int) -> Retrieval:
        B, H, Q, D = queries.shape
        self._sized(bank)
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
                qh = q[h] if self.kind == "ivf" else np.concatenate([q[h], np.zeros((Q, 1), np.float32)], 1)
                dist, ids = index.search(np.ascontiguousarray(qh), k, params=params)  # (Q, k) each; qh (Q, D[+1])
                assert ids.shape == (Q, k)
                found = ids >= 0
                if self.kind == "hnsw":  # L2 distances -> the inner products of the stored keys
                    x = index.reconstruct_batch(np.maximum(ids, 0).ravel())[:, :D].reshape(Q, k, D)
                    dist = np.einsum("qd,qkd->qk", q[h], x)
                scores[b, h] = torch.from_numpy(np.where(found, dist, -np.inf).astype(np.float32))
                slots[b, h] = torch.from_numpy(np.where(found, r.id_slot[np.maximum(ids, 0)], 0))
        dev = queries.device
        scores = scores.to(dev)
        return Retrieval(slots.to(dev), torch.isfinite(scores), scores)
