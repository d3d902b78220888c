"""Kill -9 in the middle of concurrent appends, then restart: nothing acknowledged is lost, nothing is torn.

`longmem serve` runs as its own process on loopback. Client threads append (two threads per
memory, so same-memory appends are serialised by the server, and three memories at once);
once enough appends are acknowledged the server gets SIGKILL while requests are in flight.
After a restart on the same folder: the server starts cleanly (leftover temporary files
removed), every memory file passes its checksum, each memory holds at least every
acknowledged append and at most those plus the ones in flight, and its contents equal the
reference `model.memorize` of that many appends.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from longmem.memory import MemoryBank
from test_server import assert_same_bank, ids_of, memorized

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

ROOT = Path(__file__).resolve().parents[1]
TEXTS = {"m0": "alpha beta gamma. ", "m1": "def f(x): return x + 1\n", "m2": "the cat sat on the mat; "}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(checkpoint: str, data_dir: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "longmem.cli", "serve", "--model", checkpoint, "--device", "cpu",
                             "--precision", "fp32", "--data-dir", str(data_dir), "--port", str(port)],
                            env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # bounded wait for /health
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not come up within 120 s")


def test_sigkill_mid_appends_then_restart(checkpoint, tok, tmp_path):
    from longmem.runtime import load_model

    data = tmp_path / "memories"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(checkpoint, data, port)
    try:
        tokens = {name: httpx.post(f"{url}/v1/memories", json={"name": name}).json()["token"] for name in TEXTS}
        acked = {name: 0 for name in TEXTS}
        in_flight = {name: 0 for name in TEXTS}
        lock, enough = threading.Lock(), threading.Event()

        def client(name: str):
            headers = {"Authorization": f"Bearer {tokens[name]}"}
            with httpx.Client(base_url=url, timeout=30) as c:
                for _ in range(60):  # bounded
                    with lock:
                        in_flight[name] += 1
                    try:
                        r = c.post(f"/v1/memories/{name}/append", json={"text": TEXTS[name] * 3}, headers=headers)
                    except httpx.TransportError:
                        return  # the server died with this append in flight (it may or may not have landed)
                    with lock:
                        in_flight[name] -= 1
                        assert r.status_code == 200, r.text
                        acked[name] += 1
                        if sum(acked.values()) >= 15:
                            enough.set()

        threads = [threading.Thread(target=client, args=(name,)) for name in TEXTS for _ in range(2)]
        for t in threads:
            t.start()
        assert enough.wait(120), f"too few appends acknowledged: {acked}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        for t in threads:
            t.join(60)
        assert sum(in_flight.values()) >= 1  # killed mid-load, with requests outstanding
    finally:
        proc.kill()
        proc.wait(30)

    proc = start(checkpoint, data, port)
    try:
        assert not [p for p in data.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".staging")]
        model, _ = load_model(checkpoint, "cpu")
        for name, text in TEXTS.items():
            headers = {"Authorization": f"Bearer {tokens[name]}"}
            stats = httpx.get(f"{url}/v1/memories/{name}", headers=headers).json()
            per_append = len(ids_of(tok, text * 3))
            held, rest = divmod(stats["tokens_written"], per_append)
            assert rest == 0 and acked[name] <= held <= acked[name] + in_flight[name], (name, stats, acked, in_flight)
            bank = MemoryBank.load(data / name / "memory.safetensors")  # checksum verified
            assert_same_bank(bank, memorized(model, [ids_of(tok, text * 3)] * held))
        r = httpx.post(f"{url}/v1/memories/m0/append", json={"text": "after the restart"},
                       headers={"Authorization": f"Bearer {tokens['m0']}"})
        assert r.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
