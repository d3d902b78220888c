"""ppl scores documents in pieces, several side by side (continuous batching): the numbers equal scoring each
document alone, in order; distance buckets on a hand-made example; results per piece, and resume."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DOCS, TEXT, VOCAB, small_config, tiny_backbone
from longmem import LongMemForCausalLM
from longmem.eval import lanes, ppl
from longmem.eval.distance import BUCKETS, bucket_targets, distance_buckets, word_previous
from longmem.eval.lanes import score_pieces, split_document
from longmem.eval.ppl import PplOptions, SlidingWindowScorer, build_rows
from longmem.eval.scoring import BackboneScorer, LocalScorer, MemoryScorer, score_document, target_logprobs

TEXT_OF = {name: TEXT * n for name, n in DOCS}


def test_pieces_side_by_side_equal_one_document_at_a_time(family):
    torch.manual_seed(0)
    model = LongMemForCausalLM.from_backbone(tiny_backbone(family), small_config(memory_size=38)).eval()
    lengths = [100, 7, 33, 64, 65, 2, 150]  # shorter than a segment, exact segments, one token over, 2 tokens
    docs = {f"d{i}": torch.randint(0, VOCAB, (n,)) for i, n in enumerate(lengths)}
    rows = build_rows(model, [38, 64], window=24, stride=8)  # 38: not a multiple of the 16-token segment
    pieces = [p for key, ids in docs.items() for p in split_document(key, ids, 32, 16)]
    assert len(pieces) > len(docs)
    scorers = [row.make(3) for row in rows]
    for row, sc in zip(rows, scorers):
        sc.name = row.key
    got, steps = {}, []
    score_pieces(scorers, pieces, lambda p, lp: got.__setitem__(p.key, lp), steps.append)
    assert sum(steps) == sum(n - 1 for n in lengths)  # progress counts every target once
    for key, ids in docs.items():
        for row in rows:
            want = score_document(row.make(1), ids).logprobs  # (N-1,) the whole document, in order, alone
            mine = torch.cat([got[p.key][row.key] for p in pieces if p.key.startswith(key + "@")])
            torch.testing.assert_close(mine, want, rtol=1e-5, atol=1e-5)


# ---- one backbone pass per segment for every row --------------------------------------------------------------
class PlainBackbone(BackboneScorer):  # each row running its own model calls, as before the pass was shared
    def logits(self, seg):
        return self.model.backbone(input_ids=seg.x).logits  # the HuggingFace model, padding unmasked


class PlainLocal(LocalScorer):
    def logits(self, seg):
        return self.model(seg.x).logits


class PlainMemory(MemoryScorer):
    def start(self, lane, prefix, show_progress=False, continued=False):
        super().start(lane, prefix, show_progress)  # always reads the document before the piece again

    def logits(self, seg):
        return self.model(seg.x, memory=self.memory, attention_mask=seg.mask).logits


class PlainWindow(SlidingWindowScorer):
    def logits(self, seg):  # every call its own backbone run
        x, mask = seg.x, seg.mask
        B, T = x.shape
        out = None
        for s in range(0, T, self.stride):
            pieces = [x[b, s:s + self.stride][mask[b, s:s + self.stride].bool()] for b in range(B)]
            for b, piece in enumerate(pieces):
                if len(piece):
                    inputs = torch.cat([self.history[b], piece])[None]
                    logits = self.model.backbone(input_ids=inputs).logits[0, -len(piece):]
                    out = logits.new_zeros(B, T, logits.shape[-1]) if out is None else out
                    out[b, s:s + len(piece)] = logits
                    self.history[b] = self._keep(inputs[0])
        return out


@pytest.mark.parametrize("lanes", [1, 3])
def test_shared_backbone_pass_equals_each_row_on_its_own(family, lanes):
    """score_pieces runs the backbone once per segment for every row, takes the sliding window's whole-segment
    calls from that pass, and keeps a lane's memory when it continues its document: the numbers are bit for bit
    those of every row making its own model calls, re-reading the document before each piece."""
    torch.manual_seed(0)
    model = LongMemForCausalLM.from_backbone(tiny_backbone(family), small_config(memory_size=24)).eval()
    docs = {f"d{i}": torch.randint(0, VOCAB, (n,)) for i, n in enumerate([150, 7, 65, 100])}
    pieces = [p for key, ids in docs.items() for p in split_document(key, ids, 32, 16)]
    shared = [BackboneScorer(model, lanes), SlidingWindowScorer(model, 16, 8, lanes), LocalScorer(model, lanes),
              MemoryScorer(model, 24, lanes), MemoryScorer(model, 64, lanes)]
    plain = [PlainBackbone(model, lanes), PlainWindow(model, 16, 8, lanes), PlainLocal(model, lanes),
             PlainMemory(model, 24, lanes), PlainMemory(model, 64, lanes)]
    results = []
    real = model.backbone_forward
    for scorers in (shared, plain):
        for i, sc in enumerate(scorers):
            sc.name = str(i)
        got, runs, passes, steps = {}, [], [], []
        hook = model.backbone.base_model.register_forward_hook(lambda *a: runs.append(1))  # every backbone run
        model.backbone_forward = lambda *a: passes.append(1) or real(*a)
        score_pieces(scorers, pieces, lambda p, lp: got.update({(p.key, k): v for k, v in lp.items()}), steps.append)
        hook.remove()
        del model.backbone_forward
        results.append((got, len(runs), len(passes), len(steps)))
    (got, runs, passes, steps), (want, plain_runs, _, _) = results
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert passes == steps and runs < plain_runs  # one shared pass per batch step


def test_a_lane_continuing_its_document_keeps_its_memory():
    """With one lane, the pieces of a document come in order: the first reads nothing (nothing is before it),
    the next ones continue the lane's memory; a piece after a gap reads the document before it."""
    torch.manual_seed(0)
    model = LongMemForCausalLM.from_backbone(tiny_backbone("llama"), small_config(memory_size=24)).eval()
    ids = torch.randint(0, VOCAB, (100,))
    pieces = split_document("d", ids, 32, 16)  # [0,32) [32,64) [64,96) [96,99)
    reads, memorize = [], model.memorize
    model.memorize = lambda x, memory, **kw: reads.append(x.shape[1]) or memorize(x, memory, **kw)
    got = {}
    score_pieces([MemoryScorer(model, 24)], pieces, lambda p, lp: got.update({p.key: lp["longmem_memory"]}))
    assert reads == []
    score_pieces([MemoryScorer(model, 24)], pieces[2:3] + pieces[:1] + pieces[1:2], lambda p, lp: None)
    assert reads == [64]  # [64,96) after a gap reads [0,64); [0,32) has nothing before it; [32,64) continues it
    model.memorize = memorize
    want = score_document(MemoryScorer(model, 24), ids).logprobs  # the whole document in order
    torch.testing.assert_close(torch.cat([got[p.key] for p in pieces]), want, rtol=1e-5, atol=1e-5)


