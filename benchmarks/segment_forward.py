"""One-segment forward cost of LongMem vs the backbone's own forward, by memory size and retriever.

    python benchmarks/segment_forward.py [--layers 12 --width 768 --heads 12 --segment 1024]
        [--memory-sizes 0,8192,65536,1048576 --retrievers exact,faiss-ivf,faiss-hnsw,torch-ivf]

A GPT-2-small-sized random backbone (weights do not change the cost). Every row is timed in
the same process, interleaved, under bf16 autocast, and reported relative to the backbone's
own forward (`GPT2LMHeadModel(input_ids)`, LM head included) on the same segment.

Real memories: the default model reads `--recall-data` (dev books first, then train documents,
until each memory size is filled); the queries of its memory layer over the next segment are
searched by each retriever and by float32 brute force (recall@16). The timed memories hold
these real keys and values, the default model's kv heads repeated to the timed model's heads:
an index's cost depends on its data (how many chunks the probed lists hold), and random keys
make L2-trained IVF lists look several times cheaper than on real keys. The random backbone's
queries are not real ones, so each retriever's search is also timed alone on the real queries
(repeated the same way), the column that shows what an index costs on real data. Sizes the
data cannot fill, and `--recall-data ''`, get random keys (exact search costs the same for any
keys).

The row 'exact, before' is the exact path as it was before the tiled search and the blocked
gather, on the same memory, timed in the same run: the baseline of the exact path's speed-up.
The last table times the exact path's steps one by one, now and before (`--no-parts` skips it).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from longmem import LongMemConfig, LongMemForCausalLM
from longmem.memory import ExactRetriever, Retriever, make_retriever
from longmem.runtime import autocast, load_model, resolve_device, set_threads


def timed_interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds per call of each function, calls interleaved round-robin so drift hits all alike."""
    for fn in fns.values():
        fn()  # warm-up
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


class Recorder(Retriever):
    """Exact search that keeps the queries it was asked (the memory layer's real queries)."""
    name = "exact"

    def __init__(self):
        self.inner, self.queries = make_retriever("exact"), []

    def search(self, bank, queries, k):
        self.queries.append(queries)
        return self.inner.search(bank, queries, k)


BEFORE = "exact, before"
"""The exact path as it was before the tiled search and the blocked gather (one batched matmul and top-k over all
rows and heads in query blocks, then one gather of every retrieved token): the baseline row of this benchmark."""


@contextlib.contextmanager
def before(mem):
    """Run `mem`'s forward the old way: the batched exact schedule and one gather of everything."""
    import longmem.sidenet as sidenet

    saved = mem.retriever, sidenet.GATHER_BYTES
    mem.retriever, sidenet.GATHER_BYTES = ExactRetriever(tile=1 << 62), 1 << 62
    try:
        yield
    finally:
        mem.retriever, sidenet.GATHER_BYTES = saved


def exact_parts(mem, model, T: int, dev) -> dict:
    """The exact path's steps at one memory size, each alone, as closures, now and before: the search and, of it,
    the score matmul (the tiles `ExactRetriever` multiplies, into one reused buffer); the gather of the retrieved
    tokens with the memory attention over them (`retrieved_attention`); and the same two steps the old way
    (`before`). Shapes as in `MemoryAugmentedLayer.mix`: queries (1, Hkv, T, D), k chunks per query."""
    from longmem.sidenet import retrieved_attention

    H, D, k = model.adapter.num_kv_heads, model.adapter.head_dim, model.config.topk_tokens // model.config.chunk_size
    S = mem.slots_in_use
    dtype = torch.bfloat16 if dev.type == "cpu" else torch.float16
    q = torch.randn(1, H, T, D, device=dev, dtype=dtype)
    keys = mem.search_keys(S).to(dtype)                                        # (1, Hkv, S, D)
    qb, width = ExactRetriever().tile_shape(T, k)
    buf = torch.empty(qb, width, dtype=dtype, device=dev)                      # (qb, width) one tile's scores

    def matmul():
        for h in range(H):
            kt = keys[0, h].t()                                                # (D, S)
            for q0 in range(0, T, qb):
                for t0 in range(0, S, width):
                    w = min(width, S - t0)
                    torch.mm(q[0, h, q0:q0 + qb], kt[:, t0:t0 + w], out=buf[:min(qb, T - q0), :w])

    found = mem.search(q, k)

    def search_before():
        with before(mem):
            mem.search(q, k)

    def attend_before():
        with before(mem):
            retrieved_attention(q, mem, found)

    return {"search": lambda: mem.search(q, k), "of which score matmul": matmul,
            "gather + memory attention": lambda: retrieved_attention(q, mem, found),
            "search, before": search_before, "gather + memory attention, before": attend_before}


