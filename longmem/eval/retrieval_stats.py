"""`longmem eval retrieval`: what the memory-augmented layer reads on long documents, and how far back.

Each document is read segment by segment exactly as `longmem eval ppl` scores it with memory (the memory
holds every earlier segment up to its capacity; a piece's memory first reads what of the document before it the
memory would hold). For every token, the retrieval of the SideNet's memory layer (the top-k chunks of each query
head) is taken before the segment is written, and counted three ways:

- **distance**: for every query head and retrieved chunk, how far back the chunk lies, d = q - p (q: the token's
  stream position, which is its document position; p: the chunk's first token's). Buckets: below one segment
  length, then the edges of `distance.py` (2k, 8k, 32k); and powers of two, [2^i, 2^(i+1)). The reference is the
  exact expectation for a uniformly random choice of as many held chunks ("uniform").
- **far-reference tokens** (the target does not occur in the local segment but earlier in the document, as in
  `distance.py`): the share for which some retrieved chunk, of any head, contains the target token; against the
  chance that as many distinct held chunks, drawn uniformly at random, contain it (exact: hypergeometric); also
  by how far back the target last occurred (<2k, 2k-8k, 8k-32k, 32k+). Per head, the same for that head's top-k.
- **the gate** per head, sigmoid(g_h): the weight of memory attention in the memory layer's output.

Shapes: H query heads, Hkv key/value heads, G = H // Hkv, n tokens of a segment, k chunks per head, C chunk size,
S chunk slots, m held chunks, nb distance buckets, nl power-of-two bins.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import torch

from longmem.errors import LongMemError
from longmem.eval.common import EvalOptions, data_fingerprint, markdown_table, options_dict
from longmem.eval.distance import BUCKETS as TARGET_BUCKETS, EDGES, bucket_targets, previous_occurrence
from longmem.eval.lanes import Piece, split_document
from longmem.eval.ppl import load_tokenized
from longmem.eval.runner import Item, Plan, Task
from longmem.memory.retrieval import Retrieval

TASK = "retrieval"
LOG2_BINS = 25  # power-of-two distance bins [2^i, 2^(i+1)) for i = 0..24, the last one open-ended


@dataclass
class RetrievalOptions(EvalOptions):
    memory_size: int = field(default=0, metadata={"help": "memory capacity in tokens (0: the model's memory_size)"})
    max_tokens: int = field(default=0, metadata={
        "help": "read only each document's first N tokens, a quicker run (0: whole documents)"})
    min_tokens: int = field(default=0, metadata={
        "help": "only documents of at least N tokens (counted before --max-tokens; --limit then samples among "
                "them): retrieval can only reach far back in long documents (0: every document)"})
    split: str = field(default="dev", metadata={"help": "split of a prepared data folder to read"})
    piece_tokens: int = field(default=0, metadata={
        "help": "documents are read and saved in pieces of this many tokens, rounded up to whole segments "
                "(0: max(32768, 2 x the memory size)); a piece's memory first reads what it would hold"})


# ---- distance buckets -----------------------------------------------------------------------------
def bucket_edges(segment_length: int) -> list[int]:
    """Distance bounds: one segment length (what a window of the trained context reaches), then distance.py's."""
    return [segment_length, *(e for e in EDGES if e > segment_length)]


def bucket_names(edges: list[int]) -> list[str]:
    """[512, 2048, 8192, 32768] -> ['<512', '512-2k', '2k-8k', '8k-32k', '32k+']."""
    def short(n: int) -> str:
        return f"{n // 1024}k" if n % 1024 == 0 else str(n)
    return ([f"<{short(edges[0])}"] + [f"{short(a)}-{short(b)}" for a, b in zip(edges, edges[1:])]
            + [f"{short(edges[-1])}+"])


LOG2_EDGES = [2 ** i for i in range(1, LOG2_BINS)]  # bin i holds distances in [2^i, 2^(i+1)); d >= 1 always