def test_split_document_covers_every_target_once():
    ids = torch.arange(100)
    pieces = split_document("d", ids, 32, 16)
    assert [(p.start, p.end, p.targets) for p in pieces] == [(0, 32, 32), (32, 64, 32), (64, 96, 32), (96, 99, 3)]
    assert split_document("d", torch.arange(97), 32, 16)[-1].end == 96  # no piece without targets
    with pytest.raises(AssertionError):
        split_document("d", ids, 24, 16)


# ---- distance buckets -----------------------------------------------------------------------------------
def test_token_distance_buckets_by_hand():
    T = 4  # segments of inputs [0,4) [4,8) ...; target j is predicted from the segment starting at (j-1)//4*4
    N = 40000
    ids = np.arange(N) + 100        # all distinct ...
    ids[2] = ids[0] = 7             # target 2: previous at 0, same segment            -> local
    ids[5] = 7                      # target 5: segment [4, 8), previous at 2 (3 back)  -> <2k (earlier segment)
    ids[3000] = 7                   # target 3000: 2995 back                            -> 2k-8k
    ids[12000] = ids[1] = 9         # target 12000: 11999 back                          -> 8k-32k
    ids[39000] = 7                  # 36000 back                                        -> 32k+
    got = bucket_targets(brute_force_previous(ids), T)
    want = np.full(N - 1, BUCKETS.index("never"))
    want[2 - 1], want[5 - 1] = BUCKETS.index("local"), BUCKETS.index("<2k")
    want[3000 - 1], want[12000 - 1], want[39000 - 1] = (BUCKETS.index(b) for b in ("2k-8k", "8k-32k", "32k+"))
    assert np.array_equal(got, want)


def brute_force_previous(ids) -> np.ndarray:
    """Position of the previous equal id, -1 if none (only 7 and 9 repeat in the example)."""
    out = np.full(len(ids), -1)
    for j in range(len(ids)):
        if ids[j] in (7, 9):
            out[j] = max((i for i in range(j) if ids[i] == ids[j]), default=-1)
    return out


def test_word_view_by_hand():
    texts = ["The", " cat", " sat", ".", " The", " ca", "t", " sat", "!"]
    #          0      1       2      3     4       5     6      7      8   ("ca"+"t" is the word "cat")
    assert word_previous(texts).tolist() == [-1, -1, -1, -1, 0, 1, 1, 2, -1]
    b = distance_buckets(list(range(9)), texts, segment_length=4)  # token ids all distinct: token view all never
    assert [BUCKETS[i] for i in b["token"]] == ["never"] * 8
    # targets 1..8; segment of target j starts at (j-1)//4*4: targets 1-4 in [0,4), 5-8 in [4,8)
    assert [BUCKETS[i] for i in b["word"]] == ["never", "never", "never", "local", "<2k", "<2k", "<2k", "never"]