def split_retrievers(spec: str) -> list[str]:
    """'exact,faiss-ivf:nprobe=8,nlist_scale=4,torch-ivf' -> ['exact', 'faiss-ivf:nprobe=8,nlist_scale=4', 'torch-ivf']:
    an item that is a setting (key=N) belongs to the retriever before it."""
    names: list[str] = []
    for item in spec.split(","):
        if "=" in item and ":" not in item and names:
            names[-1] += "," + item
        else:
            names.append(item)
    return names


def real_memories(sizes: list[int], data: str) -> dict:
    """{size: (memory, queries)}: the default model's memory after reading `size` tokens of `data` (dev books, then
    train documents) and the queries (1, Hkv, Q, D) its memory layer searched with over the next segment."""
    from longmem.data.documents import load_documents

    model, tok = load_model("default", "cpu")
    seg = model.config.segment_length
    docs = load_documents(data, split="dev") + load_documents(data, split="train")
    need = max(sizes) + seg
    ids = []
    for d in docs:
        ids += tok(d.text)["input_ids"]
        if len(ids) >= need:
            break
    ids = torch.tensor(ids[:need])[None]
    out = {}
    for n in sizes:
        if n == 0:
            continue
        if ids.shape[1] < n + seg:
            print(f"real memories: {data} has {ids.shape[1]:,} tokens, fewer than {n + seg:,}; random keys at {n:,}")
            continue
        mem = model.new_memory(1, memory_size=n, retriever=Recorder())
        with torch.no_grad(), autocast(model.device):
            model.memorize(ids[:, :n], mem, show_progress=True)
            model(ids[:, n:n + seg], memory=mem, update_memory=False)
        out[n] = mem, mem.retriever.queries[-1]
    return out


def recall_on_real_memories(real: dict, retrievers: list[str], k_chunks: int = 16) -> dict:
    """{(size, retriever): recall@k_chunks} against float32 brute force on the `real_memories`."""
    out = {}
    for n, (mem, q) in real.items():
        ref = (q.float() @ mem.search_keys(mem.slots_in_use).float().transpose(-1, -2)).topk(k_chunks, dim=-1)
        for name in retrievers + ([BEFORE] if "exact" in retrievers else []):
            mem.retriever = ExactRetriever(tile=1 << 62) if name == BEFORE else make_retriever(name)
            mem.retriever.rebuild(mem)  # the index a loaded memory would get
            found = mem.search(q, k_chunks)
            hits = (found.slots[..., :, None] == ref.indices[..., None, :]).any(-1) & found.valid
            out[n, name] = hits.float().mean().item()
    return out