FAR_BUCKETS = TARGET_BUCKETS[1:-1]  # how far back a far reference's target last occurred: '<2k' ... '32k+'
assert TARGET_BUCKETS[0] == "local" and TARGET_BUCKETS[-1] == "never", TARGET_BUCKETS


def far_references(ids: list[int], segment_length: int) -> np.ndarray:
    """(N-1,) per input position t: -1 unless its target ids[t+1] is a far reference (not in the local segment, but
    earlier in the document), else the index in FAR_BUCKETS of how far back the target last occurred."""
    b = bucket_targets(previous_occurrence(ids), segment_length)
    return np.where((b == 0) | (b == len(TARGET_BUCKETS) - 1), -1, b - 1)


# ---- what one segment's retrieval read -------------------------------------------------------------
@dataclass
class Held:
    """A row's retrievable chunks just before a segment is written: what the retrieval's slots point at."""
    slot_position: torch.Tensor  # (S,) stream position of the chunk in each slot (-1: the slot holds none)
    slot_tokens: torch.Tensor    # (S, C) token ids of the chunk in each slot
    positions: torch.Tensor      # (m,) stream positions of the held chunks, ascending
    with_token: torch.Tensor     # (V,) how many held chunks contain each token id


def held_chunks(memory, vocab_size: int, row: int = 0) -> Held:
    order = memory.write_order(row)                       # (m,) slots, oldest first
    positions = memory.chunk_positions(row)               # (m,) ascending, in the same order
    S = memory.token_ids.shape[2]
    slot_position = torch.full((S,), -1, dtype=torch.long)
    slot_position[order.cpu()] = positions
    slot_tokens = memory.token_ids[row, 0].long().cpu()   # (S, C)
    held = slot_tokens[order.cpu()].sort(dim=-1).values   # (m, C) each chunk's tokens, sorted
    first = torch.ones_like(held, dtype=torch.bool)
    first[:, 1:] = held[:, 1:] != held[:, :-1]            # count a token once per chunk
    keep = held[first & (held >= 0)]
    return Held(slot_position, slot_tokens, positions, torch.bincount(keep, minlength=vocab_size))