# ---- the task end to end --------------------------------------------------------------------------------
def strip_costs(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in ("peak_rss_mib",)}


def close(a: dict, b: dict) -> bool:
    """Summaries equal, perplexities to 1e-6 relative (batch composition may change float rounding)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, float):
        return math.isclose(a, b, rel_tol=1e-6)
    return a == b


def test_ppl_run_batched_equals_one_at_a_time_and_resumes(checkpoint, docs, tok, tmp_path, monkeypatch):
    opts = PplOptions(model=checkpoint, data=docs, out=str(tmp_path / "ppl.json"), device="cpu",
                      memory_sizes="32,64", window=64, piece_tokens=64, batch_size=3)
    s = ppl.run(opts)
    lengths = {f"{name}.txt": len(tok(TEXT_OF[name])["input_ids"]) for name in TEXT_OF}
    assert s["docs"] == 3 and s["tokens"] == sum(n - 1 for n in lengths.values())
    assert s["piece_tokens"] == 64
    examples = json.loads(Path(opts.out).read_text())["examples"]
    assert len(examples) > 3  # saved per piece, not per document
    for view in ("token", "word"):
        cells = s["distance"][view]
        assert sum(c["tokens"] for c in cells.values()) == s["tokens"]
        for row, r in s["rows"].items():  # the buckets partition the tokens: their NLLs add up to the total
            total = sum(c["tokens"] * math.log(c["ppl"][row]) for c in cells.values())
            assert math.isclose(total, s["tokens"] * math.log(r["ppl"]), rel_tol=1e-9)
    assert "how far back the same token" in json.loads(Path(opts.out).read_text())["table"]

    one = ppl.run(dataclasses.replace(opts, out=str(tmp_path / "one.json"), batch_size=1))
    assert close(strip_costs(one), strip_costs(s))
    whole = ppl.run(dataclasses.replace(opts, out=str(tmp_path / "whole.json"), batch_size=1, piece_tokens=10**6))
    assert close({k: v for k, v in strip_costs(whole).items() if k != "piece_tokens"},
                 {k: v for k, v in strip_costs(s).items() if k != "piece_tokens"})

    # resume with everything done: nothing is scored
    monkeypatch.setattr(ppl, "score_pieces", lambda sc, pieces, *a: pieces and pytest.fail("scored again"))
    assert ppl.run(opts) == s
    monkeypatch.undo()

    # interrupted after 2 pieces: a second run scores only the rest, and the numbers are the same
    cut = dataclasses.replace(opts, out=str(tmp_path / "cut.json"))
    real = lanes.score_pieces

    def interrupted(scorers, pieces, done, step):
        def stop_after_two(p, lp):
            done(p, lp)
            if len(json.loads(Path(cut.out).read_text())["examples"]) == 2:
                raise KeyboardInterrupt
        real(scorers, pieces, stop_after_two, step)

    monkeypatch.setattr(ppl, "score_pieces", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ppl.run(cut)
    monkeypatch.undo()
    seen = []
    monkeypatch.setattr(ppl, "score_pieces", lambda sc, pieces, *a: seen.extend(pieces) or real(sc, pieces, *a))
    assert close(strip_costs(ppl.run(cut)), strip_costs(s))
    assert len(seen) == len(examples) - 2


def test_ppl_rejects_bad_batching_options(checkpoint, docs, tmp_path):
    from longmem.errors import LongMemError
    for flag, opts in (("--batch-size", dict(batch_size=-1)), ("--piece-tokens", dict(piece_tokens=-1))):
        with pytest.raises(LongMemError, match=flag):
            ppl.run(PplOptions(model=checkpoint, data=docs, out=str(tmp_path / "x.json"), device="cpu", **opts))



def test_target_logprobs_equal_logsumexp_bit_for_bit():
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        logits = (torch.randn(3, 40, 997) * 6).to(dtype)
        logits[0, 3, 5] = float("-inf")                # a masked vocabulary entry
        logits[1, 7] = float("-inf")                   # a position where every entry is masked (nan, as before)
        targets = torch.randint(0, 997, (3, 40))
        kept = logits.clone()
        x = logits.float()
        want = x.gather(-1, targets[..., None])[..., 0] - torch.logsumexp(x, dim=-1)
        got = target_logprobs(logits, targets)
        assert got.dtype == torch.float32 and torch.equal(got.nan_to_num(), want.nan_to_num())
        assert torch.isnan(got[1, 7]) and torch.equal(logits, kept)  # the logits are not modified
