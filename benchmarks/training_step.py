"""LongMem adaptation training vs full fine-tuning of the same backbone, on the same batches.

    python benchmarks/training_step.py [--backbone runs/backbone-gpu/final] [--steps 6]

LongMem trains only the SideNet: the frozen backbone runs forward once under no_grad and
needs no backward pass and no optimizer state. Each variant runs in its own child process
(so peak memory is measured cleanly: ru_maxrss on CPU, max_memory_allocated on CUDA) on the
same random batches, with bf16 autocast and AdamW; the table gives ratios to full fine-tuning.
The LongMem variant trains with a full memory (memory_size tokens per row), as in training.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def build_backbone(path: str | None):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    if path:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(0)  # the default model's backbone shape, random weights
    return LlamaForCausalLM(LlamaConfig(vocab_size=8192, hidden_size=384, num_hidden_layers=8, num_attention_heads=6,
                                        num_key_value_heads=2, intermediate_size=768, tie_word_embeddings=True))


def run_variant(args) -> dict:
    import torch.nn.functional as F

    from longmem import LongMemConfig, LongMemForCausalLM
    from longmem.runtime import autocast, resolve_device, set_threads

    set_threads(args.threads)
    dev = resolve_device(args.device)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # after imports, before any model
    torch.manual_seed(0)
    backbone = build_backbone(args.backbone).to(dev)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, backbone.config.vocab_size, (args.batch, args.segment + 1), generator=g).to(dev)
               for _ in range(args.steps + 2)]
    if args.variant == "longmem":
        model = LongMemForCausalLM.from_backbone(backbone, LongMemConfig(segment_length=args.segment,
                                                                          memory_size=args.memory_size)).to(dev)
        params = list(model.sidenet.parameters())
        memory = model.new_memory(args.batch)
        H, D = model.adapter.num_kv_heads, model.adapter.head_dim
        kv = torch.randn(args.batch, args.memory_size, H, D, device=dev)
        memory.write(kv, kv)

        def logits(x):
            return model(x, memory=memory).logits
    else:
        model = backbone.train()
        params = list(model.parameters())

        def logits(x):
            return model(input_ids=x).logits
    opt = torch.optim.AdamW(params, lr=1e-4)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i, b in enumerate(batches):
        t = time.perf_counter()
        with autocast(dev):
            loss = F.cross_entropy(logits(b[:, :-1]).float().flatten(0, 1), b[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - t)
    tokens = args.batch * args.segment
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda"
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) * 1024)
    return {"tokens_per_s": tokens * len(times) / sum(times), "peak_bytes": peak,
            "trainable": sum(p.numel() for p in params)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", help="HF model folder (default: random weights, the default model's shape)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--segment", type=int, default=512)
    ap.add_argument("--memory-size", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--threads", type=int, help="CPU threads (default: longmem's policy, longmem.runtime)")
    ap.add_argument("--variant", choices=["longmem", "full"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    from longmem.runtime import resolve_device, set_threads

    threads = set_threads(args.threads)  # decided once, here: both variants run with the same count
    results = {}
    for variant in ("full", "longmem"):
        cmd = [sys.executable, __file__, "--variant", variant] + sys.argv[1:] + ["--threads", str(threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
    f, l = results["full"], results["longmem"]
    print(f"device={resolve_device(args.device).type} threads={threads} batch {args.batch} x {args.segment} tokens, "
          f"bf16 autocast, AdamW; LongMem memory {args.memory_size:,} tokens per row")
    print()
    print("| | full fine-tuning | LongMem adaptation | ratio (LongMem / full) |")
    print("|---|---:|---:|---:|")
    print(f"| trainable parameters | {f['trainable']:,} | {l['trainable']:,} | {l['trainable'] / f['trainable']:.2f} |")
    print(f"| training tokens/s | {f['tokens_per_s']:,.0f} | {l['tokens_per_s']:,.0f} | "
          f"{l['tokens_per_s'] / f['tokens_per_s']:.2f} |")
    print(f"| peak memory: weights, memory bank, activations, optimizer (MiB) | {f['peak_bytes'] / 2**20:,.0f} | {l['peak_bytes'] / 2**20:,.0f} | "
          f"{l['peak_bytes'] / max(1, f['peak_bytes']):.2f} |")


if __name__ == "__main__":
    main()
