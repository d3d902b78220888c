"""`longmem serve` on loopback: every endpoint, the isolation rules, the limits, batching and the LRU.

A real uvicorn server runs in a thread on 127.0.0.1 with a tiny checkpoint (fp32, so batched and
single-row results agree to float noise). References: memories built with the Python API
(`model.memorize`), greedy decoding by hand with the reference `RecomputeDecoder`, the memory
file on disk, and the answer for a memory that does not exist.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from longmem.decoding import RecomputeDecoder
from longmem.errors import LongMemError
from longmem.memory import MemoryBank

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

TEXT = "def bisect_left(a, x, lo=0, hi=None):\n    if lo < 0:\n        raise ValueError('lo must be non-negative')\n"


class Running:
    """A server running in a thread of this process."""

    def __init__(self, config, model, tokenizer):
        import uvicorn

        from longmem.server.app import create_app

        self.model, self.tok = model, tokenizer
        self.app = create_app(config, model, tokenizer)
        self.service = self.app.state.service
        self.uv = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.uv.run, daemon=True)
        self.thread.start()
        for _ in range(400):  # bounded: 20 s
            if self.uv.started:
                break
            time.sleep(0.05)
        assert self.uv.started, "the server did not start"
        port = self.uv.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.url, timeout=60)

    def close(self):
        self.http.close()
        self.uv.should_exit = True
        self.thread.join(20)

    def create(self, name: str) -> dict:
        r = self.http.post("/v1/memories", json={"name": name})
        assert r.status_code == 201, r.text
        return {"Authorization": f"Bearer {r.json()['token']}"}


@pytest.fixture(scope="module")
def loaded(checkpoint):
    from longmem.runtime import load_model

    return load_model(checkpoint, "cpu")


def server_config(checkpoint, data_dir, **kw):
    from longmem.server.config import ServerConfig

    base = dict(model=checkpoint, data_dir=str(data_dir), device="cpu", precision="fp32", max_body_bytes=4096,
                max_prompt_tokens=96, max_new_tokens=32, max_append_tokens=400, max_loaded=2, batch_wait_ms=20)
    base.update(kw)
    return ServerConfig(**base)


@pytest.fixture(scope="module")
def srv(checkpoint, loaded, tmp_path_factory):
    model, tok = loaded
    s = Running(server_config(checkpoint, tmp_path_factory.mktemp("memories")), model, tok)
    yield s
    s.close()


def ids_of(tok, text):
    return tok(text)["input_ids"]


def memorized(model, texts_ids) -> MemoryBank:
    """The reference: a fresh one-row memory with each token list memorized in turn (Python API)."""
    bank = model.new_memory(1)
    with torch.no_grad():
        for ids in texts_ids:
            model.memorize(torch.tensor([ids]), bank)
    return bank


def assert_same_bank(a: MemoryBank, b: MemoryBank):
    assert a.written.tolist() == b.written.tolist() and a.sizes.tolist() == b.sizes.tolist()
    ka, va = a.tokens(0)
    kb, vb = b.tokens(0)
    torch.testing.assert_close(ka, kb, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-5)


def greedy(model, memory: MemoryBank | None, ids: list[int], n: int, eos: int | None) -> list[int]:
    """Reference greedy decoding: RecomputeDecoder on a copy of the memory, argmax, stop at eos (excluded)."""
    mem = memory.select([0]) if memory is not None else model.new_memory(1)
    decoder = RecomputeDecoder(model, mem)
    out = []
    with torch.no_grad():
        logits = decoder.prefill(torch.tensor([ids]))
        for _ in range(n):
            token = int(logits.argmax(-1))
            if token == eos:
                break
            out.append(token)
            logits = decoder.step(torch.tensor([token]))
    return out


def EOS(srv) -> int | None:
    eos = srv.model.generation_config.eos_ids
    return eos[0] if eos else None


def sse_events(response) -> list[tuple[str | None, str]]:
    """(event name, data) of every server-sent event of a streamed response."""
    events, name, data = [], None, []
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data.append(line[6:])
        elif line == "" and data:
            events.append((name, "\n".join(data)))
            name, data = None, []
    return events


def error_message(r) -> str:
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == r.status_code, body
    return body["error"]["message"]


# ---- memories ------------------------------------------------------------------------------
def test_create_stats_and_duplicate(srv):
    h = srv.create("alice")
    r = srv.http.get("/v1/memories/alice", headers=h)
    assert r.status_code == 200
    s = r.json()
    assert (s["name"], s["tokens_held"], s["tokens_written"], s["capacity"]) == ("alice", 0, 0, 64)
    assert s["file_bytes"] == (srv.service.store.root / "alice" / "memory.safetensors").stat().st_size
    r = srv.http.post("/v1/memories", json={"name": "alice"})
    assert r.status_code == 409 and "already exists" in error_message(r)
    meta = json.loads((srv.service.store.root / "alice" / "meta.json").read_text())
    assert h["Authorization"].split()[1] not in json.dumps(meta)  # only the hash is stored


def test_append_is_memorize_and_on_disk(srv):
    h = srv.create("appender")
    a, b = ids_of(srv.tok, TEXT), ids_of(srv.tok, "hello world, " * 7)
    for text in (TEXT, "hello world, " * 7):
        r = srv.http.post("/v1/memories/appender/append", json={"text": text}, headers=h)
        assert r.status_code == 200, r.text
    body = r.json()
    assert body["appended_tokens"] == len(b) and body["stats"]["tokens_written"] == len(a) + len(b)
    reference = memorized(srv.model, [a, b])
    on_disk = MemoryBank.load(srv.service.store.root / "appender" / "memory.safetensors")
    assert_same_bank(on_disk, reference)
    assert body["stats"]["tokens_held"] == int(reference.sizes[0])


def test_export_import_roundtrip_and_bad_files(srv, tmp_path):
    h = srv.create("src")
    srv.http.post("/v1/memories/src/append", json={"text": TEXT}, headers=h)
    data = srv.http.get("/v1/memories/src/file", headers=h)
    assert data.status_code == 200
    assert data.content == (srv.service.store.root / "src" / "memory.safetensors").read_bytes()
    h2 = srv.create("dst")
    r = srv.http.put("/v1/memories/dst/file", content=data.content, headers=h2)
    assert r.status_code == 200, r.text
    assert r.json()["tokens_written"] == len(ids_of(srv.tok, TEXT))
    exported = tmp_path / "src.safetensors"
    exported.write_bytes(data.content)
    assert_same_bank(MemoryBank.load(srv.service.store.root / "dst" / "memory.safetensors"), MemoryBank.load(exported))

    before = (srv.service.store.root / "dst" / "memory.safetensors").read_bytes()
    flipped = bytearray(data.content)
    flipped[-3] ^= 0xFF
    two_rows = tmp_path / "two.safetensors"
    MemoryBank.stack([MemoryBank.load(exported)] * 2).save(two_rows)
    other = tmp_path / "other.safetensors"
    srv.model.new_memory(1, memory_size=32).save(other)
    for content, fragment in [(bytes(flipped), "fails its checksum"), (b"not a memory file", "corrupt or truncated"),
                              (two_rows.read_bytes(), "holds 2 rows"), (other.read_bytes(), "capacity 32"),
                              (b"", "the request body is empty")]:
        r = srv.http.put("/v1/memories/dst/file", content=content, headers=h2)
        assert r.status_code == 400 and fragment in error_message(r), (fragment, r.text)
    assert (srv.service.store.root / "dst" / "memory.safetensors").read_bytes() == before  # nothing replaced
    assert not list((srv.service.store.root / "dst").glob(".*.tmp"))


def test_import_of_another_models_memory_is_refused(srv, tmp_path):
    from longmem.memory import MemorySpec

    spec = srv.model.memory_spec()
    foreign = tmp_path / "foreign.safetensors"
    MemoryBank(MemorySpec(**{**spec.__dict__, "fingerprint": "0123456789abcdef:layer1"}), 1).save(foreign)
    h = srv.create("foreign")
    r = srv.http.put("/v1/memories/foreign/file", content=foreign.read_bytes(), headers=h)
    assert r.status_code == 400 and "written for a different model" in error_message(r)


def test_delete(srv):
    h = srv.create("doomed")
    r = srv.http.delete("/v1/memories/doomed", headers=h)
    assert r.status_code == 204
    assert not (srv.service.store.root / "doomed").exists() and "doomed" not in srv.service.store.loaded()
    gone = srv.http.get("/v1/memories/doomed", headers=h)
    never = srv.http.get("/v1/memories/never-made", headers=h)
    assert gone.status_code == never.status_code == 404
    assert error_message(gone) == error_message(never).replace("never-made", "doomed")
    srv.create("doomed")  # the name is free again


# ---- isolation -------------------------------------------------------------------------------
def test_wrong_token_same_answer_whether_or_not_the_memory_exists(srv):
    srv.create("private")
    wrong = {"Authorization": "Bearer " + "x" * 43}
    routes = [("GET", "/v1/memories/{}", None), ("POST", "/v1/memories/{}/append", {"text": "hi"}),
              ("GET", "/v1/memories/{}/file", None), ("PUT", "/v1/memories/{}/file", b"abc"),
              ("DELETE", "/v1/memories/{}", None), ("POST", "/v1/memories/{}/complete", {"prompt": "hi"}),
              ("POST", "/v1/memories/{}/chat", {"messages": [{"role": "user", "content": "hi"}]})]
    for method, path, body in routes:
        answers = []
        for name in ("private", "no-such-memory"):
            kw = {"content": body} if isinstance(body, bytes) else {"json": body}
            r = srv.http.request(method, path.format(name), headers=wrong, **kw)
            answers.append((r.status_code, error_message(r).replace(name, "NAME")))
        assert answers[0] == answers[1] and answers[0][0] == 404, (method, path, answers)
    for kind, body in [("completions", {"prompt": "hi"}), ("chat/completions",
                                                          {"messages": [{"role": "user", "content": "hi"}]})]:
        answers = [srv.http.post(f"/v1/{kind}", json={**body, "memory": name}, headers=wrong)
                   for name in ("private", "no-such-memory")]
        assert [a.status_code for a in answers] == [404, 404]
        assert error_message(answers[0]).replace("private", "N") == error_message(answers[1]).replace(
            "no-such-memory", "N")
    r = srv.http.get("/v1/memories/private")
    assert r.status_code == 401 and "Authorization: Bearer" in error_message(r)
    assert srv.service.store.root.joinpath("private").is_dir()  # the DELETE with the wrong token did nothing


def test_one_memorys_token_does_not_open_another(srv):
    ha, _ = srv.create("tok-a"), srv.create("tok-b")
    assert srv.http.get("/v1/memories/tok-a", headers=ha).status_code == 200
    assert srv.http.get("/v1/memories/tok-b", headers=ha).status_code == 404


@pytest.mark.parametrize("name", ["..", ".hidden", "a.b", "x" * 65, "-lead", "caf\u00e9", "a b"])
def test_invalid_names_are_refused(srv, name):
    r = srv.http.post("/v1/memories", json={"name": name})
    assert r.status_code == 400 and "invalid memory name" in error_message(r)
    r = srv.http.get(f"/v1/memories/{httpx.URL('/x/' + name).raw_path.decode()[3:]}",
                     headers={"Authorization": "Bearer t"})
    assert r.status_code in (400, 404)  # ".." is normalised away by the client: then no such route
    root = srv.service.store.root
    assert not any(p.name.startswith(".") and not p.name.startswith(".staging") for p in root.iterdir())


def test_traversal_in_the_path_never_reaches_the_disk(srv):
    r = srv.http.get("/v1/memories/..%2F..%2Fetc/file", headers={"Authorization": "Bearer t"})
    assert r.status_code in (400, 404)
    if r.status_code == 400:
        assert "invalid memory name" in error_message(r)


# ---- limits ---------------------------------------------------------------------------------
def test_body_and_encoding_limits(srv):
    h = srv.create("limits")
    url = "/v1/memories/limits/append"
    cases = [  # (body bytes, status, fragment of the message)
        (json.dumps({"text": "a" * 5000}).encode(), 413, "at most 4,096 bytes"),
        (b'{"text": "caf\xe9"}', 400, "not UTF-8 (byte 0xe9 at offset 13)"),
        (b'{"text": "unterminated', 400, "not valid JSON"),
        (b'{"text": "a"', 400, "not valid JSON"),
        (b'{"text": "\\ud800"}', 400, "unpaired surrogate"),
        (b"[" * 3000 + b"]" * 3000, 413, "at most"),
        (b"[" * 2000 + b"]" * 2000, 400, "nests JSON too deeply"),
        (b'{"text": 5}', 422, "text: Input should be a valid string"),
        (b'{"txt": "a"}', 422, "text: Field required"),
        (b'{"text": ""}', 400, "the text to append is empty"),
        (json.dumps({"text": "word " * 450}).encode(), 400, "this server accepts at most 400"),
    ]
    for body, status, fragment in cases:
        r = srv.http.post(url, content=body, headers={**h, "Content-Type": "application/json"})
        assert r.status_code == status and fragment in error_message(r), (body[:40], r.status_code, r.text)

    def chunks():  # no Content-Length: refused while it streams in
        for _ in range(10):
            yield b"x" * 1000
    r = srv.http.post(url, content=chunks(), headers={**h, "Content-Type": "application/json"})
    assert r.status_code == 413


def test_generation_limits(srv):
    h = srv.create("genlimits")
    url = "/v1/memories/genlimits/complete"
    cases = [
        ({"prompt": "x " * 200}, 400, "this server accepts at most 96"),
        ({"prompt": "hi", "max_new_tokens": 33}, 400, "over this server's limit of 32"),
        ({"prompt": "hi", "max_new_tokens": 0}, 422, "max_new_tokens: Input should be greater than or equal to 1"),
        ({"prompt": ""}, 400, "the prompt is empty"),
        ({"prompt": "hi", "temperature": -1}, 422, "temperature"),
        ({"prompt": "hi", "top_k": 5}, 400, "top_k=5 only applies when sampling"),
        ({"prompt": "hi", "unknown": 1}, 422, "unknown: Extra inputs are not permitted"),
    ]
    for body, status, fragment in cases:
        r = srv.http.post(url, json=body, headers=h)
        assert r.status_code == status and fragment in error_message(r), (body, r.text)
    r = srv.http.post(url, content=b'{"prompt": "hi", "temperature": NaN}',
                      headers={**h, "Content-Type": "application/json"})
    assert r.status_code == 422 and "temperature" in error_message(r)
    r = srv.http.post("/v1/completions", json={"prompt": "hi", "n": 2})
    assert r.status_code == 422 and "n: Input should be 1" in error_message(r)
    r = srv.http.post("/v1/completions", json={"prompt": ["a", "b"]})
    assert r.status_code == 400 and "one prompt per request" in error_message(r)
    r = srv.http.post("/v1/completions", json={"prompt": "hi", "append": True})
    assert r.status_code == 400 and "append needs a memory" in error_message(r)
    r = srv.http.post("/v1/completions", json={"prompt": "hi", "model": "gpt-4"})
    assert r.status_code == 404 and "this server has one model" in error_message(r)


# ---- generation -------------------------------------------------------------------------------
def test_complete_matches_reference_greedy_and_leaves_the_memory_alone(srv):
    h = srv.create("gen")
    srv.http.post("/v1/memories/gen/append", json={"text": TEXT * 2}, headers=h)
    path = srv.service.store.root / "gen" / "memory.safetensors"
    before = path.read_bytes()
    prompt = "    if hi is None:\n        hi = len(a)\n" * 3  # longer than a segment: its prefix is memorized
    r = srv.http.post("/v1/memories/gen/complete", json={"prompt": prompt, "max_new_tokens": 10}, headers=h)
    assert r.status_code == 200, r.text
    out = r.json()
    ids = ids_of(srv.tok, prompt)
    expected = greedy(srv.model, MemoryBank.load(path), ids, 10, EOS(srv))
    assert out["token_ids"] == expected and out["text"] == srv.tok.decode(expected, skip_special_tokens=True)
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(expected),
                            "total_tokens": len(ids) + len(expected)}
    assert out["finish_reason"] == ("length" if len(expected) == 10 else "stop") and out["appended"] is None
    assert path.read_bytes() == before  # generation ran on a copy
    without = greedy(srv.model, None, ids, 10, EOS(srv))
    r = srv.http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 10, "temperature": 0})
    assert r.json()["choices"][0]["text"] == srv.tok.decode(without, skip_special_tokens=True)

    with srv.http.stream("POST", "/v1/memories/gen/complete", headers=h,
                         json={"prompt": prompt, "max_new_tokens": 10, "stream": True}) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        events = sse_events(s)
    assert [e for e, _ in events[:-1]] == ["token"] * (len(events) - 1) and events[-1][0] == "done"
    assert "".join(json.loads(d)["text"] for _, d in events[:-1]) == out["text"]
    assert json.loads(events[-1][1]) == out


def test_append_the_exchange(srv):
    h = srv.create("conv")
    srv.http.post("/v1/memories/conv/append", json={"text": TEXT}, headers=h)
    r = srv.http.post("/v1/memories/conv/complete", json={"prompt": "while lo < hi:", "max_new_tokens": 6,
                                                          "append": True}, headers=h)
    out = r.json()
    prompt_ids = ids_of(srv.tok, "while lo < hi:")
    reference = memorized(srv.model, [ids_of(srv.tok, TEXT), prompt_ids + out["token_ids"]])
    assert out["appended"]["tokens_written"] == int(reference.written[0])
    assert_same_bank(MemoryBank.load(srv.service.store.root / "conv" / "memory.safetensors"), reference)


def test_stop_strings_and_length(srv):
    h = srv.create("stops")
    prompt = "import heapq\n"
    full = srv.http.post("/v1/memories/stops/complete", json={"prompt": prompt, "max_new_tokens": 12}, headers=h).json()
    text = full["text"]
    stop = next(text[i:i + 2] for i in range(1, len(text) - 1) if text[i:i + 2].isascii() and text[i:i + 2].isalnum())
    cut = srv.http.post("/v1/memories/stops/complete", json={"prompt": prompt, "max_new_tokens": 12,
                                                             "stop_strings": [stop]}, headers=h).json()
    assert cut["text"] == text[:text.find(stop)] and cut["finish_reason"] == "stop"
    with srv.http.stream("POST", "/v1/completions", json={"prompt": prompt, "max_tokens": 12, "temperature": 0,
                                                          "stop": stop, "stream": True}) as s:
        chunks = [d for _, d in sse_events(s)]
    assert chunks[-1] == "[DONE]"
    parsed = [json.loads(c) for c in chunks[:-1]]
    assert "".join(p["choices"][0]["text"] for p in parsed) == cut["text"]
    assert parsed[-1]["choices"][0]["finish_reason"] == "stop" and parsed[-1]["usage"]["completion_tokens"] >= 1
    short = srv.http.post("/v1/memories/stops/complete", json={"prompt": prompt, "max_new_tokens": 3}, headers=h).json()
    assert short["token_ids"] == full["token_ids"][:3] and short["finish_reason"] == "length"


def test_chat_native_and_openai(srv):
    from longmem.server.prompts import chat_prompt

    h = srv.create("chatty")
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "sort a list"}]
    prompt, stops = chat_prompt(srv.tok, messages)
    assert prompt == "System: You write Python.\nUser: sort a list\nAssistant:" and stops == ["\nUser:", "\nSystem:"]
    native = srv.http.post("/v1/memories/chatty/chat", json={"messages": messages, "max_new_tokens": 8}, headers=h)
    reference = srv.http.post("/v1/memories/chatty/complete", headers=h,
                              json={"prompt": prompt, "max_new_tokens": 8, "stop_strings": stops}).json()
    assert native.json() == reference
    r = srv.http.post("/v1/chat/completions", headers=h, json={"messages": messages, "max_tokens": 8,
                                                               "temperature": 0, "memory": "chatty"})
    body = r.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"] == {
        "role": "assistant", "content": reference["text"]}
    assert body["usage"] == reference["usage"]
    with srv.http.stream("POST", "/v1/chat/completions", headers=h, json={
            "messages": messages, "max_tokens": 8, "temperature": 0, "memory": "chatty", "stream": True,
            "stream_options": {"include_usage": True}}) as s:
        chunks = [d for _, d in sse_events(s)]
    parsed = [json.loads(c) for c in chunks[:-1]]
    assert chunks[-1] == "[DONE]" and parsed[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(p["choices"][0]["delta"].get("content", "") for p in parsed if p["choices"]) == reference["text"]
    assert parsed[-1]["choices"] == [] and parsed[-1]["usage"] == reference["usage"]


def test_sampling_with_a_seed_is_reproducible(srv):
    h = srv.create("seeded")
    body = {"prompt": "import heapq\n", "max_new_tokens": 10, "do_sample": True, "temperature": 1.5, "seed": 7}
    a, b = (srv.http.post("/v1/memories/seeded/complete", json=body, headers=h).json() for _ in range(2))
    assert a["token_ids"] == b["token_ids"]
    others = [srv.http.post("/v1/memories/seeded/complete", json={**body, "seed": s}, headers=h).json()["token_ids"]
              for s in (8, 9, 10)]
    assert any(o != a["token_ids"] for o in others)  # the seed is used


# ---- concurrency ------------------------------------------------------------------------------
def test_requests_for_different_memories_share_a_batch(srv):
    prompts = ["def a(x):\n", "class B:\n    pass\n" * 3, "import os", "x = [1, 2, 3]\nfor i in x:\n"]
    headers = []
    for i, text in enumerate(("alpha beta " * 9, TEXT, "", "gamma " * 20)):
        headers.append(srv.create(f"batch-{i}"))
        if text:
            srv.http.post(f"/v1/memories/batch-{i}/append", json={"text": text}, headers=headers[-1])
    start = len(srv.service.scheduler.batches)

    def ask(i):
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            return c.post(f"/v1/memories/batch-{i}/complete", headers=headers[i],
                          json={"prompt": prompts[i], "max_new_tokens": 8 - i}).json()
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(ask, range(4)))
    assert max(srv.service.scheduler.batches[start:]) > 1  # at least two of them ran in one forward
    for i, out in enumerate(outs):
        bank = MemoryBank.load(srv.service.store.root / f"batch-{i}" / "memory.safetensors")
        assert out["token_ids"] == greedy(srv.model, bank, ids_of(srv.tok, prompts[i]), 8 - i, EOS(srv))


def test_concurrent_appends_to_one_memory_are_serialised(srv):
    h = srv.create("shared")
    text = "heap push pop. "

    def append(_):
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            return c.post("/v1/memories/shared/append", json={"text": text}, headers=h).status_code
    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(append, range(6))) == [200] * 6
    reference = memorized(srv.model, [ids_of(srv.tok, text)] * 6)
    assert_same_bank(MemoryBank.load(srv.service.store.root / "shared" / "memory.safetensors"), reference)


def test_loaded_memories_are_bounded_lru(srv):
    hs = [srv.create(f"lru-{i}") for i in range(3)]
    for i, h in enumerate(hs):
        srv.http.post(f"/v1/memories/lru-{i}/append", json={"text": f"memory number {i}. " * (i + 1)}, headers=h)
    assert srv.service.store.loaded() == ["lru-1", "lru-2"]  # max_loaded=2: lru-0 went first
    r = srv.http.get("/v1/memories/lru-0", headers=hs[0])  # re-read from disk
    assert r.json()["tokens_written"] == len(ids_of(srv.tok, "memory number 0. "))
    assert srv.service.store.loaded() == ["lru-2", "lru-0"]


def test_the_servers_retriever_searches_every_memory(checkpoint, loaded, tmp_path, monkeypatch):
    """--retriever reaches the memories the server loads and the banks a batch generates with (it was ignored)."""
    model, tok = loaded
    stacked = []
    stack = MemoryBank.stack.__func__

    def recording_stack(cls, banks):
        stacked.append(stack(cls, banks))
        return stacked[-1]

    monkeypatch.setattr(MemoryBank, "stack", classmethod(recording_stack))
    s = Running(server_config(checkpoint, tmp_path, retriever="torch-ivf:min_chunks=8"), model, tok)
    try:
        h = s.create("ivf")
        s.http.post("/v1/memories/ivf/append", json={"text": TEXT * 2}, headers=h)
        s.service.store._loaded.clear()  # read back from disk
        bank = s.service.store.get("ivf")
        assert (bank.retriever.name, bank.retriever.min_chunks) == ("torch-ivf", 8)
        assert bank.retriever.rows[0] is not None  # an index was built over its chunks
        r = s.http.post("/v1/memories/ivf/complete", json={"prompt": "while lo < hi:", "max_new_tokens": 4}, headers=h)
        r2 = s.http.post("/v1/completions", json={"prompt": "while lo", "max_tokens": 2})  # no memory: a new one
        assert r.status_code == r2.status_code == 200 and len(stacked) == 2
        assert [b.retriever.name for b in stacked] == ["torch-ivf", "torch-ivf"]
    finally:
        s.close()
    with pytest.raises(LongMemError, match="'annoy' is not one of"):
        server_config(checkpoint, tmp_path, retriever="annoy").validate()


def test_docs_health_and_models(srv):
    assert srv.http.get("/docs").status_code == 200
    spec = srv.http.get("/openapi.json").json()
    for path in ("/v1/memories", "/v1/memories/{name}", "/v1/memories/{name}/append", "/v1/memories/{name}/file",
                 "/v1/memories/{name}/complete", "/v1/memories/{name}/chat", "/v1/completions",
                 "/v1/chat/completions", "/v1/models", "/health"):
        assert path in spec["paths"], path
    assert srv.http.get("/health").json()["status"] == "ok"
    assert srv.http.get("/v1/models").json()["data"][0]["id"] == srv.service.config.model


def test_recover_removes_what_a_crash_left(checkpoint, loaded, tmp_path):
    from longmem.server.store import MemoryStore

    model, _ = loaded
    store = MemoryStore(tmp_path, model.memory_spec(), "cpu")
    token = store.create("kept")
    (tmp_path / ".staging-abc").mkdir()
    (tmp_path / ".staging-abc" / "memory.safetensors").write_bytes(b"half")
    (tmp_path / "kept" / ".memory.safetensors.x1.tmp").write_bytes(b"torn")
    assert sorted(store.recover()) == [".staging-abc", "kept/.memory.safetensors.x1.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"] and store.names() == ["kept"]
    store.authorize("kept", token)
    assert int(store.get("kept").written[0]) == 0


def test_a_client_that_leaves_mid_stream_frees_the_memory(srv):
    h = srv.create("leaver")
    with srv.http.stream("POST", "/v1/memories/leaver/complete", headers=h,
                         json={"prompt": "import heapq\n", "max_new_tokens": 32, "stream": True, "append": True}) as s:
        next(s.iter_lines())  # the first event, then hang up
    for _ in range(100):  # bounded: the lock is released once the server notices
        r = srv.http.post("/v1/memories/leaver/append", json={"text": "still here"}, headers=h, timeout=5)
        if r.status_code == 200:
            break
    assert r.status_code == 200
    assert r.json()["stats"]["tokens_written"] == len(ids_of(srv.tok, "still here"))  # the cut exchange was not kept


@pytest.mark.parametrize("argv, message", [
    ("serve --model {ckpt} --port 70000", "--port: '70000' is not a TCP port"),
    ("serve --model {ckpt} --data-dir {file}", "--data-dir {file} is an existing file; give a folder path"),
    ("serve --model {tmp}/nope", "is not a LongMem checkpoint"),
    ("serve --model {ckpt} --max-new-tokens 0", "--max-new-tokens: '0' is not a number of tokens"),
    ("serve --model {ckpt} --precision fp8", "argument --precision: invalid choice"),
    ("serve --model {ckpt} --retriever faiss-ivf:ef_search=3", "'ef_search=3' is not a setting of faiss-ivf"),
])
def test_serve_command_line_errors(checkpoint, tmp_path, capsys, monkeypatch, argv, message):
    import longmem.server.app
    from longmem.cli import main

    monkeypatch.setattr(longmem.server.app, "serve", lambda config: pytest.fail("the server must not start"))
    (tmp_path / "f.txt").write_text("x")
    fill = dict(ckpt=checkpoint, tmp=tmp_path, file=tmp_path / "f.txt")
    assert main(argv.format(**fill).split()) == 2
    err = capsys.readouterr().err
    assert message.format(**fill) in err and len(err.strip().splitlines()) == 1, err
