"""Peak memory of scoring a long document with LongMem does not grow with its length.

    python benchmarks/memory_rss.py [--model default] [--tokens 131072,1048576]

Each length runs in its own child process: a synthetic document of N random tokens is
scored segment by segment with a
memory of the model's configured size (`longmem.eval.scoring.MemoryScorer`, the path every
`longmem eval` task uses). Printed: peak RSS of the process and the memory bank's bytes.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def child(model_path: str, n: int, raw_allocator: bool) -> dict:
    import torch

    from longmem.eval.scoring import MemoryScorer, score_document
    from longmem.runtime import autocast, bound_cpu_allocator, load_model

    if not raw_allocator:
        bound_cpu_allocator()  # what the `longmem` CLI does at start
    model, _ = load_model(model_path, "cpu")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.backbone.config.vocab_size, (n,), generator=g)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    scorer = MemoryScorer(model)
    t = time.perf_counter()
    with autocast(model.device):
        r = score_document(scorer, ids)
    return {"tokens": n, "scored": int(r.logprobs.numel()), "seconds": time.perf_counter() - t,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_after_load_mib": rss_loaded, "memory_tokens": len(scorer.memory),
            "memory_bank_mib": scorer.memory.nbytes() / 2**20, "capacity": scorer.memory.spec.capacity}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--tokens", default="131072,1048576")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--raw-allocator", action="store_true", help="skip longmem.runtime.bound_cpu_allocator (to see the difference)")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.child, args.raw_allocator)))
        return
    rows = []
    for n in (int(x) for x in args.tokens.split(",")):
        extra = ["--raw-allocator"] if args.raw_allocator else []
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--child", str(n), *extra],
                             capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"model {args.model}: memory capacity {rows[0]['capacity']:,} tokens; CPU, bf16 autocast; "
          f"allocator {'glibc default' if args.raw_allocator else 'longmem.runtime.bound_cpu_allocator'}\n")
    print("| document tokens | scored | peak RSS (MiB) | RSS after loading the model (MiB) | memory bank (MiB) | tokens/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['tokens']:,} | {r['scored']:,} | {r['peak_rss_mib']:,.0f} | {r['rss_after_load_mib']:,.0f} | "
              f"{r['memory_bank_mib']:.1f} | {r['scored'] / r['seconds']:,.0f} |")
    print(f"\npeak RSS ratio, longest / shortest document: {rows[-1]['peak_rss_mib'] / rows[0]['peak_rss_mib']:.2f} "
          f"(document {rows[-1]['tokens'] / rows[0]['tokens']:.0f}x longer)")


if __name__ == "__main__":
    main()
