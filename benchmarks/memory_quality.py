"""Dev perplexity with memory by memory dtype and retriever (the default model over a dev book).

    python benchmarks/memory_quality.py [--tokens 40960 --score 8192 --dtypes bfloat16,int8 --retrievers exact]

The book's first `--tokens` tokens are read segment by segment with memory (every segment
retrieves, then is written); the last `--score` of them are scored. Each row rebuilds the memory
from scratch with its dtype and retriever; the bytes per stored token are the bank's.
"""

from __future__ import annotations

import argparse
import math

import torch

from longmem.data.documents import load_documents
from longmem.eval.scoring import MemoryScorer, score_document
from longmem.runtime import autocast, load_model, set_threads


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--data", default="data/prepared")
    ap.add_argument("--book", default="austen/persuasion")
    ap.add_argument("--tokens", type=int, default=40960)
    ap.add_argument("--score", type=int, default=8192)
    ap.add_argument("--dtypes", default="bfloat16,int8")
    ap.add_argument("--retrievers", default="exact")
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()
    set_threads(args.threads)
    model, tok = load_model(args.model, "cpu")
    text = {d.id: d for d in load_documents(args.data, split="dev")}[args.book].text
    ids = torch.tensor(tok(text)["input_ids"][:args.tokens])
    n = ids.shape[0]
    print(f"{args.book}: {n:,} tokens, scoring the last {min(args.score, n):,}; memory {model.config.memory_size:,} "
          f"tokens, segment {model.config.segment_length}")
    print("| memory dtype | retriever | perplexity with memory | bytes per stored token |")
    print("|---|---|---:|---:|")
    for dtype in args.dtypes.split(","):
        for retriever in args.retrievers.split(","):
            model.config.memory_dtype, model.config.retriever = dtype, retriever
            scorer = MemoryScorer(model)
            with torch.no_grad(), autocast(model.device):
                score = score_document(scorer, ids, score_from=max(0, n - args.score), show_progress=True)
            mem = scorer.memory
            print(f"| {dtype} | {retriever} | {math.exp(score.nll):.3f} | {mem.nbytes() / max(1, len(mem)):.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
