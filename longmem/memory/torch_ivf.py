"""`torch-ivf`: an inverted-file index in plain torch, on the bank's device (GPU without faiss).

Per batch row and key/value head, L2 k-means centroids (`nlist_scale` x sqrt(chunks), `ivf_nlist`)
partition the chunk slots into lists (each chunk in its nearest centroid's). Every written slot is
(re)assigned to its nearest centroid when written, so an overwritten (evicted) chunk leaves its
old list at once: the lists only ever hold the row's current chunks. A query scores the
centroids by inner product, takes the `nprobe` best lists, and scores every chunk in them exactly: the
result is the top-k over the union of its probed lists. The search goes list by list: the queries
that probe a list are scored against its chunks in one matmul and keep their top k there, and
each query's final top k is taken over its P lists' candidates (the top k of a union lie in the
top k of its parts). Each list's slots (its members, grouped by a sort of the assignments) are
regrouped after writes on the next search. A row is retrained once it has grown 4x past the chunks
it was trained on; rows holding fewer than `min_chunks` chunks are searched exactly.

Shapes: Hkv key/value heads, Q queries per head, L lists, P probes, S slots, D dim.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from longmem.memory.retrieval import PerRowIndex, Retrieval, ivf_nlist

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
        self.lists: tuple[torch.Tensor, list] | None = None  # members grouped by list (see `_lists`); None = stale


class TorchIVFRetriever(PerRowIndex):
    """Inverted-file search in torch: `nprobe` of `nlist_scale` x sqrt(chunks) lists searched exactly per query."""
    name = "torch-ivf"

    def __init__(self, nprobe: int = 32, min_chunks: int = 1024, nlist_scale: int = 1):
        self.nprobe, self.min_chunks, self.nlist_scale = nprobe, min_chunks, nlist_scale
        super().__init__()

    def fresh(self) -> "TorchIVFRetriever":
        return TorchIVFRetriever(self.nprobe, self.min_chunks, self.nlist_scale)

    # ---- lifecycle -----------------------------------------------------------------------------
    def _build(self, bank: "MemoryBank", row: int) -> _Row | None:
        n = int(bank.num_chunks[row])
        if n < self.min_chunks:
            return None
        keys = bank.row_search_keys(row, torch.arange(n, device=bank.device))  # (Hkv, n, D) slots 0..n-1
        cent = kmeans(keys, ivf_nlist(n, self.nlist_scale))
        assign = torch.zeros(keys.shape[0], bank.max_chunks, dtype=torch.long, device=bank.device)
        assign[:, :n] = nearest(keys, cent)
        return _Row(cent, assign, trained_on=n)

    def _extend(self, r: _Row, bank: "MemoryBank", row: int, slots: torch.Tensor) -> bool:
        if int(bank.num_chunks[row]) > 4 * r.trained_on:
            return False  # outgrown lists
        keys = bank.row_search_keys(row, slots)                                # (Hkv, n', D)
        r.assign[:, slots] = nearest(keys, r.centroids)                       # the new chunks' lists
        r.lists = None
        return True

    def _lists(self, r: _Row, n: int) -> tuple[torch.Tensor, list]:
        """The live slots 0..n-1 grouped by list: (Hkv, n) slots sorted by list, and per head the (L + 1) offsets
        of each list's run in it (a Python list, read once per search)."""
        if r.lists is None:
            L = r.centroids.shape[1]
            assign = r.assign[:, :n]                                       # (Hkv, n)
            order = assign.argsort(dim=-1, stable=True)                    # (Hkv, n) slots grouped by list
            counts = torch.stack([a.bincount(minlength=L) for a in assign])  # (Hkv, L)
            offsets = torch.cat([counts.new_zeros(len(counts), 1), counts.cumsum(-1)], dim=1)  # (Hkv, L + 1)
            r.lists = order, offsets.tolist()
        return r.lists

    # ---- search --------------------------------------------------------------------------------
    def search(self, bank: "MemoryBank", queries: torch.Tensor, k: int) -> Retrieval:
        B, H, Q, D = queries.shape
        self._sized(bank)
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
            order, offsets = self._lists(r, n)
            L = r.centroids.shape[1]
            P = min(self.nprobe, L)
            probes = (q.float() @ r.centroids.transpose(1, 2)).topk(P, dim=-1).indices  # (Hkv, Q, P)
            kk = min(k, n)
            for h in range(H):
                top_s, top_i = _probed_topk(q[h], keys[h], probes[h], order[h], offsets[h], kk)  # (Q, kk) each
                scores[b, h, :, :kk] = top_s
                slots[b, h, :, :kk] = top_i
        return Retrieval(slots, torch.isfinite(scores), scores)


def _probed_topk(q: torch.Tensor, keys: torch.Tensor, probes: torch.Tensor, order: torch.Tensor, offsets: list,
                 k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One head: q (Q, D), keys (n, D), probes (Q, P) lists, order (n,) slots grouped by list with run `offsets`
    (L + 1) -> float32 scores and slots (Q, k) of the top k over each query's probed lists (-inf / 0 past what
    they hold)."""
    Q, P = probes.shape
    pairs = probes.flatten()                                    # (Q*P,) list of each (query, probe) pair
    by_list = pairs.argsort(stable=True)                        # (Q*P,) pairs grouped by list
    starts = torch.cat([pairs.new_zeros(1), pairs.bincount(minlength=len(offsets) - 1).cumsum(0)]).tolist()
    cand_s = torch.full((Q * P, k), float("-inf"), device=q.device)       # each pair's best k in its list
    cand_i = torch.zeros(Q * P, k, dtype=torch.long, device=q.device)
    for l in range(len(offsets) - 1):
        if starts[l] == starts[l + 1] or offsets[l] == offsets[l + 1]:
            continue
        sel = by_list[starts[l]:starts[l + 1]]                  # (m,) pairs probing list l
        members = order[offsets[l]:offsets[l + 1]]              # (c,) its slots
        s = (q[sel // P] @ keys[members].T).float()             # (m, c)
        top = s.topk(min(k, s.shape[1]), dim=-1)
        cand_s[sel, :top.values.shape[1]] = top.values
        cand_i[sel, :top.values.shape[1]] = members[top.indices]
    top = cand_s.view(Q, P * k).topk(k, dim=-1)                 # (Q, k) over the P lists' candidates
    return top.values, cand_i.view(Q, P * k).gather(1, top.indices)