def hypergeometric_hit(total: torch.Tensor, good: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """P(at least one of `draws` distinct items drawn uniformly from `total` is one of the `good`), elementwise."""
    total, good, draws = (torch.as_tensor(x, dtype=torch.float64) for x in (total, good, draws))
    bad = total - good
    possible = bad >= draws  # otherwise every draw set holds a good one
    # P(miss) = C(bad, draws) / C(total, draws)
    log_miss = (torch.lgamma(bad + 1) - torch.lgamma((bad - draws).clamp(min=0) + 1)
                - torch.lgamma(total + 1) + torch.lgamma(total - draws + 1))
    hit = torch.where(possible, 1 - torch.exp(log_miss), torch.ones_like(log_miss))
    return torch.where(good > 0, hit, torch.zeros_like(hit))  # exactly 0, not rounding noise


def histogram(x: torch.Tensor, weight: torch.Tensor, edges: list[int]) -> torch.Tensor:
    """x (H, ...) values, weight (H, ...) -> (H, len(edges) + 1) summed weight per bin [edge_{i-1}, edge_i)."""
    H = x.shape[0]
    b = torch.bucketize(x.reshape(H, -1), torch.tensor(edges, dtype=x.dtype), right=True)  # (H, *)
    return torch.zeros(H, len(edges) + 1, dtype=weight.dtype).scatter_add_(1, b, weight.reshape(H, -1))


def uniform_histogram(query: torch.Tensor, reads: torch.Tensor, positions: torch.Tensor,
                      edges: list[int]) -> torch.Tensor:
    """Expected histogram of q - p when each token q (n,) reads `reads` (n,) distinct chunks drawn uniformly from the
    held chunks at `positions` (m,) ascending -> (len(edges) + 1,)."""
    m = len(positions)
    e = torch.tensor(edges, dtype=torch.long)
    # chunks with q - p < e, i.e. p > q - e: (n, nb-1); then per bucket, the last one open-ended
    below = m - torch.searchsorted(positions, query[:, None] - e[None, :], right=True)
    below = torch.cat([torch.zeros_like(below[:, :1]), below, torch.full_like(below[:, :1], m)], dim=1)  # (n, nb+1)
    per_token = (below[:, 1:] - below[:, :-1]).double() / m                                               # (n, nb)
    return (reads.double()[:, None] * per_token).sum(0)


@dataclass
class Counts:
    """What a piece's (or a run's) retrievals read, summed. Per-head fields have H rows; `uniform*` is the
    expectation for a uniformly random choice of as many held chunks (the same for every head)."""
    reads: np.ndarray           # (H,) retrieved chunks counted (valid entries)
    hist: np.ndarray            # (H, nb) reads per distance bucket
    log2: np.ndarray            # (H, nl) reads per power-of-two distance bin
    distance_sum: np.ndarray    # (H,) summed distances
    uniform: np.ndarray         # (nb,) per head
    uniform_log2: np.ndarray    # (nl,) per head
    uniform_distance_sum: float
    queries: int                # tokens that had a non-empty memory
    far: np.ndarray             # (nf,) far-reference tokens among them, by FAR_BUCKETS
    far_in_memory: np.ndarray   # (nf,) ... whose target token is in some held chunk
    hits: np.ndarray            # (nf,) ... for which some retrieved chunk (any head) contains the target
    chance: np.ndarray          # (nf,) expected hits for as many distinct random held chunks as each token read
    hits_head: np.ndarray       # (H,) far references for which one of that head's chunks contains the target
    chance_head: np.ndarray     # (H,) expected hits for k random held chunks

    @classmethod
    def zero(cls, heads: int, buckets: int) -> "Counts":
        z = np.zeros
        nf = len(FAR_BUCKETS)
        return cls(z(heads, np.int64), z((heads, buckets), np.int64), z((heads, LOG2_BINS), np.int64), z(heads),
                   z(buckets), z(LOG2_BINS), 0.0, 0, z(nf, np.int64), z(nf, np.int64), z(nf, np.int64), z(nf),
                   z(heads, np.int64), z(heads))

    def __add__(self, other: "Counts") -> "Counts":
        return Counts(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def to_json(self) -> dict:
        return {f.name: (v.tolist() if isinstance(v := getattr(self, f.name), np.ndarray) else v) for f in fields(self)}

    @classmethod
    def from_json(cls, d: dict) -> "Counts":
        z = cls.zero(1, 1)
        return cls(**{f.name: np.asarray(d[f.name], dtype=getattr(z, f.name).dtype)
                      if isinstance(getattr(z, f.name), np.ndarray) else d[f.name] for f in fields(cls)})


def segment_counts(found: Retrieval, held: Held, start: int, targets: torch.Tensor, far: torch.Tensor,
                   groups: int, edges: list[int]) -> Counts:
    """Counts of one segment of row 0: `found` the memory layer's retrieval for its tokens at stream positions
    start, start+1, ...; `held` the memory it searched; targets (n,) each token's next token; far (n,) its
    `far_references` entry. n may be less than the segment's tokens (the rest is not counted)."""
    _, Hkv, Q, k = found.slots.shape
    T, H, n = Q // groups, Hkv * groups, len(targets)
    # query head h = kv*G + g reads kv head kv's query (g*T + t): (Hkv, G*T, k) -> (H, T, k)
    slots = found.slots[0].cpu().view(Hkv, groups, T, k).reshape(H, T, k)[:, :n]  # (H, n, k)
    valid = found.valid[0].cpu().view(Hkv, groups, T, k).reshape(H, T, k)[:, :n]  # (H, n, k)
    slots = torch.where(valid, slots, 0)
    position = held.slot_position[slots]                                       # (H, n, k)
    assert bool((position[valid] >= 0).all()), "a retrieved slot that holds no chunk"
    query = start + torch.arange(n)                                            # (n,)
    dist = query[None, :, None] - position                                     # (H, n, k)
    w = valid.long()
    reads = valid.sum(-1)                                                      # (H, n) chunks each head read

    contains = (held.slot_tokens[slots] == targets[None, :, None, None]).any(-1) & valid  # (H, n, k)
    hit_head = contains.any(-1)                                                # (H, n)
    union = torch.where(valid, slots, -1).permute(1, 0, 2).reshape(n, H * k).sort(-1).values  # (n, H*k)
    new = torch.ones_like(union, dtype=torch.bool)
    new[:, 1:] = union[:, 1:] != union[:, :-1]
    distinct = (new & (union >= 0)).sum(-1)                                    # (n,) distinct chunks read
    m = len(held.positions)
    good = held.with_token[targets]                                            # (n,) held chunks with the target
    nf = len(FAR_BUCKETS)
    is_far = far >= 0
    by_far = far.clamp(min=0)                                                  # (n,) FAR_BUCKETS index

    def per_far(x):  # (n,) values -> (nf,) sums over the far references of each bucket
        return torch.zeros(nf, dtype=x.dtype).scatter_add_(0, by_far[is_far], x[is_far]).numpy()

    per_head = reads.double().mean(0)                                          # (n,) reads of a head, on average
    uniform = uniform_histogram(query, per_head, held.positions, edges)
    uniform_log2 = uniform_histogram(query, per_head, held.positions, LOG2_EDGES)
    mean_distance = query.double() - held.positions.double().mean()            # (n,) over the held chunks
    return Counts(
        reads=reads.sum(-1).numpy(),
        hist=histogram(dist, w, edges).numpy(),
        log2=histogram(dist, w, LOG2_EDGES).numpy(),
        distance_sum=(dist * w).sum((1, 2)).double().numpy(),
        uniform=uniform.numpy(), uniform_log2=uniform_log2.numpy(),
        uniform_distance_sum=float((per_head * mean_distance).sum()),
        queries=n, far=per_far(torch.ones(n, dtype=torch.long)), far_in_memory=per_far((good > 0).long()),
        hits=per_far(hit_head.any(0).long()), chance=per_far(hypergeometric_hit(m, good, distinct)),
        hits_head=(is_far[None] & hit_head).sum(-1).numpy(),
        chance_head=hypergeometric_hit(m, good[None], reads)[:, is_far].sum(-1).numpy(),
    )


# ---- the task -----------------------------------------------------------------------------------------
def gate_of(model) -> torch.Tensor:
    """(H,) sigmoid of the memory layer's gate parameter: the weight of memory attention per query head."""
    layer = model.sidenet.layers[model.sidenet.memory_layer]
    return torch.sigmoid(layer.gate.detach().float().cpu())


def summarize(counts: Counts, docs: int, tokens: int, gate: torch.Tensor, resolved: dict) -> dict:
    def share(x, total):
        return (np.asarray(x, dtype=float) / total).tolist() if total else None

    def ratio(a, b):
        return a / b if b else None

    c, H = counts, len(counts.reads)
    in_memory = int(c.far_in_memory.sum())
    per_head_reads = float(c.uniform.sum())  # expected reads per head = actual reads per head
    heads = [{"reads": int(c.reads[h]), "share": share(c.hist[h], c.reads[h]),
              "log2_share": share(c.log2[h], c.reads[h]), "mean": ratio(float(c.distance_sum[h]), int(c.reads[h])),
              "far_hits": int(c.hits_head[h]), "far_share": ratio(int(c.hits_head[h]), in_memory),
              "far_chance_share": ratio(float(c.chance_head[h]), in_memory),
              "far_lift": ratio(int(c.hits_head[h]), float(c.chance_head[h]))} for h in range(H)]

    def far(i):  # far references of FAR_BUCKETS[i], or all of them (i = slice(None))
        n, held, hits, chance = (int(c.far[i].sum()), int(c.far_in_memory[i].sum()), int(c.hits[i].sum()),
                                 float(c.chance[i].sum()))
        return {"tokens": n, "in_memory": held, "hits": hits, "share": ratio(hits, n),
                "share_in_memory": ratio(hits, held), "chance_share_in_memory": ratio(chance, held),
                "lift": ratio(hits, chance)}

    reads = int(c.reads.sum())
    return {
        "docs": docs, "tokens": tokens, "queries": c.queries, **resolved, "heads": H,
        "distance": {
            "all": {"reads": reads, "counts": c.hist.sum(0).tolist(), "share": share(c.hist.sum(0), reads),
                    "log2_counts": c.log2.sum(0).tolist(), "log2_share": share(c.log2.sum(0), reads),
                    "mean": ratio(float(c.distance_sum.sum()), reads)},
            "uniform": {"share": share(c.uniform, per_head_reads), "log2_share": share(c.uniform_log2, per_head_reads),
                        "mean": ratio(c.uniform_distance_sum, per_head_reads)},
        },
        "far": {**far(slice(None)), "by_distance": {name: far(i) for i, name in enumerate(FAR_BUCKETS) if c.far[i]}},
        "per_head": heads,
        "gate": gate.tolist(),
    }


def pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def tokens_text(x: float | None) -> str:
    return "" if x is None else f"{x:,.0f}"


def table(summary: dict) -> str:
    names, dist, far = summary["buckets"], summary["distance"], summary["far"]
    n = len(names)

    def cells(share):  # one cell per bucket that any row or the uniform reference reaches
        return [pct(None if share is None else share[i]) for i in used]

    reached = [dist["all"]["counts"], [0] * n if dist["uniform"]["share"] is None else dist["uniform"]["share"]]
    used = [i for i in range(n) if any(r[i] for r in reached)]
    header = ["reads by", "gate σ(g)", "reads", *(f"{names[i]} %" for i in used), "mean distance"]
    rows = [[f"head {h}", f"{summary['gate'][h]:.3f}", f"{p['reads']:,}", *cells(p["share"]), tokens_text(p["mean"])]
            for h, p in enumerate(summary["per_head"])]
    a, u = dist["all"], dist["uniform"]
    rows.append(["all heads", f"{np.mean(summary['gate']):.3f} (mean)", f"{a['reads']:,}", *cells(a["share"]),
                 tokens_text(a["mean"])])
    rows.append(["chance: uniform over the held chunks", "", "", *cells(u["share"]), tokens_text(u["mean"])])

    def lift(x):
        return "" if x is None else f"{x:.2f}"

    def far_row(label, f):
        return [label, f"{f['in_memory']:,}", pct(f["share_in_memory"]), pct(f["chance_share_in_memory"]),
                lift(f["lift"])]

    far_rows = [far_row("any head (all heads' chunks)", far)]
    far_rows += [far_row(f"any head, target last seen {name} back", f) for name, f in far["by_distance"].items()]
    far_rows += [[f"head {h} (its top {summary['topk_chunks']})", f"{far['in_memory']:,}", pct(p["far_share"]),
                  pct(p["far_chance_share"]), lift(p["far_lift"])] for h, p in enumerate(summary["per_head"])]
    return "\n\n".join([
        f"where the retrieved chunks lie: share of reads (%) by how far back the chunk starts from the reading token "
        f"(memory {summary['memory_size']:,} tokens, segments of {summary['segment_length']}, top "
        f"{summary['topk_chunks']} chunks of {summary['chunk_size']} tokens per head; {summary['queries']:,} tokens "
        f"read memory)",
        markdown_table(header, rows),
        f"far-reference tokens (target not in the local segment, but earlier in the document): {far['tokens']:,}, "
        f"of which {far['in_memory']:,} have the target in some held chunk; the share of those for which a retrieved "
        f"chunk contains the target, against as many distinct held chunks drawn at random (chance)",
        markdown_table(["retrieved by", "tokens with the target in memory", "contains the target %", "chance %",
                        "ratio to chance"], far_rows),
    ])


class RetrievalTask(Task):
    name, unit = TASK, "tok"

    def check(self):
        opts = self.opts
        for flag in ("max_tokens", "min_tokens", "piece_tokens", "memory_size"):
            if getattr(opts, flag) < 0:
                raise LongMemError(f"--{flag.replace('_', '-')} {getattr(opts, flag)} must be 0 (the default) or "
                                   f"positive")

    def plan(self) -> Plan:
        opts, c = self.opts, self.model.config
        T, C = c.segment_length, c.chunk_size
        self.memory_size = opts.memory_size or c.memory_size
        if self.memory_size % C:
            raise LongMemError(f"--memory-size {self.memory_size} is not a multiple of the model's chunk_size {C}")
        piece = -(-(opts.piece_tokens or max(32768, 2 * self.memory_size)) // T) * T
        self.edges = bucket_edges(T)
        self.resolved = {"memory_size": self.memory_size, "segment_length": T, "chunk_size": C,
                         "topk_chunks": c.topk_chunks, "buckets": bucket_names(self.edges), "bucket_edges": self.edges,
                         "log2_edges": LOG2_EDGES}
        docs = load_tokenized(opts.data, opts.split, self.tok, opts.limit, opts.seed, opts.max_tokens,
                              opts.min_tokens)
        items, self.far = [], {}
        for doc_id, _, ids in docs:
            self.far[doc_id] = torch.from_numpy(far_references(ids, T))
            items += [Item(p.key, p.targets, (doc_id, p)) for p in split_document(doc_id, torch.tensor(ids), piece, T)]
        self.docs, self.tokens = len(docs), sum(len(ids) - 1 for _, _, ids in docs)
        config = options_dict(opts, memory_size=self.memory_size, piece_tokens=piece)
        intro = (f"retrieval: {len(docs)} documents, {self.tokens:,} tokens in {len(items)} pieces of up to "
                 f"{piece:,}; memory {self.memory_size:,}")
        return Plan(config, data_fingerprint(f"{i}\n{text}" for i, text, _ in docs), items, intro)

    def evaluate(self, todo, result, bar):
        for item in todo:
            doc_id, piece = item.data
            counts = self.read_piece(piece, self.far[doc_id], bar.update)
            result.add(item.key, {"doc": doc_id, "start": piece.start, "tokens": piece.targets, **counts.to_json()})

    def read_piece(self, piece: Piece, far: torch.Tensor, step) -> Counts:
        """Read one piece segment by segment, counting each segment's retrieval before it is written."""
        model, T = self.model, self.model.config.segment_length
        H = model.adapter.num_heads
        memory = model.new_memory(1, memory_size=self.memory_size)
        G = H // memory.spec.num_kv_heads
        vocab = model.adapter.lm_head.weight.shape[0]
        ids = piece.ids
        if piece.start:
            model.memorize(ids[:piece.start].to(model.device)[None], memory)
        total = Counts.zero(H, len(self.edges) + 1)
        for s in range(piece.start, piece.end, T):  # inputs [start, end) all have a target
            e = min(s + T, piece.end)
            held = held_chunks(memory, vocab) if len(memory) else None
            out = model(ids[s:e].to(model.device)[None], memory=memory)  # retrieves, then writes the segment
            if out.retrieval is not None:
                total = total + segment_counts(out.retrieval, held, s, ids[s + 1:e + 1], far[s:e], G, self.edges)
            step(e - s)
        return total

    def summarize(self, details):
        H = self.model.adapter.num_heads
        counts = sum((Counts.from_json(d) for d in details), Counts.zero(H, len(self.edges) + 1))
        summary = summarize(counts, self.docs, self.tokens, gate_of(self.model), self.resolved)
        return summary, table(summary)

    def notes(self, summary):
        far = summary["far"]
        if far["lift"] is None:
            return ["no far-reference token had its target in memory"]
        return [f"far-reference tokens with the target in memory: a retrieved chunk contains it for "
                f"{pct(far['share_in_memory'])}% of them, {far['lift']:.2f}x the chance of as many random held chunks "
                f"({pct(far['chance_share_in_memory'])}%)"]


def run(opts: RetrievalOptions) -> dict:
    """Read the documents of `opts.data` with memory and count what retrieval reads; resumable; returns the summary."""
    return RetrievalTask(opts).run()