def heads_repeated(x: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
    """x with its `dim` (the real model's kv heads) repeated in turn to `heads`: head h is the real head h % Hkv."""
    idx = torch.arange(heads, device=x.device) % x.shape[dim]
    return x.index_select(dim, idx)


def fill(mem, n: int, tokens: tuple | None, H: int, D: int, dev) -> None:
    """Write n tokens into `mem` (heads H, dim D): `tokens`, keys and values (H, n, D) each, or random ones."""
    for s in range(0, n, 4096):
        if tokens is None:
            k = v = torch.randn(1, min(4096, n - s), H, D, device=dev)
        else:
            k, v = (x[:, s:s + 4096].transpose(0, 1)[None].to(dev) for x in tokens)  # (1, t, H, D) each
        mem.write(k, v)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--segment", type=int, default=1024)
    ap.add_argument("--memory-sizes", default="0,8192,65536,1048576")
    ap.add_argument("--retrievers", default="exact,faiss-ivf,faiss-hnsw,torch-ivf",
                    help="retrievers, comma-separated, each with its settings (exact,faiss-ivf:nprobe=8,nlist_scale=4)")
    ap.add_argument("--recall-data", default="data/prepared", help="prepared data for recall ('' to skip recall)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--threads", type=int, help="CPU threads (default: longmem's policy, longmem.runtime)")
    ap.add_argument("--no-parts", action="store_true", help="skip timing the exact path's steps one by one")
    ap.add_argument("--offload", action="store_true",
                    help="memories in (pinned) CPU memory, searched there, the model on --device (model.new_memory's "
                         "offload=True); the rows then time the offloaded path")
    args = ap.parse_args()
    set_threads(args.threads)
    torch.manual_seed(0)
    dev = resolve_device(args.device)
    cfg = GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=args.heads, n_positions=args.segment)
    backbone = GPT2LMHeadModel(cfg).to(dev).eval()
    sizes = [int(s) for s in args.memory_sizes.split(",")]
    names = split_retrievers(args.retrievers)
    real = real_memories(sizes, args.recall_data) if args.recall_data else {}
    recall = recall_on_real_memories(real, names)
    model = LongMemForCausalLM.from_backbone(backbone, LongMemConfig(segment_length=args.segment,
                                                                      memory_size=max(sizes + [4]))).to(dev).eval()
    x = torch.randint(0, cfg.vocab_size, (1, args.segment), device=dev)
    H, D = model.adapter.num_kv_heads, model.adapter.head_dim
    k_chunks = model.config.topk_tokens // model.config.chunk_size
    memories, real_queries = {}, {}
    for n in sizes:
        tokens = None
        if n in real and real[n][0].spec.head_dim == D:
            mem, q = real.pop(n)
            tokens = tuple(heads_repeated(t, H, 0) for t in mem.tokens(0))  # (H, n, D) keys, values: oldest first
            real_queries[n] = heads_repeated(q[:, :, :args.segment], H, 1).to(dev, torch.bfloat16)  # (1, H, T, D)
            del mem, q
        for name in names if n else ["exact"]:
            mem = model.new_memory(1, memory_size=max(n, 4), retriever=name, offload=args.offload)
            fill(mem, n, tokens, H, D, dev)
            memories[n, name] = mem
        del tokens
        if n and "exact" in names:
            memories[n, BEFORE] = memories[n, "exact"]  # the same memory, searched and read the old way (`before`)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def run_backbone():
        backbone(x)
        sync()

    def run_longmem(key):
        def f():
            with before(memories[key]) if key[1] == BEFORE else contextlib.nullcontext():
                model(x, memory=memories[key], update_memory=False)
            sync()
        return f

    def run_search(key):
        def f():
            with before(memories[key]) if key[1] == BEFORE else contextlib.nullcontext():
                memories[key].search(real_queries[key[0]], k_chunks)
            sync()
        return f

    with torch.no_grad(), autocast(dev):
        t = timed_interleaved({"backbone": run_backbone, **{key: run_longmem(key) for key in memories}}, args.repeats)
        t_search = timed_interleaved({"backbone": run_backbone, **{key: run_search(key) for key in memories
                                                                   if key[0] in real_queries}}, args.repeats)
        parts = {}
        if not args.no_parts and not args.offload and "exact" in names:  # (the steps' timing reads a resident bank)
            def timed_part(fn):
                def f():
                    fn()
                    sync()
                return f
            for n in sizes:
                if n:
                    steps = exact_parts(memories[n, "exact"], model, args.segment, dev)
                    t_parts = timed_interleaved({"backbone": run_backbone, **{name: timed_part(fn) for name, fn in
                                                                              steps.items()}}, args.repeats)
                    parts[n] = {name: tn / t_parts["backbone"] for name, tn in t_parts.items() if name != "backbone"}
    base = t.pop("backbone")
    base_search = t_search.pop("backbone")
    t0 = t.get((0, "exact"))
    print(f"device={dev.type} threads={torch.get_num_threads()} backbone: {args.layers} layers, d={args.width}, "
          f"{args.heads} heads, segment {args.segment} tokens; SideNet {model.config.sidenet_layers} layers; "
          f"K={model.config.topk_tokens}, chunk {model.config.chunk_size}; memory {model.config.memory_dtype}"
          f"{', offloaded to CPU memory' if args.offload else ''}")
    print()
    print(f"('{BEFORE}': the same memory searched and read as before the tiled search and the blocked gather; "
          f"memories of real keys at {', '.join(f'{n:,}' for n in real_queries) or 'no size'}, random keys elsewhere)")
    print()
    print("| memory tokens | retriever | LongMem segment forward / backbone forward | retrieval + memory attention / "
          "backbone forward | search alone, real queries / backbone forward | recall@16 (default model, real memory) |")
    print("|---:|---|---:|---:|---:|---:|")
    for (n, name), tn in t.items():
        extra = f"{(tn - t0) / base:.2f}" if t0 is not None else "n/a"
        r, ts = recall.get((n, name)), t_search.get((n, name))
        print(f"| {n:,} | {name} | {tn / base:.2f} | {extra} | {'n/a' if ts is None else f'{ts / base_search:.2f}'} "
              f"| {'n/a' if r is None else f'{r:.3f}'} |")
    print()
    print(f"backbone forward: {base * 1e3:.0f} ms per segment (the 1.00 of this table)")
    if parts:
        print()
        print("the exact path's steps, each timed alone, as a fraction of one backbone forward, now and before:")
        print()
        print("| memory tokens | search | of which score matmul | gather + memory attention | total | search, before | "
              "gather + memory attention, before | total, before | before / now |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for n, p in parts.items():
            now, old = p["search"] + p["gather + memory attention"], p["search, before"] + p[
                "gather + memory attention, before"]
            print(f"| {n:,} | {p['search']:.3f} | {p['of which score matmul']:.3f} | "
                  f"{p['gather + memory attention']:.3f} | {now:.3f} | {p['search, before']:.3f} | "
                  f"{p['gather + memory attention, before']:.3f} | {old:.3f} | {old / now:.1f}x |")
    n = max(sizes)
    if n:
        mem = memories[n, "exact"]
        print(f"memory bytes per stored token at {n:,}: {mem.nbytes() / len(mem):.0f} (keys, values, chunk keys, "
              f"token id; {H} heads x {D} dims, {model.config.memory_dtype}); {mem.nbytes() / 2**30:.2f} GiB per row")


if __name__ == "__main__":
    main()
