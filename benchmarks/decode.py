"""Decoding speed: full recompute vs incremental (key/value caches) vs the plain backbone's HF generate.

    python benchmarks/decode.py [--models default,gpt2-small] [--memory-sizes 0,16384,65536]
    python benchmarks/decode.py --tiny      # tiny random models: proves the script runs, numbers mean nothing

For each model and memory size, batch 1, greedy, under bf16 autocast (what the runtime uses), a
prompt of half a segment, and enough new tokens that the local window overflows once (its older
half goes into memory and the caches are rebuilt):

  (a) `RecomputeDecoder`: every step re-runs both networks over the whole local context;
  (b) `IncrementalDecoder`: one token per step through both networks, with key/value caches;
  (c) the plain backbone's own `generate` (HF, its KV cache, no memory), same number of new tokens.

Tokens/s count decode steps only (the first new token comes from the prefill, whose time is reported
separately; for (c) it is `generate` of one token, and its tokens/s is (N-1) / (t(N) - t(1))). (b) is
timed over every step, overflow rebuilds included (their count and share of (b)'s time are shown).
(a) costs a forward over the whole window per step, so it is timed on a sample of the same steps,
spread evenly over the run: each sampled step starts from (b)'s state at that step (a
`RecomputeDecoder` prefilled with (b)'s window and a copy of (b)'s memory) and is timed once;
its mean is (a)'s time per token. "max |Δlogit|" compares (a)'s and (b)'s logits at those steps
(bf16 autocast: not bit-equal; the float32 equality is in tests/test_decoding.py).

Models: "default" is the shipped model (`longmem.runtime.load_model("default")`); "gpt2-small" is a
GPT-2-small-sized random backbone (12 layers, d=768, 12 heads, vocabulary 50257; weights do not
change the cost) with segment_length 1024 and 2048 learned positions, so that (c) can run past 1024
tokens. The memory is filled with random keys/values written into the bank (retrieval cost does
not depend on their values), `memory_size` tokens per memory.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from longmem import LongMemConfig, LongMemForCausalLM
from longmem.decoding import IncrementalDecoder, RecomputeDecoder
from longmem.runtime import autocast, load_model, resolve_device, set_threads


@dataclass
class Row:
    memory: int
    prefill: dict          # seconds, by path
    tokens_per_s: dict     # by path
    overflows: int         # rebuilds during (b)
    overflow_share: float  # of (b)'s decode time
    steady_tokens_per_s: float  # (b) without the overflow steps
    max_diff: float        # max |logit (a) - logit (b)| over the sampled steps


def build(name: str, dev: torch.device, tiny: bool) -> tuple[LongMemForCausalLM, int]:
    """(model, vocabulary size) in eval mode on dev."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if name == "default" and not tiny:
        model, _ = load_model("default", device=dev)
        return model, model.backbone.config.vocab_size
    if name == "default":  # the default model's architecture, tiny and random
        backbone = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, num_hidden_layers=4,
                                                num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                                tie_word_embeddings=True))
        config = LongMemConfig(segment_length=32, chunk_size=4, topk_tokens=16)
    elif name == "gpt2-small":
        size = dict(n_layer=12, n_embd=768, n_head=12)
        if tiny:
            size = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=512, bos_token_id=0, eos_token_id=0)
        backbone = GPT2LMHeadModel(GPT2Config(n_positions=2048, **size))
        config = LongMemConfig(segment_length=32 if tiny else 1024, **(dict(topk_tokens=16) if tiny else {}))
    else:
        raise SystemExit(f"unknown model {name!r}; use default or gpt2-small")
    model = LongMemForCausalLM.from_backbone(backbone.eval(), config).to(dev).eval()
    return model, backbone.config.vocab_size


def random_memory(model: LongMemForCausalLM, n: int, dev: torch.device):
    """A one-row bank holding n random tokens, capacity n (at least one chunk): a full FIFO, as in a long run."""
    memory = model.new_memory(1, memory_size=max(n, model.config.chunk_size), device=dev)
    H, D = model.adapter.num_kv_heads, model.adapter.head_dim
    for s in range(0, n, 4096):
        kv = torch.randn(1, min(4096, n - s), H, D, device=dev)  # (1, T, Hkv, D)
        memory.write(kv, kv)
    return memory


