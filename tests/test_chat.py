"""ChatSession and `longmem chat`: every turn goes into memory, the memory file is saved after each turn, a reopened
session continues from its file, and a process killed (SIGKILL) at random moments of its save loop always leaves a
file that loads, holding the previous or the new memory.

References: `model.generate` + `model.memorize` on a fresh memory (what a turn must leave in memory), the file
reloaded from disk, one uninterrupted session (for a reopened one), and a replay of the saved segments (for the
files left by the killed processes).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longmem import LongMemError, LongMemForCausalLM, MemoryBank
from longmem.chat import TEMPLATE, ChatSession, chat_options

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lm(checkpoint):
    return LongMemForCausalLM.from_pretrained(checkpoint)


def same_memory(a: MemoryBank, b: MemoryBank) -> bool:
    return int(a.written[0]) == int(b.written[0]) and all(torch.equal(x, y) for x, y in zip(a.tokens(0), b.tokens(0)))


def options(lm, n: int):
    return chat_options(lm).replace(max_new_tokens=n, eos_token_id=None)


def expected_turn(lm, tok, memory, text: str, n: int):
    """The reply (text), the memory after a turn and the turn's length in tokens, from the public generate and
    memorize on `memory`."""
    prompt = tok(TEMPLATE.format(text=text), return_tensors="pt").input_ids
    before = int(memory.written[0])
    out = lm.generate(prompt, memory=memory, max_new_tokens=n, eos_token_id=None, stop_strings="\nUser:", tokenizer=tok)
    fed = int(memory.written[0]) - before  # what generate already wrote: a prefix of the turn
    lm.memorize(out[:, fed:], memory)
    reply = tok.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)
    return reply.split("\nUser:")[0].lstrip(), memory, out.shape[1]


# a turn inside the local context (32 tokens); one whose reply overflows it into memory during generation
@pytest.mark.parametrize("text, n", [("Hi", 6), ("Where is the old house?", 45)])
def test_a_turn_is_memorized_and_saved(lm, tok, tmp_path, text, n):
    path = tmp_path / "chat.safetensors"
    session = ChatSession(lm, tok, path, options(lm, n))
    assert path.is_file() and int(MemoryBank.load(path).written[0]) == 0  # created at once
    reply = "".join(session.say(text))
    want, memory, length = expected_turn(lm, tok, lm.new_memory(1), text, n)
    assert reply == want
    assert same_memory(session.memory, memory) and int(memory.written[0]) == length  # every token, once
    assert same_memory(MemoryBank.load(path), memory)  # saved after the turn
    if n == 6:  # the whole turn is one memorize of its tokens
        assert length <= lm.config.segment_length
        ref = lm.new_memory(1)
        prompt = tok(TEMPLATE.format(text=text))["input_ids"]
        lm.memorize(lm.generate(torch.tensor([prompt]), max_new_tokens=n, eos_token_id=None), ref)
        assert same_memory(session.memory, ref) and int(ref.written[0]) == len(prompt) + n
    else:
        assert length > lm.config.segment_length + 1


def test_a_reopened_session_continues_from_its_file(lm, tok, tmp_path):
    turns = ["Hello there.", "The cat walked along the wall.", "What did the cat do?"]
    one = ChatSession(lm, tok, tmp_path / "one.st", options(lm, 20))
    replies_one = ["".join(one.say(t)) for t in turns]
    first = ChatSession(lm, tok, tmp_path / "two.st", options(lm, 20))
    replies_two = ["".join(first.say(t)) for t in turns[:2]]
    del first
    again = ChatSession(lm, tok, tmp_path / "two.st", options(lm, 20))
    replies_two.append("".join(again.say(turns[2])))
    assert replies_two == replies_one
    assert same_memory(MemoryBank.load(tmp_path / "two.st"), MemoryBank.load(tmp_path / "one.st"))
    assert int(again.memory.written[0]) > 3 * len(tok(TEMPLATE.format(text="")).input_ids)


def test_an_unfinished_turn_is_not_kept(lm, tok, tmp_path):
    path = tmp_path / "chat.st"
    session = ChatSession(lm, tok, path, options(lm, 45))
    "".join(session.say("Hello there."))
    saved = path.read_bytes()
    reply = session.say("Tell me about the garden and the windows of the old house.")
    next(reply)
    with pytest.raises(LongMemError, match="the previous reply is still being streamed"):
        session.say("Not now.")
    reply.close()  # the consumer stops listening mid-reply (the reply overflowed nothing yet, or did: either way)
    assert path.read_bytes() == saved
    assert same_memory(session.memory, MemoryBank.load(path))  # the session went back to its file

    def broken(*a, **k):
        raise LongMemError("cannot write: disk on fire")

    for target in (lm, MemoryBank):  # the turn fails while it is memorized / while the memory is saved
        name = "memorize" if target is lm else "save"
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(target, name, broken)
            with pytest.raises(LongMemError, match="disk on fire"):
                "".join(session.say("Another turn, one that fails."))
        assert path.read_bytes() == saved and same_memory(session.memory, MemoryBank.load(path))


def test_the_reply_starts_at_its_first_character_and_ends_before_the_next_user_turn(lm, tok, tmp_path, monkeypatch):
    import longmem.decoding
    from test_generation import Scripted

    reply = tok("  Hello there.\nUser: and more")["input_ids"]
    monkeypatch.setattr(longmem.decoding, "make_decoder", lambda model, memory, incremental: Scripted([reply], len(tok)))
    session = ChatSession(lm, tok, tmp_path / "c.st", options(lm, len(reply)))
    assert "".join(session.say("Hi")) == "Hello there."
    prompt = tok(TEMPLATE.format(text="Hi"))["input_ids"]
    n = next(i for i in range(len(reply)) if "\nUser:" in tok.decode(reply[:i]))  # the reply's tokens, to the stop
    assert int(session.memory.written[0]) == len(prompt) + n  # the turn in memory is what the model produced


def test_reset_and_bad_input(lm, tok, tmp_path):
    session = ChatSession(lm, tok, tmp_path / "chat.st", options(lm, 4))
    "".join(session.say("Hello."))
    assert int(MemoryBank.load(tmp_path / "chat.st").written[0]) > 0
    session.reset()
    assert int(MemoryBank.load(tmp_path / "chat.st").written[0]) == 0
    with pytest.raises(LongMemError, match="say\\(\\) needs some text"):
        session.say("  ")
    with pytest.raises(LongMemError, match="is a folder"):
        ChatSession(lm, tok, tmp_path)
    two = lm.new_memory(2)
    two.save(tmp_path / "two.st")
    with pytest.raises(LongMemError, match="has 2 rows; a conversation needs a single-row memory"):
        ChatSession(lm, tok, tmp_path / "two.st")


def test_longmem_chat_repl(checkpoint, lm, tok, tmp_path, capsys, monkeypatch):
    from longmem.cli import main
    from longmem.runtime import autocast

    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there.\n/reset\n\nThe cat sat.\n/nope\n/quit\nnot read\n"))
    rc = main(["chat", "--model", checkpoint, "--memory", str(tmp_path / "c.st"), "--max-new-tokens", "8",
               "--ignore-eos", "--threads", "1"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    with autocast("cpu"):  # what the CLI runs under
        ref = ChatSession(lm, tok, tmp_path / "ref.st", options(lm, 8))
        first = "".join(ref.say("Hello there."))
        ref.reset()
        second = "".join(ref.say("The cat sat."))
    assert out == f"{first}\n{second}\n"
    assert "(memory cleared)" in err and "unknown command /nope" in err
    assert same_memory(MemoryBank.load(tmp_path / "c.st"), MemoryBank.load(tmp_path / "ref.st"))


# ---- kill -9 during the save loop --------------------------------------------------------------------------------
SEGMENT = 256  # tokens per save
HELPER = r"""
import json, os, random, shutil, signal, sys, time
import torch
import longmem.memory.bank
from longmem.memory import MemoryBank, MemorySpec

