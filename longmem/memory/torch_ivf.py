"""`torch-ivf`: an inverted-file index in plain torch, on the bank's device (GPU without faiss).

Per batch row and key/value head, L2 k-means centroids (`nlist` = sqrt(chunks), at least 16)
partition the chunk slots into lists (each chunk in its nearest centroid's). Every written slot is
(re)assigned to its nearest centroid when written, so an overwritten (evicted) chunk leaves its
old list at once: the lists only ever hold the row's current chunks. A query scores the
centroids by inner product, takes the `nprobe` best lists, and scores every chunk in them exactly. The lists are
laid out as a padded (Hkv, nlist, M) slot table, rebuilt after writes on the next search. A row
is retrained once it has grown 4x past the chunks it was trained on; rows holding fewer than
`min_chunks` chunks are searched exactly.

Shapes: Hkv key/value heads, Q queries per head, L lists, M longest list, P probes, S slots, D dim.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from longmem.memory.retrieval import Retrieval, Retriever

if TYPE_CHECKING:
    from longmem.memory.bank import MemoryBank


def nearest(x: torch.Tensor, cent: torch.Tensor) -> torch.Tensor:
    """x (Hkv, n, D), centroids (Hkv, L, D) -> (Hkv, n) the nearest centroid in L2 (argmax of x.c - |c|^2/2)."""
    return (x.float() @ cent.transpose(1, 2) - 0.5 * cent.pow(2).sum(-1)[:, None, :]).argmax(-1)


def kmeans(x: torch.Tensor, nlist: int, iters: int = 10, seed: int = 0) -> torch.Tensor:
    """x (Hkv, n, D) float32 -> centroids (Hkv, nlist, D): L2 k-means per head. Centroids start at random points;
    a list left empty keeps its previous centroid."""
    H, n, D = x.shape
    g = torch.Generator().manual_seed(seed)
    cent = x[:, torch.randperm(n, generator=g)[:nlist].to(x.device)].clone()  # (Hkv, L, D)
    for _ in range(iters):
        assign = nearest(x, cent)                                            # (Hkv, n)
        sums = torch.zeros_like(cent).scatter_add_(1, assign[..., None].expand(-1, -1, D), x)
        counts = torch.zeros(H, nlist, device=x.device).scatter_add_(1, assign, torch.ones_like(assign, dtype=x.dtype))
        cent = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], cent)
    return cent


class _Row:
    def __init__(self, centroids: torch.Tensor, assign: torch.Tensor, trained_on: int):
        self.centroids = centroids  # (Hkv, L, D) float32
        self.assign = assign        # (Hkv, slots) list of each slot (slots past num_chunks unused)
        self.trained_on = trained_on
        self.table: torch.Tensor | None = None  # (Hkv, L, M) slots of each list, -1 padded; None = stale


class TorchIVFRetriever(Retriever):
    """Inverted-file search in torch: `nprobe` lists of sqrt(chunks) searched exactly per query."""
    name = "torch-ivf"

    def __init__(self, nprobe: int = 32, min_chunks: int = 1024, max_elements: int = 1 << 25):
        self.nprobe, self.min_chunks, self.max_elements = nprobe, min_chunks, max_elements
        self.rows: list[_Row | None] = []

    def fresh(self) -> "TorchIVFRetriever":
        return TorchIVFRetriever(self.nprobe, self.min_chunks, self.max_elements)

    # ---- lifecycle -----------------------------------------------------------------------------
    def _build(self, bank: "MemoryBank", row: int) -> _Row | None:
        n = int(bank.num_chunks[row])
        if n < self.min_chunks:
            return None
        keys = bank.row_search_keys(row, torch.arange(n, device=bank.device))  # (Hkv, n, D) slots 0..n-1
        cent = kmeans(keys, max(16, int(math.sqrt(n))))
        assign = torch.zeros(keys.shape[0], bank.max_chunks, dtype=torch.long, device=bank.device)
        assign[:, :n] = nearest(keys, cent)
        return _Row(cent, assign, trained_on=n)

    def rebuild(self, bank: "MemoryBank") -> None:
        self.rows = [self._build(bank, b) for b in range(bank.batch_size)]

    def reset(self, bank: "MemoryBank", rows: torch.Tensor | None) -> None:
        for b in range(bank.batch_size) if rows is None else rows.tolist():
            self.rows[b] = None

    def added(self, bank: "MemoryBank", row: int, slots: torch.Tensor) -> None:
        if len(self.rows) != bank.batch_size:  # a new bank's first write
            self.rows = [None] * bank.batch_size
        r, n = self.rows[row], int(bank.num_chunks[row])
        if r is None or n > 4 * r.trained_on:
            self.rows[row] = self._build(bank, row)
            return
        keys = bank.row_search_keys(row, slots)                                # (Hkv, n', D)
        r.assign[:, slots] = nearest(keys, r.centroids)                       # the new chunks' lists
        r.table = None

    def _table(self, r: _Row, n: int) -> torch.Tensor:
        """(Hkv, L, M) the slots of each list, -1 padded."""
        if r.table is None:
            H, L = r.centroids.shape[:2]
            assign = r.assign[:, :n]                                     # (Hkv, n) live slots 0..n-1
            order = assign.argsort(dim=-1, stable=True)                  # (Hkv, n) slots grouped by list
            counts = torch.zeros(H, L, dtype=torch.long, device=assign.device).scatter_add_(
                1, assign, torch.ones_like(assign))                      # (Hkv, L)
            starts = counts.cumsum(-1) - counts                          # (Hkv, L) first index of each list
            rank = torch.arange(n, device=assign.device) - starts.gather(1, assign.gather(1, order))  # place in list
            table = torch.full((H, L, int(counts.max())), -1, dtype=torch.long, device=assign.device)
            lists = assign.gather(1, order)                              # (Hkv, n) list of each sorted slot
            table[torch.arange(H, device=assign.device)[:, None], lists, rank] = order
            r.table = table
        return r.table

    # ---- search --------------------------------------------------------------------------------
    def search(self, bank: "MemoryBank", queries: torch.Tensor, k: int) -> Retrieval:
        B, H, Q, D = queries.shape
        if len(self.rows) != bank.batch_size:
            self.rows = [None] * bank.batch_size
        dev = queries.device
        slots = torch.zeros(B, H, Q, k, dtype=torch.long, device=dev)
        scores = torch.full((B, H, Q, k), float("-inf"), device=dev)
        keys_all = bank.search_keys(bank.slots_in_use)  # (B, Hkv, S, D)
        dtype = keys_all.dtype if keys_all.device.type != "cpu" or keys_all.dtype != torch.float16 else torch.float32
        for b in range(B):
            n, r = int(bank.num_chunks[b]), self.rows[b]
            if n == 0:
                continue
            keys = keys_all[b, :, :n].to(dtype)  # (Hkv, n, D)
            q = queries[b].to(dtype)             # (Hkv, Q, D)
            if r is None:  # a small row: exact
                top = (q @ keys.transpose(1, 2)).topk(min(k, n), dim=-1)
                scores[b, ..., :top.values.shape[-1]] = top.values.float()
                slots[b, ..., :top.indices.shape[-1]] = top.indices
                continue
            table = self._table(r, n)                                        # (Hkv, L, M)
            L, M = table.shape[1:]
            P = min(self.nprobe, L)
            probes = (q.float() @ r.centroids.transpose(1, 2)).topk(P, dim=-1).indices  # (Hkv, Q, P)
            qb = max(1, self.max_elements // (H * P * M * D))
            hidx = torch.arange(H, device=dev)[:, None, None]
            for s in range(0, Q, qb):
                cand = table[hidx, probes[:, s:s + qb]].flatten(2)           # (Hkv, q, P*M) slots, -1 pad
                ck = keys[hidx, cand.clamp_min(0)]                           # (Hkv, q, P*M, D)
                sc = torch.einsum("hqd,hqcd->hqc", q[:, s:s + qb], ck).float()
                sc.masked_fill_(cand < 0, float("-inf"))
                kk = min(k, sc.shape[-1])
                top = sc.topk(kk, dim=-1)
                scores[b, :, s:s + qb, :kk] = top.values
                slots[b, :, s:s + qb, :kk] = cand.gather(-1, top.indices).clamp_min(0)
        return Retrieval(slots, torch.isfinite(scores), scores)
