"""The perplexity and pass-key evaluations on a tiny random checkpoint: every token scored once,
the sliding-window baseline against a direct computation, buckets, resume, determinism,
prompt construction, and a memory that stays bounded on a long document."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from conftest import VOCAB, small_config, tiny_backbone
from longmem import LongMemForCausalLM
from longmem.errors import LongMemError
from longmem.eval import passkey, ppl
from longmem.eval.passkey import PasskeyOptions, PasskeyPrompt, build_prompt, key_visibility
from longmem.eval.ppl import PplOptions, SlidingWindowScorer, bucket_of
from longmem.eval.scoring import MemoryScorer, score_document

def tiny_model():
    return LongMemForCausalLM.from_backbone(tiny_backbone("llama"), small_config(memory_size=64)).eval()


# ---- the sliding-window baseline ----------------------------------------------------------------------
def test_sliding_window_covering_the_document_equals_full_context():
    model = tiny_model()
    ids = torch.randint(0, VOCAB, (100,))
    r = score_document(SlidingWindowScorer(model, window=128, stride=16), ids)
    logp = torch.log_softmax(model.backbone(ids[None]).logits.float(), -1)[0]  # (N, V), one full-context pass
    assert r.first_target == 1 and r.logprobs.shape == (99,)
    torch.testing.assert_close(r.logprobs, logp[torch.arange(99), ids[1:]], rtol=1e-4, atol=1e-4)


def test_sliding_window_predicts_each_token_from_its_window():
    model = tiny_model()
    W, S, N = 16, 4, 40
    ids = torch.randint(0, VOCAB, (N,))
    r = score_document(SlidingWindowScorer(model, window=W, stride=S), ids)
    ref = []
    for j in range(1, N):  # target j, predicted from input j-1 of the piece starting at (j-1)//S*S
        a = max(0, (j - 1) // S * S - (W - S))
        assert j - a <= W
        logits = model.backbone(ids[None, a:j]).logits[0, -1].float()
        ref.append(torch.log_softmax(logits, -1)[ids[j]])
    torch.testing.assert_close(r.logprobs, torch.stack(ref), rtol=1e-4, atol=1e-4)


def test_bucket_assignment():
    assert [bucket_of(n) for n in (2, 8191, 8192, 32767, 32768, 131071, 131072, 10**6)] == \
        ["<8k", "<8k", "8k-32k", "8k-32k", "32k-128k", "32k-128k", ">128k", ">128k"]


def test_memory_stays_bounded_on_a_long_document():
    model = LongMemForCausalLM.from_backbone(tiny_backbone("llama"), small_config(segment_length=32)).eval()
    spec = model.memory_spec(32)
    bound = spec.capacity // spec.chunk_size * spec.num_kv_heads * (2 * spec.chunk_size + 1) * spec.head_dim * 4  # fp32
    bound += spec.capacity * 4  # int32 token ids
    sizes = {}
    for n in (100, 600):  # both far beyond the 32-token capacity
        scorer = MemoryScorer(model, memory_size=32)
        r = score_document(scorer, torch.randint(0, VOCAB, (n,)))
        assert r.logprobs.shape == (n - 1,)
        assert len(scorer.memory) == spec.capacity
        sizes[n] = scorer.memory.nbytes()
    assert sizes[100] == sizes[600] == bound


# ---- ppl end to end (more in test_eval_ppl_batched.py) ---------------------------------------------
def test_ppl_rejects_a_window_beyond_the_backbone(checkpoint, docs, tmp_path):
    with pytest.raises(LongMemError, match="--window 256 exceeds"):
        ppl.run(PplOptions(model=checkpoint, data=docs, out=str(tmp_path / "x.json"), device="cpu", window=256))


# ---- passkey ---------------------------------------------------------------------------------------------
def find(seq: list[int], sub: list[int]) -> list[int]:
    return [i for i in range(len(seq) - len(sub) + 1) if seq[i:i + len(sub)] == sub]


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_passkey_prompt_places_the_key_once_at_its_depth(tok, depth):
    sentences, _ = passkey.filler_sentences(PasskeyOptions(), tok, need=0)
    longest = max(map(len, sentences))
    L = 400
    p = build_prompt(tok, sentences, L, depth, "12345", first_sentence=2)
    key_ids = passkey.encode(tok, passkey.KEY_SENTENCE.format(key="12345"))
    question = passkey.encode(tok, passkey.QUESTION)
    assert find(p.ids, key_ids) == [p.key_start] and p.key_end == p.key_start + len(key_ids)
    assert tok.decode(p.ids).count("12345") == 2  # the key sentence names it twice, nothing else does
    assert p.ids[-len(question):] == question
    assert L - longest < len(p.ids) <= L
    filler = len(p.ids) - len(key_ids) - len(question)
    assert abs(p.key_start - depth * filler) <= longest / 2 + 1


def test_passkey_filler_from_documents(tok, docs):
    sentences, _ = passkey.filler_sentences(PasskeyOptions(filler="data", data=docs), tok, need=50)
    assert sentences[0] == passkey.encode(tok, "The old house stood at the end of the lane.")
    assert 50 <= sum(map(len, sentences)) < 50 + passkey.MAX_PIECE  # stops once it has enough
    p = build_prompt(tok, sentences, 200, 0.5, "54321")
    assert tok.decode(p.ids).count("The pass key is 54321.") == 1
    with pytest.raises(LongMemError, match="--filler"):
        passkey.filler_sentences(PasskeyOptions(filler="books"), tok, need=50)


def test_key_visibility():
    def where(a, b):
        return key_visibility(PasskeyPrompt([], "0", a, b), prefix=100, capacity=32, chunk=4)
    assert where(100, 110) == "local"
    assert where(70, 90) == "memory"     # memory holds [68, 100)
    assert where(60, 80) == "partial"
    assert where(10, 20) == "evicted"
    assert where(90, 105) == "memory"    # part in memory, the rest in the local segment


def test_passkey_run_grid_resume_and_determinism(checkpoint, tmp_path, monkeypatch):
    opts = PasskeyOptions(model=checkpoint, out=str(tmp_path / "pk.json"), device="cpu", lengths="128,256,999",
                          depths="0.1,0.9", trials=1, max_length=300, new_tokens=2)
    s = passkey.run(opts)
    assert s["examples"] == 4 and s["memory_size"] == 64 and s["segment_length"] == 32
    assert set(s["accuracy"]) == {"longmem_memory", "longmem_no_memory"}
    assert set(s["accuracy"]["longmem_memory"]) == {"128", "256"}
    assert set(s["accuracy"]["longmem_memory"]["128"]) == {"0.1", "0.9"}
    assert all(0 <= v <= 1 for row in s["accuracy"].values() for cells in row.values() for v in cells.values())
    # the key at depth 0.1 of 256 tokens is older than the 64 memorized before the last segment of 32
    assert s["key_where"]["256"]["evicted"] == 1
    assert all(nll > 0 for nll in s["key_nll"].values())
    first = json.loads(Path(opts.out).read_text())["examples"]
    keys = [e["key"] for e in first.values()]
    assert all(len(k) == 5 and k.isdigit() for k in keys) and len(set(keys)) > 1

    monkeypatch.setattr(passkey, "trial", lambda *a: pytest.fail("resumed run decoded again"))
    assert passkey.run(opts) == s
    with pytest.raises(LongMemError, match="different run"):
        passkey.run(dataclasses.replace(opts, trials=2))
    monkeypatch.undo()
    again = passkey.run(dataclasses.replace(opts, out=str(tmp_path / "again.json"), limit=2))
    assert again["examples"] == 2 and list(again["accuracy"]["longmem_memory"]) == ["128"]
    second = json.loads((tmp_path / "again.json").read_text())["examples"]
    assert len(second) == 2
    for k, e in second.items():  # the same keys, answers and likelihoods as the first run's
        fields = ("key", "pred", "key_nll", "where")
        assert {f: e[f] for f in fields} == {f: first[k][f] for f in fields}
