"""`longmem eval retrieval` against plain loops over `out.retrieval` and the bank's chunks (positions, token ids),
chance by enumerating every draw, the gate against its parameter, resume, and the report's plots."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import TEXT, small_config
from longmem import LongMemForCausalLM
from longmem.eval import retrieval_stats
from longmem.eval.report import write_report
from longmem.eval.retrieval_stats import (FAR_BUCKETS, LOG2_BINS, Counts, RetrievalOptions, bucket_edges, bucket_names,
                                          histogram, hypergeometric_hit)
from longmem.runtime import autocast

SEGMENT, MEMORY, CHUNK, TOPK = 16, 24, 2, 8  # 12 chunks held at most: every draw of them can be enumerated


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tok):
    """A tiny Llama-GQA checkpoint (4 query heads on 2 key/value heads) with random gates, and one document."""
    torch.manual_seed(1)
    cfg = LlamaConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=len(tok), max_position_embeddings=128)
    model = LongMemForCausalLM.from_backbone(LlamaForCausalLM(cfg).eval(), small_config(
        segment_length=SEGMENT, memory_size=MEMORY, chunk_size=CHUNK, topk_tokens=TOPK))
    model.sidenet.layers[model.sidenet.memory_layer].gate.data = torch.randn(4)
    root = tmp_path_factory.mktemp("retrieval")
    model.save_pretrained(root / "model", tokenizer=tok)
    (root / "docs").mkdir()
    (root / "docs" / "a.txt").write_text(TEXT * 2)
    return root


def options(root, **kw):
    return RetrievalOptions(model=str(root / "model"), data=str(root / "docs"), device="cpu", **kw)


def bucket(d, edges):
    b = 0
    while b < len(edges) and d >= edges[b]:
        b += 1
    return b


def brute_force(model, ids):
    """Every count of the task by plain loops: read the document segment by segment, note each held chunk's position
    and tokens before the segment is written, then walk every head's retrieved chunks for every token."""
    T, H = model.config.segment_length, model.adapter.num_heads
    edges = bucket_edges(T)
    memory = model.new_memory(1)
    G = H // memory.spec.num_kv_heads
    c = Counts.zero(H, len(edges) + 1)
    with torch.no_grad(), autocast(model.device):  # as the task runs it
        for s in range(0, len(ids) - 1, T):
            e = min(s + T, len(ids) - 1)
            chunks = {}  # slot -> (stream position, token ids)
            for slot, p in zip(memory.write_order(0).tolist(), memory.chunk_positions(0).tolist()):
                chunks[slot] = (p, memory.chunk_token_ids(0, torch.tensor(slot)).tolist())
            r = model(torch.tensor([ids[s:e]]), memory=memory).retrieval
            if r is None:
                assert not chunks
                continue
            Tr, k = r.slots.shape[2] // G, r.slots.shape[3]
            for t in range(e - s):
                q, y = s + t, ids[s + t + 1]
                read = []  # per head: the slots it read
                for h in range(H):
                    read.append([int(r.slots[0, h // G, (h % G) * Tr + t, j]) for j in range(k)
                                 if r.valid[0, h // G, (h % G) * Tr + t, j]])
                    for slot in read[h]:
                        d = q - chunks[slot][0]
                        c.reads[h] += 1
                        c.hist[h, bucket(d, edges)] += 1
                        c.log2[h, min(d.bit_length() - 1, LOG2_BINS - 1)] += 1
                        c.distance_sum[h] += d
                reads = sum(len(x) for x in read) / H  # per head, on average
                for p, _ in chunks.values():
                    c.uniform[bucket(q - p, edges)] += reads / len(chunks)
                    c.uniform_log2[min((q - p).bit_length() - 1, LOG2_BINS - 1)] += reads / len(chunks)
                    c.uniform_distance_sum += reads * (q - p) / len(chunks)
                c.queries += 1
                local, earlier = y in ids[s:q + 1], [i for i in range(s) if ids[i] == y]
                if local or not earlier:
                    continue
                f = bucket(q + 1 - earlier[-1], [2048, 8192, 32768])  # FAR_BUCKETS: how far back y last occurred
                held = [slot for slot, (_, tids) in chunks.items() if y in tids]
                c.far[f] += 1
                c.far_in_memory[f] += bool(held)
                c.hits[f] += any(y in chunks[slot][1] for h in range(H) for slot in read[h])

                def chance(n):  # every draw of n distinct held chunks, equally likely
                    draws = list(itertools.combinations(chunks, n))
                    return sum(any(slot in held for slot in draw) for draw in draws) / len(draws)

                c.chance[f] += chance(len({slot for x in read for slot in x}))
                for h in range(H):
                    c.hits_head[h] += any(y in chunks[slot][1] for slot in read[h])
                    c.chance_head[h] += chance(len(read[h]))
    return c


def read_counts(path) -> Counts:
    return sum((Counts.from_json(d) for d in json.loads(path.read_text())["examples"].values()), Counts.zero(4, 5))


def assert_same(got: Counts, want: Counts) -> None:
    """Counts exactly equal; expectations (sums of fractions) equal up to the order of summation."""
    for name in ("reads", "hist", "log2", "queries", "far", "far_in_memory", "hits", "hits_head"):
        assert np.array_equal(getattr(got, name), getattr(want, name)), name
    for name in ("distance_sum", "uniform", "uniform_log2", "uniform_distance_sum", "chance", "chance_head"):
        assert getattr(got, name) == pytest.approx(getattr(want, name), rel=1e-9, abs=1e-9), name


def test_counts_equal_plain_loops_over_the_retrieval(setup, tok, tmp_path):
    out = tmp_path / "r.json"
    summary = retrieval_stats.run(options(setup, out=str(out), piece_tokens=48))  # 3 segments a piece: memorized
    assert len(json.loads(out.read_text())["examples"]) > 2
    got = read_counts(out)
    model = LongMemForCausalLM.from_pretrained(setup / "model")
    ids = tok(TEXT * 2)["input_ids"]
    want = brute_force(model, ids)
    assert want.far_in_memory.sum() > 10 and want.hits.sum() > 0  # the case exercises what it checks
    assert int((want.reads > 0).sum()) == 4 and len(set(map(int, want.log2.sum(0).nonzero()[0]))) >= 3
    assert_same(got, want)
    # the summary's shares are the counts divided
    assert summary["distance"]["all"]["share"] == pytest.approx((want.hist.sum(0) / want.reads.sum()).tolist())
    assert summary["far"]["share_in_memory"] == pytest.approx(want.hits.sum() / want.far_in_memory.sum())
    assert summary["far"]["chance_share_in_memory"] == pytest.approx(want.chance.sum() / want.far_in_memory.sum())
    assert summary["tokens"] == len(ids) - 1 and summary["queries"] == len(ids) - 1 - SEGMENT
    # the gate per head is sigmoid of the memory layer's parameter
    gate = model.sidenet.layers[model.sidenet.memory_layer].gate
    assert summary["gate"] == pytest.approx(torch.sigmoid(gate).tolist())
    assert len(set(summary["gate"])) == 4


def test_buckets_histogram_and_chance_by_hand():
    edges = bucket_edges(512)
    assert edges == [512, 2048, 8192, 32768]
    assert bucket_names(edges) == ["<512", "512-2k", "2k-8k", "8k-32k", "32k+"]
    assert bucket_names([2048, 8192, 32768]) == list(FAR_BUCKETS)
    assert bucket_edges(4096) == [4096, 8192, 32768] and bucket_names([4096, 8192, 32768])[:2] == ["<4k", "4k-8k"]
    d = torch.tensor([[1, 511, 512, 2047, 2048, 8191, 8192, 32768, 99999]])
    w = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 0]])
    assert histogram(d, w, edges).tolist() == [[2, 2, 2, 1, 1]]  # 32768 is 32k+; the weight-0 one not counted
    # P(some of 2 draws from 5 chunks is one of the 2 holding the target) = 1 - C(3,2)/C(5,2) = 7/10
    assert float(hypergeometric_hit(5, torch.tensor(2), torch.tensor(2))) == pytest.approx(0.7)
    assert float(hypergeometric_hit(5, torch.tensor(0), torch.tensor(3))) == 0
    assert float(hypergeometric_hit(5, torch.tensor(3), torch.tensor(3))) == 1  # 3 draws cannot all miss 3 of 5
    assert float(hypergeometric_hit(4096, torch.tensor(7), torch.tensor(96))) == pytest.approx(
        1 - math.comb(4089, 96) / math.comb(4096, 96))


def test_resume_reads_only_what_is_missing(setup, tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    full = retrieval_stats.run(options(setup, out=str(out), piece_tokens=64))
    data = json.loads(out.read_text())
    dropped = list(data["examples"])[1:3]
    for key in dropped:
        del data["examples"][key]
    data["summary"] = data["table"] = None
    out.write_text(json.dumps(data))
    calls = []
    real = retrieval_stats.RetrievalTask.read_piece
    monkeypatch.setattr(retrieval_stats.RetrievalTask, "read_piece", lambda self, p, *a: calls.append(p.key) or real(self, p, *a))
    again = retrieval_stats.run(options(setup, out=str(out), piece_tokens=64))
    assert calls == dropped and again == full
    # a whole-document run gives the same numbers as the pieces (a piece's memory reads what it would hold)
    whole = retrieval_stats.run(options(setup, out=str(tmp_path / "whole.json"), piece_tokens=4096))
    assert len(json.loads((tmp_path / "whole.json").read_text())["examples"]) == 1
    assert_same(read_counts(tmp_path / "whole.json"), read_counts(out))
    assert whole["distance"]["all"]["counts"] == full["distance"]["all"]["counts"] and whole["far"]["hits"] > 0


def test_report_plots_retrieval(setup, tmp_path):
    retrieval_stats.run(options(setup, out=str(tmp_path / "retrieval.json")))
    report = write_report([tmp_path / "retrieval.json"], tmp_path / "report.md")
    text = report.read_text()
    assert json.loads((tmp_path / "retrieval.json").read_text())["table"] in text
    for name in ("retrieval-distance", "retrieval-gate"):
        png = tmp_path / f"report-{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png.name})" in text


def test_cli_registers_the_task(setup, tmp_path, capsys):
    from longmem.cli import main

    out = tmp_path / "cli.json"
    assert main(["eval", "retrieval", "--model", str(setup / "model"), "--data", str(setup / "docs"), "--device", "cpu",
                 "--max-tokens", "40", "--memory-size", "8", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["config"]["memory_size"] == 8 and data["summary"]["tokens"] == 39
    assert main(["eval", "retrieval", "--model", str(setup / "model"), "--memory-size", "7", "--out", str(out)]) == 2
    assert "multiple of the model's chunk size" in capsys.readouterr().err