path, snaps, kills = sys.argv[1], sys.argv[2], int(sys.argv[3])
spec = MemorySpec(num_kv_heads=2, head_dim=64, chunk_size=4, capacity=8192, dtype="float32", fingerprint="kill-test")

def segment(i):
    g = torch.Generator().manual_seed(i)
    return torch.randn(1, %(seg)d, 2, 64, generator=g), torch.randn(1, %(seg)d, 2, 64, generator=g)

flag = os.open(os.path.join(snaps, "saving"), os.O_RDWR | os.O_CREAT)  # b"1" while the file is being written
write_file = longmem.memory.bank.save_safetensors

def flagged(*args, **kwargs):  # MemoryBank.save's file writing, marked so that the kills can aim at it
    os.pwrite(flag, b"1", 0)
    write_file(*args, **kwargs)
    os.pwrite(flag, b"0", 0)

longmem.memory.bank.save_safetensors = flagged

def save_loop():  # like a chat: open the file, add a turn, save, forever
    while True:
        memory = MemoryBank.load(path) if os.path.exists(path) else MemoryBank(spec, 1)
        memory.write(*segment(int(memory.written[0]) // %(seg)d))
        memory.save(path)

folder, mid_save, crashed = os.path.dirname(path), 0, 0
random.seed(0)
for k in range(kills):
    pid = os.fork()
    if pid == 0:
        try:
            save_loop()
        except BaseException as e:
            print(f"a save loop failed: {e!r}", file=sys.stderr, flush=True)
        os._exit(1)
    time.sleep(random.uniform(0.0, 0.03))
    exited = 0
    while os.pread(flag, 1, 0) != b"1" and not exited:  # aim at a save: wait for one to start
        exited = os.waitpid(pid, os.WNOHANG)[0]
    if exited:  # the child failed on its own (it could not load the file it left before)
        crashed += 1
    else:
        time.sleep(random.uniform(0.0, 0.002))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    mid_save += os.pread(flag, 1, 0) == b"1"
    os.pwrite(flag, b"0", 0)
    for f in os.listdir(folder):  # what a save in flight left behind
        if f.endswith(".tmp"):
            os.unlink(os.path.join(folder, f))
    if os.path.exists(path):
        shutil.copyfile(path, os.path.join(snaps, f"{k}.safetensors"))
print(json.dumps({"kills": kills, "mid_save": mid_save, "crashed": crashed}))
""" % {"seg": SEGMENT}


def test_kill_9_during_saves_never_leaves_a_torn_file(tmp_path):
    from longmem.memory import MemorySpec

    (tmp_path / "mem").mkdir()
    (tmp_path / "snaps").mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", HELPER, str(tmp_path / "mem" / "chat.safetensors"),
                          str(tmp_path / "snaps"), "40"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["crashed"] == 0, (report, run.stderr)  # every child could load the file the last one left
    assert report["mid_save"] >= 5, report  # kills did land inside saves
    spec = MemorySpec(num_kv_heads=2, head_dim=64, chunk_size=4, capacity=8192, dtype="float32",
                      fingerprint="kill-test")
    snapshots = sorted(tmp_path.joinpath("snaps").glob("*.safetensors"), key=lambda p: int(p.stem))
    assert len(snapshots) >= 30
    counts = []
    for snap in snapshots:
        memory = MemoryBank.load(snap)  # loads (the checksum of every tensor byte is verified)
        written = int(memory.written[0])
        assert written % SEGMENT == 0
        ref = MemoryBank(spec, 1)  # replay the saves: the file holds exactly the state after one of them
        for i in range(written // SEGMENT):
            g = torch.Generator().manual_seed(i)
            ref.write(torch.randn(1, SEGMENT, 2, 64, generator=g), torch.randn(1, SEGMENT, 2, 64, generator=g))
        assert same_memory(memory, ref)
        assert all(torch.equal(getattr(memory, n), getattr(ref, n)) for n in ("num_chunks", "next_slot", "num_pending"))
        counts.append(written)
    assert counts == sorted(counts) and counts[-1] > counts[0]  # it made progress and never went back
