"""`longmem eval ppl`: long-document perplexity, LongMem against its frozen backbone (the paper's
long-context language modelling experiment; results in the README, Evaluation).

Every document is cut into segments of the model's `segment_length` and every token but the
first is scored exactly once (`scoring.score_document`). All rows score the same targets:

- the frozen backbone on its local segment only;
- the frozen backbone with a sliding window: each token predicted from up to `--window`
  previous tokens (itself included), computed in strided chunks (`SlidingWindowScorer`);
- LongMem with its memory disabled;
- LongMem with a memory of every earlier segment, one row per size in `--memory-sizes`
  (the paper's memory-size ablation in one run). The memory never holds the scored tokens.

Documents are scored in pieces of whole segments, `--batch-size` pieces at a time as one batch
(`lanes.score_pieces`: a lane that finishes takes the next piece; a piece's memory first reads
what of the document before it the memory would hold, unless the lane has just scored the piece
before it). A piece's result is saved as soon as it is done, so an interrupted run resumes losing
at most the pieces in flight, and its numbers equal scoring each document alone, in order.

Every row but the sliding window's first call per segment reads the same frozen backbone pass:
each segment runs the backbone once (`scoring.Segment`, `model.backbone_forward`), and the
backbone row, LongMem without memory, every memory row and the window's whole-segment calls
take what they need from it, with the numbers each would get on its own. Per segment of the
default rows that is 2 backbone runs instead of 5.

Perplexity is token-weighted, overall, per document-length bucket, and per distance bucket: how
far back each scored token (or word) last occurred in its document (`distance`). The summary also
records the process's peak RSS and the memory banks' storage, which is bounded by the memory
capacity, not by the document length.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from longmem.errors import LongMemError
from longmem.eval.common import EvalOptions, data_fingerprint, markdown_table, options_dict, parse_list, peak_rss_mib
from longmem.eval.distance import BUCKETS as DISTANCES, VIEWS, distance_buckets
from longmem.eval.lanes import Piece, score_pieces, split_document
from longmem.eval.runner import Item, Plan, Task
from longmem.eval.scoring import BackboneScorer, LocalScorer, MemoryScorer, Scorer

TASK = "ppl"
BUCKETS = [("<8k", 8 * 1024), ("8k-32k", 32 * 1024), ("32k-128k", 128 * 1024), (">128k", None)]  # (name, upper bound)


@dataclass
class PplOptions(EvalOptions):
    memory_sizes: str = field(default="", metadata={
        "help": "comma-separated memory capacities in tokens, one LongMem row each, e.g. 8192,16384,32768,65536 "
                "(default: the model's memory_size)"})
    window: int = field(default=0, metadata={
        "help": "sliding-window baseline: the backbone predicts each token from up to this many tokens "
                "(0: segment_length, the context LongMem was trained with; pass the backbone's own trained "
                "context length if it is longer)"})
    stride: int = field(default=0, metadata={
        "help": "sliding-window baseline: tokens scored per backbone call (0: min(segment_length, window/2))"})
    max_doc_tokens: int = field(default=0, metadata={
        "help": "score only each document's first N tokens, a quicker run (0: whole documents)"})
    split: str = field(default="dev", metadata={"help": "split of a prepared data folder to evaluate"})
    batch_size: int = field(default=0, metadata={
        "help": "document pieces scored side by side in one batch (0: 1 on a CPU, where batching measured no "
                "faster per token, 8 on a GPU); with float32 memories the numbers do not depend on it, with 16-bit "
                "ones near-tied retrieval scores can round differently in a batch and pick other chunks"})
    piece_tokens: int = field(default=0, metadata={
        "help": "documents are scored and saved in pieces of this many tokens, rounded up to whole segments "
                "(0: max(32768, 2 x the largest memory size)); a piece's memory first reads what it would hold"})


# ---- small shared helpers -----------------------------------------------------------------------
def sample(items: list, limit: int | None, seed: int) -> list:
    """At most `limit` items, a seeded random choice kept in the original order."""
    if limit is None or limit >= len(items):
        return items
    if limit < 1:
        raise LongMemError(f"--limit {limit} must be at least 1")
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def bucket_of(num_tokens: int) -> str:
    """The document-length bucket of a document of `num_tokens` tokens."""
    for name, upper in BUCKETS:
        if upper is None or num_tokens < upper:
            return name
    raise AssertionError("unreachable")


def max_positions(model) -> int | None:
    cfg = model.backbone.config
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


# ---- the sliding-window baseline -----------------------------------------------------------------
class SlidingWindowScorer(Scorer):
    """The frozen backbone predicting each token from up to `window` tokens (itself included).

    A segment x is scored in pieces of `stride` tokens; each piece is fed after the
    `window - stride` tokens before it, so every prediction sees between `window - stride + 1`
    and `window` tokens (fewer only at the start of the document) and is made exactly once.
    Lanes whose history and piece have the same lengths run as one batch (no padding inside a call).
    A call whose input is exactly the lane's whole segment (with the defaults, window = T and
    stride = T/2, the second of every segment's two calls) is the backbone pass the other rows share:
    its logits are taken from it (`Segment.backbone_logits`) instead of being computed again.
    """
    name = "backbone_window"

    def __init__(self, model, window: int, stride: int, lanes: int = 1):
        super().__init__(model, lanes)
        assert 1 <= stride <= window, (stride, window)
        self.window, self.stride = window, stride
        self.history = [torch.zeros(0, dtype=torch.long, device=model.device) for _ in range(lanes)]

    def _keep(self, ids: torch.Tensor) -> torch.Tensor:  # (n,) -> (<= window - stride,)
        return ids[max(0, len(ids) - (self.window - self.stride)):]

    def start(self, lane, prefix, show_progress=False, continued=False):
        self.history[lane] = self._keep(prefix.to(self.model.device))

    def logits(self, segment):
        x, mask = segment.x, segment.mask  # (B, T) each
        B, T = x.shape
        out = None
        for s in range(0, T, self.stride):
            groups: dict[tuple[int, int], list[int]] = {}
            pieces = [x[b, s:s + self.stride][mask[b, s:s + self.stride].bool()] for b in range(B)]  # real tokens
            for b, piece in enumerate(pieces):
                if len(piece):
                    groups.setdefault((len(self.history[b]), len(piece)), []).append(b)
            for (h, t), lanes in groups.items():
                inputs = torch.stack([torch.cat([self.history[b], pieces[b]]) for b in lanes])  # (n, h + t)
                if h == s and h + t == T:  # inputs == x[lanes]: the history is the segment's own first s tokens
                    logits = segment.backbone_logits[lanes, s:s + t]                        # (n, t, V)
                else:  # the backbone's LM head on the last t positions only (the logits of the others unused)
                    hidden = self.model.backbone.base_model(input_ids=inputs, use_cache=False).last_hidden_state
                    logits = self.model.adapter.lm_head(hidden[:, -t:])                     # (n, t, V)
                if out is None:
                    out = logits.new_zeros(B, T, logits.shape[-1])
                out[lanes, s:s + t] = logits
                for i, b in enumerate(lanes):
                    self.history[b] = self._keep(inputs[i])
        return out


# ---- the task ---------------------------------------------------------------------------------------
@dataclass
class Row:
    key: str
    label: str
    make: object  # (lanes) -> Scorer


def build_rows(model, memory_sizes: list[int], window: int, stride: int) -> list[Row]:
    T = model.config.segment_length
    rows = [Row("backbone", f"frozen backbone, local segment ({T})", lambda n: BackboneScorer(model, n)),
            Row("backbone_window", f"frozen backbone, sliding window ({window}, stride {stride})",
                lambda n: SlidingWindowScorer(model, window, stride, n)),
            Row("longmem_no_memory", "LongMem, memory disabled", lambda n: LocalScorer(model, n))]
    for m in memory_sizes:
        rows.append(Row(f"longmem_memory_{m}", f"LongMem, memory {m:,}", lambda n, m=m: MemoryScorer(model, m, n)))
    return rows


def resolve(opts: PplOptions, model) -> dict:
    """The options the numbers depend on, with every default filled in from the model."""
    c = model.config
    T, C = c.segment_length, c.chunk_size
    sizes = parse_list(opts.memory_sizes, int, "--memory-sizes") if opts.memory_sizes else [c.memory_size]
    for m in sizes:
        if m < C or m % C:
            raise LongMemError(f"--memory-sizes: {m} is not a positive multiple of the model's chunk_size {C}")
    limit = max_positions(model)
    window = opts.window or T
    if limit is not None and window > limit:
        raise LongMemError(f"--window {window} exceeds the backbone's {limit} positions; use --window {limit} or less")
    if window < 2:
        raise LongMemError(f"--window {window} must be at least 2")
    stride = opts.stride or min(T, window // 2)
    if not 1 <= stride <= window:
        raise LongMemError(f"--stride {stride} must be between 1 and --window {window}")
    piece = opts.piece_tokens or max(32768, 2 * max(sizes))
    return {"memory_sizes": sizes, "window": window, "stride": stride, "segment_length": T,
            "piece_tokens": -(-piece // T) * T}


def load_tokenized(data: str, split: str, tok, limit: int | None, seed: int, max_tokens: int = 0,
                   min_tokens: int = 0) -> list[tuple[str, str, list[int]]]:
    """(id, text, token ids) of the documents of `data` (`split`) with at least `min_tokens` tokens, `limit` of them
    sampled with `seed`, each cut to its first `max_tokens` (0: whole); documents left with fewer than 2 tokens are
    dropped. Shared by `eval ppl` and `eval retrieval`, so both read the same documents."""
    from longmem.data.documents import load_documents

    docs = load_documents(data, split=split)
    ids: dict[str, list[int]] = {}

    def encode(d):
        if d.id not in ids:
            ids[d.id] = tok(d.text, verbose=False)["input_ids"]
        return ids[d.id]

    if min_tokens:
        docs = [d for d in docs if len(encode(d)) >= min_tokens]
        if not docs:
            raise LongMemError(f"no document of {data} (split {split}) has {min_tokens:,} tokens or more; "
                               f"lower --min-tokens")
    out = [(d.id, d.text, encode(d)[:max_tokens or None]) for d in sample(docs, limit, seed)]
    out = [doc for doc in out if len(doc[2]) >= 2]
    if not out:
        raise LongMemError(f"no document of {data} (split {split}) has 2 tokens or more to score; "
                           f"pass other data with --data")
    return out


def piece_detail(doc_tokens: int, piece: Piece, logprobs: dict[str, torch.Tensor], buckets: dict[str, np.ndarray],
                 memory: dict[str, dict]) -> dict:
    """What a piece's result file entry holds: summed NLL per row, overall and per distance bucket (token and
    word views), and the memory it ended with."""
    n = piece.targets
    nll = {row: -lp.double() for row, lp in logprobs.items()}  # (n,) per row
    distance = {}
    for view in VIEWS:
        b = torch.from_numpy(buckets[view][piece.start:piece.start + n])  # (n,) bucket of each target
        distance[view] = {name: {"count": int((b == i).sum()), "nll": {row: float(v[b == i].sum()) for row, v in nll.items()}}
                          for i, name in enumerate(DISTANCES) if bool((b == i).any())}
    return {"doc_tokens": doc_tokens, "start": piece.start, "scored": n, "bucket": bucket_of(doc_tokens),
            "nll": {row: float(v.sum()) for row, v in nll.items()}, "distance": distance, "memory": memory,
            "peak_rss_mib": round(peak_rss_mib(), 1)}


def summarize(rows: list[Row], pieces: list[tuple[str, dict]], resolved: dict) -> dict:
    """Token-weighted perplexity per row: overall, per document-length bucket and per distance bucket (a pure
    function of the (document id, piece detail) pairs)."""
    def ppl(dets, key):
        n = sum(d["scored"] for d in dets)
        return math.exp(sum(d["nll"][key] for d in dets) / n) if n else None

    dets = [d for _, d in pieces]
    docs = {doc: d["bucket"] for doc, d in pieces}
    buckets = {}
    for name, _ in BUCKETS:
        sel = [d for doc, d in pieces if docs[doc] == name]
        if sel:
            buckets[name] = {"docs": sum(b == name for b in docs.values()), "tokens": sum(d["scored"] for d in sel),
                             "ppl": {r.key: ppl(sel, r.key) for r in rows}}
    distance = {}
    for view in VIEWS:
        distance[view] = {}
        for name in DISTANCES:
            cells = [d["distance"][view][name] for d in dets if name in d["distance"][view]]
            n = sum(c["count"] for c in cells)
            if n:
                distance[view][name] = {"tokens": n, "ppl": {r.key: math.exp(sum(c["nll"][r.key] for c in cells) / n)
                                                             for r in rows}}
    return {
        "docs": len(docs), "tokens": sum(d["scored"] for d in dets), **resolved,
        "rows": {r.key: {"label": r.label, "ppl": ppl(dets, r.key)} for r in rows},
        "buckets": buckets,
        "distance": distance,
        "peak_rss_mib": max(d["peak_rss_mib"] for d in dets),
        "memory_bank_mib": {r.key: max(d["memory"][r.key]["bytes"] for d in dets) / 2**20
                            for r in rows if r.key.startswith("longmem_memory_")},
    }


def table(rows: list[Row], summary: dict) -> str:
    buckets = summary["buckets"]
    header = ["model", f"all ({summary['docs']} docs, {summary['tokens']:,} tok)"]
    header += [f"{name} ({b['docs']} docs, {b['tokens']:,} tok)" for name, b in buckets.items()]
    body = [[r.label, summary["rows"][r.key]["ppl"], *(b["ppl"][r.key] for b in buckets.values())] for r in rows]
    out = [markdown_table(header, body)]
    for view, cells in summary["distance"].items():
        out.append(f"perplexity by how far back the same {view} last occurred in the document (local: in the "
                   f"scored token's own segment; never: not earlier in the document)")
        header = ["model", *(f"{name} ({c['tokens']:,} tok)" for name, c in cells.items())]
        out.append(markdown_table(header, [[r.label, *(c["ppl"][r.key] for c in cells.values())] for r in rows]))
    return "\n\n".join(out)


class PplTask(Task):
    name, unit = TASK, "tok"

    def check(self):
        opts = self.opts
        if opts.max_doc_tokens < 0:
            raise LongMemError(f"--max-doc-tokens {opts.max_doc_tokens} must be 0 (whole documents) or positive")
        if opts.batch_size < 0:
            raise LongMemError(f"--batch-size {opts.batch_size} must be 0 (automatic) or positive")
        if opts.piece_tokens < 0:
            raise LongMemError(f"--piece-tokens {opts.piece_tokens} must be 0 (automatic) or positive")

    def plan(self) -> Plan:
        opts, model = self.opts, self.model
        self.resolved = resolve(opts, model)
        r = self.resolved
        self.rows = build_rows(model, r["memory_sizes"], r["window"], r["stride"])
        docs = load_tokenized(opts.data, opts.split, self.tok, opts.limit, opts.seed, opts.max_doc_tokens)
        config = options_dict(opts, **{k: v for k, v in r.items() if k != "segment_length"})
        config["memory_sizes"] = ",".join(map(str, r["memory_sizes"]))
        config.pop("batch_size")  # how many pieces run side by side does not change the numbers
        texts = self.tok.convert_ids_to_tokens(list(range(len(self.tok))))
        texts = [self.tok.convert_tokens_to_string([t]) for t in texts]  # each token's own text
        items, self.docs = [], {}
        for doc_id, _, ids in docs:
            x = torch.tensor(ids)
            self.docs[doc_id] = (len(ids), distance_buckets(ids, [texts[i] for i in ids], r["segment_length"]))
            items += [Item(p.key, p.targets, (doc_id, p)) for p in
                      split_document(doc_id, x, r["piece_tokens"], r["segment_length"])]
        total = sum(len(ids) for _, _, ids in docs)
        intro = (f"ppl: {len(docs)} documents, {total:,} tokens in {len(items)} pieces of up to "
                 f"{r['piece_tokens']:,}; {len(self.rows)} rows")
        return Plan(config, data_fingerprint(f"{i}\n{text}" for i, text, _ in docs), items, intro)

    def evaluate(self, todo, result, bar):
        lanes = self.opts.batch_size or (1 if self.model.device.type == "cpu" else 8)
        scorers = [row.make(lanes) for row in self.rows]
        by_key = {item.key: item.data for item in todo}

        def done(piece, logprobs):
            doc_id, _ = by_key[piece.key]
            lane_memory = {sc.name: {"bytes": sc.row_nbytes()} for sc in scorers if isinstance(sc, MemoryScorer)}
            tokens, buckets = self.docs[doc_id]
            result.add(piece.key, {"doc": doc_id, **piece_detail(tokens, piece, logprobs, buckets, lane_memory)})

        for row, sc in zip(self.rows, scorers):
            sc.name = row.key
        score_pieces(scorers, [p for _, p in by_key.values()], done, bar.update)

    def summarize(self, details):
        summary = summarize(self.rows, [(d["doc"], d) for d in details], self.resolved)
        return summary, table(self.rows, summary)

    def notes(self, summary):
        return [f"peak RSS {summary['peak_rss_mib']:,.0f} MiB; memory banks (per document) "
                + ", ".join(f"{k}: {v:.3g} MiB" for k, v in summary["memory_bank_mib"].items())]


def run(opts: PplOptions) -> dict:
    """Score the documents of `opts.data` with every row; resumable; returns the summary."""
    return PplTask(opts).run()