def measure(model, vocab, memory, new_tokens: int, samples: int, sync) -> Row:
    dev = model.device
    seg = model.config.segment_length
    prompt = torch.randint(0, vocab, (1, seg // 2), device=dev, generator=torch.Generator(dev).manual_seed(0))
    steps = new_tokens - 1
    sampled = sorted({int((k + 0.5) * steps / samples) for k in range(samples)})

    # (b) incremental, every step timed; (a) recompute, timed on the sampled steps from (b)'s state there
    dec = IncrementalDecoder(model, memory.to(dev))
    t = time.perf_counter()
    logits = dec.prefill(prompt)
    sync()
    prefill = {"b": time.perf_counter() - t}
    step_times, overflow_times, a_times, max_diff = [], [], [], 0.0
    for i in range(steps):
        token = logits.argmax(-1)  # (1,)
        if i in sampled:
            ref = RecomputeDecoder(model, dec.memory.to(dev))
            ref.prefill(dec.window.ids)  # (b)'s local context: no prefix to memorize (it is at most one segment)
            t = time.perf_counter()
            a_logits = ref.step(token)
            sync()
            a_times.append(time.perf_counter() - t)
        before = dec.window.ids.shape[1]
        t = time.perf_counter()
        logits = dec.step(token)
        sync()
        step_times.append(time.perf_counter() - t)
        if dec.window.ids.shape[1] < before:
            overflow_times.append(step_times[-1])
        if i in sampled:
            max_diff = max(max_diff, float((a_logits - logits).abs().max()))
    b_time = sum(step_times)
    ref = RecomputeDecoder(model, memory.to(dev))
    t = time.perf_counter()
    ref.prefill(prompt)
    sync()
    prefill["a"] = time.perf_counter() - t

    # (c) the backbone's own generate with its KV cache, no memory
    def generate(n):
        t = time.perf_counter()
        model.backbone.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                pad_token_id=model.backbone.config.eos_token_id or 0)
        sync()
        return time.perf_counter() - t
    prefill["c"] = generate(1)
    c_time = generate(new_tokens) - prefill["c"]

    overflow = sum(overflow_times)
    return Row(memory=len(memory), prefill=prefill,
               tokens_per_s={"a": 1 / (sum(a_times) / len(a_times)), "b": steps / b_time, "c": steps / c_time},
               overflows=len(overflow_times), overflow_share=overflow / b_time,
               steady_tokens_per_s=(steps - len(overflow_times)) / (b_time - overflow), max_diff=max_diff)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="default,gpt2-small", help="comma-separated: default, gpt2-small")
    ap.add_argument("--memory-sizes", help="memory tokens, comma-separated (default 0,16384,65536; tiny 0,256,1024)")
    ap.add_argument("--new-tokens", type=int, help="new tokens per run (default: half a segment + 16, one overflow)")
    ap.add_argument("--samples", type=int, default=8, help="steps of (a) timed per run, spread over the run")
    ap.add_argument("--tiny", action="store_true", help="tiny random models and memories: a smoke run only")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--threads", type=int, help="CPU threads (default: longmem's policy, longmem.runtime)")
    args = ap.parse_args()
    set_threads(args.threads)
    dev = resolve_device(args.device)
    if (args.new_tokens is not None and args.new_tokens < 2) or args.samples < 1:
        raise SystemExit("--new-tokens must be at least 2 (a prefill token and a decode step), --samples at least 1")
    sizes = [int(s) for s in (args.memory_sizes or ("0,256,1024" if args.tiny else "0,16384,65536")).split(",")]

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    print(f"device={dev.type} threads={torch.get_num_threads()} bf16 autocast, batch 1, greedy"
          + (" (TINY smoke run: the numbers mean nothing)" if args.tiny else ""))
    for name in args.models.split(","):
        model, vocab = build(name, dev, args.tiny)
        c = model.config
        new_tokens = args.new_tokens or c.segment_length // 2 + 16
        with torch.no_grad(), autocast(dev):
            measure(model, vocab, random_memory(model, sizes[0], dev), 4, 1, sync)  # warm-up
            rows = [measure(model, vocab, random_memory(model, n, dev), new_tokens, args.samples, sync)
                    for n in sizes]
        a = model.adapter
        print()
        print(f"## {name}: {a.num_layers} layers, {a.num_heads} heads ({a.num_kv_heads} kv) x {a.head_dim}; "
              f"SideNet {c.sidenet_layers} layers; segment {c.segment_length}; prompt {c.segment_length // 2} tokens; "
              f"{new_tokens} new tokens; (a) timed on {args.samples} steps")
        print()
        print("| memory tokens | prefill s (a) / (b) / (c) | tokens/s (a) | tokens/s (b) | tokens/s (c) | (b)/(a) "
              "| (b)/(c) | (b) overflow rebuilds: count, share of time | (b) tokens/s without them "
              "| max abs Δlogit (a)-(b) |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            p, tps = r.prefill, r.tokens_per_s
            print(f"| {r.memory:,} | {p['a']:.3f} / {p['b']:.3f} / {p['c']:.3f} | {tps['a']:.1f} | {tps['b']:.1f} | "
                  f"{tps['c']:.1f} | {tps['b'] / tps['a']:.1f} | {tps['b'] / tps['c']:.2f} | {r.overflows}, "
                  f"{100 * r.overflow_share:.0f}% | {r.steady_tokens_per_s:.1f} | {r.max_diff:.2e} |")


if __name__ == "__main__":
    main()
