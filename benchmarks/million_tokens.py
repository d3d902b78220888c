"""A 1M-token memory for the default model on the CPU: bytes, fill time, and one segment forward's time.

    python benchmarks/million_tokens.py [--tokens 1048576 --dtypes bfloat16,int8 --retrievers exact,faiss-ivf]
        [--source text|random --repeats 3 --threads N]

One row of the default model's memory is filled with `--tokens` tokens, a segment at a time
(`MemoryBank.write`, as `memorize` writes). `--source text` (default) memorizes real text (dev
books, then train documents) through the backbone (about 1.5 min per million tokens on 2 cores);
`--source random` writes random keys and values with the per-dimension mean and spread of the
model's real memory-layer keys/values over one segment of text, much faster. The exact search and
the attention cost the same for any keys, but an IVF index does not: how many chunks its probed
lists hold depends on the keys (at 1M, faiss-ivf scanned 5.9% of random keys' chunks for random
queries and 7.6% of real ones for real queries at the default settings; 0.3% against 1.7% with
`nlist_scale=8,nprobe=64`), so only real keys time it fairly. For each
memory dtype: bytes held, the time of the first and last tenth of the writes (a write must not get
slower as the bank fills), then per retriever the index build time and the time of one segment
forward (retrieve + memory attention, no write) next to the same forward without memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from tqdm.auto import tqdm

from longmem.memory import MemoryBank, make_retriever
from longmem.runtime import autocast, load_model, set_threads


def text_ids(tok, data: str, n: int) -> torch.Tensor:
    """(1, n) token ids of the dev books, then the train documents (fewer if the data is shorter)."""
    from longmem.data.documents import load_documents

    ids = []
    for d in load_documents(data, split="dev") + load_documents(data, split="train"):
        ids += tok(d.text)["input_ids"]
        if len(ids) >= n:
            break
    return torch.tensor(ids[:n])[None]


def fill(model, bank: MemoryBank, source: str, ids: torch.Tensor, stats: tuple) -> list[float]:
    """Write bank's capacity of tokens, a segment at a time; returns the seconds of each write."""
    seg, n = model.config.segment_length, bank.spec.capacity
    H, D = bank.spec.num_kv_heads, bank.spec.head_dim
    mean, std = stats  # (2, Hkv, D) each: keys, values
    g = torch.Generator().manual_seed(0)
    times = []
    for s in tqdm(range(0, n, seg), desc=f"fill {bank.spec.dtype}", unit="seg"):
        if source == "text":
            with torch.no_grad(), autocast(model.device):
                bb, _, _ = model._backbone(ids[:, s:s + seg], None)
            k, v = bb.memory_keys, bb.memory_values
        else:
            kv = torch.randn(2, 1, min(seg, n - s), H, D, generator=g) * std[:, None, None] + mean[:, None, None]
            k, v = kv[0], kv[1]
        t = time.perf_counter()
        bank.write(k, v)
        times.append(time.perf_counter() - t)
    return times


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1 << 20)
    ap.add_argument("--dtypes", default="bfloat16,int8")
    ap.add_argument("--retrievers", default="exact,faiss-ivf")
    ap.add_argument("--source", choices=("text", "random"), default="text")
    ap.add_argument("--data", default="data/prepared")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()
    set_threads(args.threads)
    model, tok = load_model("default", "cpu")
    seg = model.config.segment_length
    ids = text_ids(tok, args.data, args.tokens + seg if args.source == "text" else 2 * seg)
    with torch.no_grad(), autocast(model.device):
        bb, _, _ = model._backbone(ids[:, :seg], None)
    real = torch.stack([bb.memory_keys[0], bb.memory_values[0]]).float()  # (2, T, Hkv, D)
    stats = real.mean(1), real.std(1)
    x = ids[:, -seg:]  # the segment every forward reads
    spec = model.memory_spec(args.tokens)
    print(f"default model: memory layer {model.config.memory_layer}, {spec.num_kv_heads} kv heads x {spec.head_dim} "
          f"dims, chunk {spec.chunk_size}, k = {model.config.topk_chunks} chunks; segment {seg} tokens; "
          f"threads {torch.get_num_threads()}; memory of {args.tokens:,} tokens ({args.source} keys)")
    with torch.no_grad(), autocast(model.device):
        base = median_time(lambda: model(x), args.repeats)
    print(f"segment forward without memory: {base * 1e3:.0f} ms")
    print()
    print("| memory dtype | bytes held | bytes / token | first / last tenth of the writes (ms per write) | retriever | "
          "index build (s) | segment forward (ms) | / forward without memory |")
    print("|---|---:|---:|---:|---|---:|---:|---:|")
    for dtype in args.dtypes.split(","):
        bank = MemoryBank(dataclasses.replace(spec, dtype=dtype), 1)
        times = fill(model, bank, args.source, ids, stats)
        tenth = max(1, len(times) // 10)
        first, last = sum(times[:tenth]) / tenth, sum(times[-tenth:]) / tenth
        for name in args.retrievers.split(","):
            bank.retriever = make_retriever(name)
            t = time.perf_counter()
            bank.retriever.rebuild(bank)  # the index a loaded memory gets
            build = time.perf_counter() - t
            with torch.no_grad(), autocast(model.device):
                tf = median_time(lambda: model(x, memory=bank, update_memory=False), args.repeats)
            print(f"| {dtype} | {bank.nbytes() / 2**20:,.0f} MiB | {bank.nbytes() / len(bank):.0f} | "
                  f"{first * 1e3:.1f} / {last * 1e3:.1f} | {name} | {build:.1f} | {tf * 1e3:.0f} | {tf / base:.2f} |")
        del bank


if __name__ == "__main__":
    main()
