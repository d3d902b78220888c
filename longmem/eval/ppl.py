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

Perplexity is token-weighted, overall and per document-length bucket. The summary also
records the process's peak RSS and the memory banks' storage, which is bounded by the
memory capacity, not by the document length.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import torch

from longmem.errors import LongMemError
from longmem.eval.common import (EvalOptions, ResultFile, data_fingerprint, markdown_table, model_fingerprint,
                                 options_dict, parse_list, peak_rss_mib)
from longmem.eval.scoring import BackboneScorer, LocalScorer, MemoryScorer, Scorer, score_document

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
    """
    name = "backbone_window"

    def __init__(self, model, window: int, stride: int):
        super().__init__(model)
        assert 1 <= stride <= window, (stride, window)
        self.window, self.stride = window, stride
        self.history = None

    def _keep(self, ids: torch.Tensor) -> torch.Tensor:  # (1, n) -> (1, <= window - stride)
        keep = self.window - self.stride
        return ids[:, ids.shape[1] - min(keep, ids.shape[1]):]

    def start(self, prefix, show_progress=False):
        self.history = self._keep(prefix)

    def logits(self, x):  # (1, T) -> (1, T, V)
        out = []
        for s in range(0, x.shape[1], self.stride):
            piece = x[:, s:s + self.stride]                       # (1, t)
            inputs = torch.cat([self.history, piece], dim=1)      # (1, h + t), h + t <= window
            out.append(self.model.backbone(input_ids=inputs).logits[:, -piece.shape[1]:])  # (1, t, V)
            self.history = self._keep(inputs)
        return torch.cat(out, dim=1)


# ---- the task ---------------------------------------------------------------------------------------
@dataclass
class Row:
    key: str
    label: str
    make: object  # () -> Scorer, a fresh scorer per document


def build_rows(model, memory_sizes: list[int], window: int, stride: int) -> list[Row]:
    T = model.config.segment_length
    rows = [Row("backbone", f"frozen backbone, local segment ({T})", lambda: BackboneScorer(model)),
            Row("backbone_window", f"frozen backbone, sliding window ({window}, stride {stride})",
                lambda: SlidingWindowScorer(model, window, stride)),
            Row("longmem_no_memory", "LongMem, memory disabled", lambda: LocalScorer(model))]
    for m in memory_sizes:
        rows.append(Row(f"longmem_memory_{m}", f"LongMem, memory {m:,}", lambda m=m: MemoryScorer(model, m)))
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
    if opts.max_doc_tokens < 0:
        raise LongMemError(f"--max-doc-tokens {opts.max_doc_tokens} must be 0 (whole documents) or positive")
    return {"memory_sizes": sizes, "window": window, "stride": stride, "segment_length": T}


def load_tokenized(opts: PplOptions, tok) -> list[tuple[str, str, list[int]]]:
    """(id, text, token ids) of the selected documents with at least 2 tokens."""
    from longmem.data.documents import load_documents

    docs = sample(load_documents(opts.data, split=opts.split), opts.limit, opts.seed)
    out = []
    for d in docs:
        ids = tok(d.text, verbose=False)["input_ids"]
        if opts.max_doc_tokens:
            ids = ids[:opts.max_doc_tokens]
        if len(ids) >= 2:
            out.append((d.id, d.text, ids))
    if not out:
        raise LongMemError(f"no document of {opts.data} (split {opts.split}) has 2 tokens or more to score; "
                           f"pass other data with --data")
    return out


@torch.no_grad()
def score_one(model, rows: list[Row], ids: list[int]) -> dict:
    """One document through every row: summed NLL per row, plus what it cost."""
    from longmem.runtime import autocast

    x = torch.tensor(ids)
    nll, seconds, memory = {}, {}, {}
    with autocast(model.device):
        for row in rows:
            t0 = time.perf_counter()
            scorer = row.make()
            r = score_document(scorer, x)
            assert r.first_target == 1 and r.logprobs.shape == (len(ids) - 1,), (r.first_target, r.logprobs.shape)
            nll[row.key] = float(-r.logprobs.double().sum())
            seconds[row.key] = round(time.perf_counter() - t0, 3)
            if isinstance(scorer, MemoryScorer):
                memory[row.key] = {"tokens": len(scorer.memory), "bytes": scorer.memory.nbytes()}
    return {"tokens": len(ids), "scored": len(ids) - 1, "bucket": bucket_of(len(ids)), "nll": nll,
            "seconds": seconds, "memory": memory, "peak_rss_mib": round(peak_rss_mib(), 1)}


def summarize(rows: list[Row], examples: dict, resolved: dict) -> dict:
    """Token-weighted perplexity per row, overall and per length bucket (a pure function of the examples)."""
    def ppl(dets, key):
        n = sum(d["scored"] for d in dets)
        return math.exp(sum(d["nll"][key] for d in dets) / n) if n else None

    dets = list(examples.values())
    buckets = {}
    for name, _ in BUCKETS:
        sel = [d for d in dets if d["bucket"] == name]
        if sel:
            buckets[name] = {"docs": len(sel), "tokens": sum(d["scored"] for d in sel),
                             "ppl": {r.key: ppl(sel, r.key) for r in rows}}
    return {
        "docs": len(dets), "tokens": sum(d["scored"] for d in dets), **resolved,
        "rows": {r.key: {"label": r.label, "ppl": ppl(dets, r.key)} for r in rows},
        "buckets": buckets,
        "peak_rss_mib": max(d["peak_rss_mib"] for d in dets),
        "memory_bank_mib": {r.key: max(d["memory"][r.key]["bytes"] for d in dets) / 2**20
                            for r in rows if r.key.startswith("longmem_memory_")},
        "seconds": round(sum(sum(d["seconds"].values()) for d in dets), 1),
    }


def table(rows: list[Row], summary: dict) -> str:
    buckets = summary["buckets"]
    header = ["model", f"all ({summary['docs']} docs, {summary['tokens']:,} tok)"]
    header += [f"{name} ({b['docs']} docs, {b['tokens']:,} tok)" for name, b in buckets.items()]
    body = [[r.label, summary["rows"][r.key]["ppl"], *(b["ppl"][r.key] for b in buckets.values())] for r in rows]
    return markdown_table(header, body)


def run(opts: PplOptions) -> dict:
    """Score the documents of `opts.data` with every row; resumable; returns the summary."""
    from tqdm.auto import tqdm

    from longmem.runtime import load_model

    model, tok = load_model(opts.model, opts.device)
    model.config.retriever = opts.retriever or model.config.retriever  # what every new memory searches with
    resolved = resolve(opts, model)
    rows = build_rows(model, resolved["memory_sizes"], resolved["window"], resolved["stride"])
    docs = load_tokenized(opts, tok)
    config = options_dict(opts, **{k: v for k, v in resolved.items() if k != "segment_length"})
    config["memory_sizes"] = ",".join(map(str, resolved["memory_sizes"]))
    result = ResultFile.open(opts.out or f"results/{TASK}.json", TASK, config, model_fingerprint(opts.model),
                             data_fingerprint(f"{i}\n{text}" for i, text, _ in docs))
    todo = [(i, ids) for i, _, ids in docs if not result.done(i)]
    with tqdm(total=sum(len(ids) for _, ids in todo), desc=TASK, unit="tok", unit_scale=True) as bar:
        for doc_id, ids in todo:
            bar.set_postfix_str(f"{doc_id} ({len(ids):,} tok)")
            result.add(doc_id, score_one(model, rows, ids))
            bar.update(len(ids))
    summary = summarize(rows, {i: result.examples[i] for i, _, _ in docs}, resolved)
    text = table(rows, summary)
    result.finish(summary, text)
    print(text)
    print(f"peak RSS {summary['peak_rss_mib']:,.0f} MiB; memory banks "
          + ", ".join(f"{k}: {v:.3g} MiB" for k, v in summary["memory_bank_mib"].items()) + f" -> {result.path}")
    return summary
