"""One-segment forward cost of LongMem vs the backbone's own forward, by memory size.

    python benchmarks/segment_forward.py [--layers 12 --width 768 --heads 12 --segment 1024]

A GPT-2-small-sized random backbone (weights do not change the cost). Every row is timed in
the same process, interleaved, under bf16 autocast, and reported relative to the backbone's
own forward (`GPT2LMHeadModel(input_ids)`, LM head included) on the same segment. The
memory is filled with random keys/values (retrieval cost does not depend on their values).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from longmem import LongMemConfig, LongMemForCausalLM
from longmem.runtime import autocast, resolve_device, set_threads


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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--segment", type=int, default=1024)
    ap.add_argument("--memory-sizes", default="0,8192,65536")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--threads", type=int, help="CPU threads (default: longmem's policy, longmem.runtime)")
    args = ap.parse_args()
    set_threads(args.threads)
    torch.manual_seed(0)
    dev = resolve_device(args.device)
    cfg = GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=args.heads, n_positions=args.segment)
    backbone = GPT2LMHeadModel(cfg).to(dev).eval()
    sizes = [int(s) for s in args.memory_sizes.split(",")]
    model = LongMemForCausalLM.from_backbone(backbone, LongMemConfig(segment_length=args.segment,
                                                                      memory_size=max(sizes + [4]))).to(dev).eval()
    x = torch.randint(0, cfg.vocab_size, (1, args.segment), device=dev)
    H, D = model.adapter.num_kv_heads, model.adapter.head_dim
    memories = {}
    for n in sizes:
        mem = model.new_memory(1, memory_size=max(n, 4))
        for s in range(0, n, 4096):
            kv = torch.randn(1, min(4096, n - s), H, D, device=dev)
            mem.write(kv, kv)
        memories[n] = mem

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def run_backbone():
        backbone(x)
        sync()

    def run_longmem(n):
        def f():
            model(x, memory=memories[n], update_memory=False)
            sync()
        return f

    with torch.no_grad(), autocast(dev):
        t = timed_interleaved({"backbone": run_backbone, **{n: run_longmem(n) for n in sizes}}, args.repeats)
        base = t["backbone"]
        rows = [(n, t[n]) for n in sizes]
    t0 = dict(rows).get(0)
    print(f"device={dev.type} threads={torch.get_num_threads()} backbone: {args.layers} layers, d={args.width}, "
          f"{args.heads} heads, segment {args.segment} tokens; SideNet {model.config.sidenet_layers} layers; "
          f"K={model.config.topk_tokens}, chunk {model.config.chunk_size}; memory {model.config.memory_dtype}")
    print()
    print("| memory tokens | LongMem segment forward / backbone forward | retrieval + memory attention / backbone forward |")
    print("|---:|---:|---:|")
    for n, t in rows:
        extra = f"{(t - t0) / base:.2f}" if t0 is not None else "n/a"
        print(f"| {n:,} | {t / base:.2f} | {extra} |")
    print()
    print(f"backbone forward: {base * 1e3:.0f} ms per segment (the 1.00 of this table)")
    n = max(sizes)
    if n:
        print(f"memory bytes per stored token: {memories[n].nbytes() / len(memories[n]):.0f} "
              f"(keys + values + chunk keys, {H} heads x {D} dims, {model.config.memory_dtype})")


if __name__ == "__main__":
    main()
