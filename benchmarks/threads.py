"""Compute threads on an idle and on a shared machine: what longmem's default thread policy buys.

    python benchmarks/threads.py [--model default] [--segments 6] [--competitor torch|spin]

Measures `model.memorize` seconds per segment (the default model's 512-token segments, bf16
autocast, CPU) for one thread, every usable core and longmem's default policy
(`longmem.runtime.default_threads`), each with OpenMP's default (spinning) wait policy and
with OMP_WAIT_POLICY=PASSIVE, first on an idle machine and then next to a competing process
that keeps every core busy (`torch`: another PyTorch job multiplying matrices with all cores
and the default wait policy, like a second longmem run; `spin`: one pure-Python busy loop per
core). Every measurement runs in its own process (the wait policy is read when torch loads),
and the table gives each as a ratio to the fastest idle row. Run it alone: anything else on the
machine is part of the measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.abspath(__file__)


def child(args) -> dict:
    """One measurement, in a fresh process: the environment already holds the wait policy."""
    from longmem import runtime

    chosen = runtime.set_threads(None if args.threads == "default" else int(args.threads))
    import torch

    model, _ = runtime.load_model(args.model, "cpu")
    T = model.config.segment_length
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.backbone.config.vocab_size, (1, T * (args.segments + 1)), generator=g)
    memory = model.new_memory(1)
    with torch.no_grad(), runtime.autocast(model.device):
        model.memorize(ids[:, :T], memory)  # warm-up segment
        t = time.perf_counter()
        model.memorize(ids[:, T:], memory)
        seconds = time.perf_counter() - t
    return {"threads": chosen, "torch_threads": torch.get_num_threads(), "s_per_segment": seconds / args.segments}


def competitor_main(kind: str) -> None:
    """Keep every core busy until killed."""
    if kind == "spin":
        import multiprocessing as mp

        def spin():
            while True:
                pass
        for _ in range(os.cpu_count() or 1):
            mp.Process(target=spin, daemon=True).start()
        while True:
            time.sleep(1)
    import torch

    a = torch.randn(512, 512)
    while True:
        a = torch.tanh(a @ a)


def measure(args, threads: str, policy: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "LOCAL_WORLD_SIZE")}
    if policy == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    cmd = [sys.executable, HERE, "--child", "--threads", threads, "--model", args.model, "--segments", str(args.segments)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--segments", type=int, default=6, help="segments timed per measurement (after one warm-up)")
    ap.add_argument("--competitor", choices=["torch", "spin"], default="torch")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", default="default", help=argparse.SUPPRESS)
    ap.add_argument("--compete", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.compete:
        competitor_main(args.compete)
        return
    if args.child:
        print(json.dumps(child(args)))
        return

    from longmem.runtime import busy_cpus, usable_cores

    cores = usable_cores()
    busy = busy_cpus(1.0)
    if busy >= 0.5:
        print(f"warning: the machine is not idle ({busy:.1f} of {cores} cores busy): the idle rows are not idle",
              file=sys.stderr)
    configs = [(t, p) for t in ("1", str(cores), "default") for p in ("active", "passive")]
    results = {}
    for condition in ("idle", "busy"):
        proc = None
        if condition == "busy":
            env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
            proc = subprocess.Popen([sys.executable, HERE, "--compete", args.competitor], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(3.0)  # let it load torch and occupy the cores
        try:
            for threads, policy in configs:
                results[condition, threads, policy] = measure(args, threads, policy)
                r = results[condition, threads, policy]
                print(f"  {condition:<4} threads={threads:<7} ({r['threads']}) wait={policy:<7} "
                      f"{r['s_per_segment']:.3f} s/segment", file=sys.stderr)
        finally:
            if proc is not None:
                proc.kill()
                proc.wait()

    best = min(r["s_per_segment"] for (c, _, _), r in results.items() if c == "idle")
    print(f"\nmemorize, model {args.model}, {cores} usable cores, competitor: {args.competitor} "
          f"(every core); fastest idle row = {best:.3f} s/segment\n")
    print("| threads | OpenMP wait | idle: s/segment ÷ fastest idle | busy: s/segment ÷ fastest idle | busy ÷ idle |")
    print("|---|---|---:|---:|---:|")
    for threads, policy in configs:
        idle, busy = results["idle", threads, policy], results["busy", threads, policy]
        label = (f"default (chose {idle['threads']} idle, {busy['threads']} busy)" if threads == "default"
                 else ("1" if threads == "1" else f"all cores ({threads})"))
        print(f"| {label} | {policy} | {idle['s_per_segment'] / best:.2f} | {busy['s_per_segment'] / best:.2f} | "
              f"{busy['s_per_segment'] / idle['s_per_segment']:.2f} |")
    print("\nThe CLI runs the default row with the passive wait policy (OMP_WAIT_POLICY=PASSIVE unless set).")


if __name__ == "__main__":
    main()
