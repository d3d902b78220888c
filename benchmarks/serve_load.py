"""Load on `longmem serve` over loopback: does batching pay? (a benchmark, not a test; run it alone)

Starts `longmem serve` as its own process on a fresh data folder, gives every client its own
memory (`--memory-tokens` of text appended), then for each concurrency level runs that many
clients at once, each sending `--requests` greedy completions of `--max-new-tokens` one after
another (bounded: clients x requests in all). Reports generated tokens/s, requests/s, p50/p99
latency and errors, next to one client calling the Python API in a loop (`model.generate` on
a copy of a memory, same prompts, same precision) after the server is stopped.

    python benchmarks/serve_load.py                                  # 1/4/16 clients, default model
    python benchmarks/serve_load.py --concurrency 1,2 --requests 2 --max-new-tokens 4   # a smoke run

The target the issue sets: total tokens/s at 16 clients >= 3x at 1 client.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("It was a bright cold day in April, and the clocks were striking thirteen. The hallway smelt of boiled "
        "cabbage and old rag mats. At one end of it a coloured poster, too large for indoor display, had been "
        "tacked to the wall. ")
PROMPTS = ["She opened the door and", "The letter said that", "In the morning the garden", "He remembered the"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, data_dir: str, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "longmem.cli", "serve", "--model", args.model, "--device", args.device,
           "--data-dir", data_dir, "--port", str(port), "--precision", args.precision,
           "--max-batch", str(max(args.concurrency)), "--max-new-tokens", str(args.max_new_tokens)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    sys.exit("the server did not start within 300 s")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def run_level(url: str, tokens: dict[str, str], clients: int, args) -> dict:
    """`clients` threads at once, each `args.requests` completions on its own memory."""
    latencies, generated, errors = [], [0], [0]
    lock = threading.Lock()

    def client(i: int):
        name = f"client-{i}"
        headers = {"Authorization": f"Bearer {tokens[name]}"}
        with httpx.Client(base_url=url, timeout=600) as c:
            for r in range(args.requests):
                t0 = time.perf_counter()
                try:
                    body = {"prompt": PROMPTS[(i + r) % len(PROMPTS)], "max_new_tokens": args.max_new_tokens}
                    resp = c.post(f"/v1/memories/{name}/complete", headers=headers, json=body)
                    ok = resp.status_code == 200
                except httpx.HTTPError:
                    ok = False
                dt = time.perf_counter() - t0
                with lock:
                    if ok:
                        latencies.append(dt)
                        generated[0] += resp.json()["usage"]["completion_tokens"]
                    else:
                        errors[0] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    before = httpx.get(f"{url}/health").json()
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = httpx.get(f"{url}/health").json()
    batch = (after["rows_run"] - before["rows_run"]) / max(1, after["batches_run"] - before["batches_run"])
    return {"clients": clients, "requests": len(latencies), "tokens": generated[0], "wall": wall, "batch": batch,
            "tokens_s": generated[0] / wall, "requests_s": len(latencies) / wall,
            "p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99), "errors": errors[0]}


def python_api_loop(args) -> dict:
    """One client calling the Python API in a loop: the same requests, without the server."""
    import torch

    from longmem.runtime import autocast, load_model, set_threads

    set_threads(args.threads)
    model, tok = load_model(args.model, args.device)
    memory = model.new_memory(1)
    with torch.no_grad(), autocast(model.device, args.precision):
        model.memorize(torch.tensor([tok(TEXT * args.memory_repeats)["input_ids"]], device=model.device), memory)
        warm = torch.tensor([tok(PROMPTS[0])["input_ids"]], device=model.device)
        model.generate(warm, memory=memory.select([0]), max_new_tokens=2)  # warm-up, as the server gets one
        latencies, generated = [], 0
        t0 = time.perf_counter()
        for r in range(args.requests):
            ids = torch.tensor([tok(PROMPTS[r % len(PROMPTS)])["input_ids"]], device=model.device)
            t1 = time.perf_counter()
            out = model.generate(ids, memory=memory.select([0]), max_new_tokens=args.max_new_tokens)
            latencies.append(time.perf_counter() - t1)
            new = out[0, ids.shape[1]:].tolist()
            eos = set(model.generation_config.eos_ids)
            generated += next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
        wall = time.perf_counter() - t0
    return {"clients": "Python API", "requests": args.requests, "tokens": generated, "wall": wall,
            "tokens_s": generated / wall, "requests_s": args.requests / wall, "p50": percentile(latencies, 0.5),
            "p99": percentile(latencies, 0.99), "errors": 0, "batch": 1.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--threads", type=int, default=None, help="server compute threads (default: longmem's policy)")
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=8, help="requests per client at every level")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--memory-repeats", type=int, default=20, help="copies of a ~50-token text in each memory")
    args = ap.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="serve-load-") as data_dir:
        proc = start_server(args, data_dir, port)
        try:
            tokens = {}
            for i in range(max(args.concurrency)):
                name = f"client-{i}"
                tokens[name] = httpx.post(f"{url}/v1/memories", json={"name": name}).json()["token"]
                r = httpx.post(f"{url}/v1/memories/{name}/append", json={"text": TEXT * args.memory_repeats},
                               headers={"Authorization": f"Bearer {tokens[name]}"}, timeout=600)
                assert r.status_code == 200, r.text
            run_level(url, tokens, 1, argparse.Namespace(**{**vars(args), "requests": 1}))  # warm-up
            rows = []
            for clients in args.concurrency:
                rows.append(run_level(url, tokens, clients, args))
                print(f"  {clients} clients: {rows[-1]['tokens_s']:.1f} tokens/s", file=sys.stderr, flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    rows.append(python_api_loop(args))

    print(f"model {args.model}, device {args.device}, {args.precision}; {args.requests} requests per client, "
          f"{args.max_new_tokens} new tokens at most, greedy; memory {args.memory_repeats} x {len(TEXT)} chars each\n")
    print("| clients | requests | tokens | tokens/s | requests/s | p50 latency (s) | p99 latency (s) | errors | "
          "mean batch |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['tokens']} | {r['tokens_s']:.1f} | {r['requests_s']:.2f} | "
              f"{r['p50']:.3f} | {r['p99']:.3f} | {r['errors']} | {r['batch']:.1f} |")
    base = next(r for r in rows if r["clients"] == min(args.concurrency))
    top = next(r for r in rows if r["clients"] == max(args.concurrency))
    print(f"\ntokens/s at {top['clients']} clients / at {base['clients']}: {top['tokens_s'] / base['tokens_s']:.2f}x "
          f"(target >= 3x at 16 vs 1); server at 1 client / Python API loop: "
          f"{base['tokens_s'] / rows[-1]['tokens_s']:.2f}x")


if __name__ == "__main__":
    main()
