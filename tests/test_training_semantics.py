"""What adaptation training does at every step, checked from the outside on short documents.

- a row's memory is empty exactly when the row starts a new document, and otherwise holds that
  document's earlier tokens (document starts are read off the inputs, never off `new_document`);
- the logged loss is the mean next-token NLL of the step's real inputs, from the model's logits;
- the SideNet really uses dropout in training (copied from the backbone config), and a
  2-process torchrun run killed by Ctrl-C and resumed equals an uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from longmem import LongMemForCausalLM
from longmem.config import LongMemConfig
from longmem.training import train as train_mod
from longmem.runtime import load_tokenizer
from longmem.training.metrics import MetricsLog
from longmem.training.streams import StreamBatcher
from test_likelihoods import hand_nll, stream_targets
from test_train import ROOT, config, losses, save_tiny_llama
from test_training_utils import stdlib_docs

TRAIN_CHARS = [25, 240, 70, 130, 15, 50, 110, 40, 180, 30]  # documents of about 6 to 90 tokens
STEPS, ROWS, CHUNK, CAPACITY = 24, 2, 2, 32


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny Llama backbone with attention dropout 0.1 (+ tokenizer) and folders of short documents."""
    root = tmp_path_factory.mktemp("semantics")
    save_tiny_llama(root / "backbone", attention_dropout=0.1)
    text = "".join(d.text for d in stdlib_docs())
    pos = 0
    for split, sizes in (("train", TRAIN_CHARS), ("dev", [90, 150])):
        (root / split).mkdir()
        for i, n in enumerate(sizes):
            (root / split / f"{split}{i:02d}.txt").write_text(text[pos:pos + n].strip() or "x")
            pos += n
    return root


@pytest.fixture(scope="module")
def recorded(workspace):
    """One training run with every training batch and, per training forward, the memory state before it
    (after the step's resets) and the logits."""
    rec = {"batches": [], "forwards": [], "batcher": None}
    next_batch, forward = StreamBatcher.__next__, LongMemForCausalLM.forward

    def spy_next(self):
        batch = next_batch(self)
        if self.loop:  # training (the dev evaluation reads a non-looping batcher)
            rec["batcher"] = self
            rec["batches"].append(batch)
        return batch

    def spy_forward(self, input_ids, memory=None, attention_mask=None, labels=None, update_memory=True):
        if not self.training:
            return forward(self, input_ids, memory, attention_mask, labels, update_memory)
        entry = {"input_ids": input_ids.clone(), "sizes": memory.sizes.clone(), "pending": memory.num_pending.clone()}
        out = forward(self, input_ids, memory, attention_mask, labels, update_memory)
        entry["logits"] = out.logits.detach().clone()
        rec["forwards"].append(entry)
        return out

    cfg = config(workspace, "recorded", steps=STEPS, batch_size=ROWS, eval_interval=1000, save_interval=1000,
                 longmem=LongMemConfig(memory_size=CAPACITY, chunk_size=CHUNK, topk_tokens=8, segment_length=16,
                                       memory_dtype="float32"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(StreamBatcher, "__next__", spy_next)
        mp.setattr(LongMemForCausalLM, "forward", spy_forward)
        train_mod.train(cfg)
    rec["batches"].append(next_batch(rec["batcher"]))  # one batch more: what follows the last step's inputs
    rec["cfg"] = cfg
    rec["metrics"] = MetricsLog.read(cfg.out_dir)
    rec["corpus"] = train_mod.load_corpus(cfg.data_dir, "train", load_tokenizer(cfg.backbone), cfg)
    return rec


def test_a_rows_memory_is_empty_exactly_when_it_starts_a_new_document(recorded):
    corpus, batches, forwards = recorded["corpus"], recorded["batches"][:-1], recorded["forwards"]
    eos = corpus.eos_id
    assert len(batches) == len(forwards) == STEPS
    whole_documents = {tuple(corpus.document(i)[:-1].tolist()) for i in range(len(corpus))}
    read = [0] * ROWS            # tokens of the row's current document read before this step
    pieces = [[] for _ in range(ROWS)]
    starts = [0] * ROWS
    seen = {"one_row_starts": 0, "continues": 0, "wrapped": 0}
    for s, (batch, f) in enumerate(zip(batches, forwards, strict=True)):
        assert torch.equal(f["input_ids"], batch.input_ids)
        starting = []
        for j in range(ROWS):
            n = int(batch.attention_mask[j].sum())
            assert n > 0  # looping streams never idle
            # a document's inputs are [eos, text...], and text never holds eos: a row starts a document exactly
            # when its segment starts with eos
            start = int(batch.input_ids[j, 0]) == eos
            starting.append(start)
            if start:
                if s > 0:  # the row had read one whole document of the corpus, nothing else
                    assert tuple(pieces[j]) in whole_documents, (s, j)
                pieces[j], read[j] = [], 0
                starts[j] += 1
            else:
                seen["continues"] += 1
            held, pending = int(f["sizes"][j]), int(f["pending"][j])
            assert (held == 0 and pending == 0) == start, f"step {s + 1}, row {j}: memory {held}+{pending} tokens, " \
                                                          f"{'starts' if start else 'continues'} a document"
            # and a continuing row holds exactly its document's earlier tokens (FIFO of CAPACITY, whole chunks)
            assert (held, pending) == (min(CAPACITY, read[j] // CHUNK * CHUNK), read[j] % CHUNK), (s, j)
            seen["wrapped"] += read[j] > CAPACITY
            pieces[j] += batch.input_ids[j, :n].tolist()
            read[j] += n
        seen["one_row_starts"] += sum(starting) == 1
    # the run exercised what matters: every row went through several documents, rows started documents at
    # different steps, documents spanned several segments, one outgrew the memory
    assert min(starts) >= 3 and seen["one_row_starts"] >= 3 and seen["continues"] >= 5 and seen["wrapped"] >= 1, \
        (starts, seen)


def test_logged_loss_is_the_mean_nll_of_each_rows_next_stream_token(recorded):
    targets = stream_targets(recorded["batches"])  # (STEPS, B, T) from the inputs alone
    rows = recorded["metrics"]
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    gaps = []
    for s, (f, row) in enumerate(zip(recorded["forwards"], rows, strict=True)):
        nll, keep = hand_nll(f["logits"], targets[s]), targets[s] != -100
        want = nll.sum() / keep.sum()
        assert float(row["loss"]) == pytest.approx(float(want), rel=1e-5, abs=1e-6), s + 1
        row_means = torch.stack([nll[j].sum() / keep[j].sum() for j in range(ROWS)]).mean()
        gaps.append(abs(float(want - row_means)))
    assert max(gaps) > 1e-3  # rows with different numbers of targets: per-token and per-row means differ


def test_sidenet_dropout_is_active_in_training(workspace, recorded):
    cfg = recorded["cfg"]
    torch.manual_seed(cfg.seed)
    model = train_mod.build_model(cfg, torch.device("cpu"))
    assert all(model.adapter.attention_dropout(layer.block) == 0.1 for layer in model.sidenet.layers)
    batch = recorded["batches"][0]
    x, mask = batch.input_ids, batch.attention_mask
    with torch.no_grad():
        model.eval()
        clean = model(x, attention_mask=mask).logits
        torch.testing.assert_close(model(x, attention_mask=mask).logits, clean, rtol=0, atol=0)
        model.train()
        a, b = model(x, attention_mask=mask).logits, model(x, attention_mask=mask).logits
    assert not torch.allclose(a, b) and not torch.allclose(a, clean)
    # the training run's first step (same initial weights, empty memories) was computed with dropout
    assert not torch.allclose(recorded["forwards"][0]["logits"], clean)


DRIVER = r'''
"""torchrun worker: adaptation training, a real Ctrl-C at training batch `stop_at` (0: none), per-rank losses."""
import json, os, signal, sys

import torch

from longmem.training import step as step_mod
from longmem.training import train as train_mod
from longmem.training.config_io import config_from_dict
from longmem.training.streams import StreamBatcher

cfg = config_from_dict(train_mod.TrainConfig, json.loads(open(sys.argv[1]).read()))
stop_at, rank = int(sys.argv[2]), int(os.environ["RANK"])
os.makedirs(cfg.out_dir, exist_ok=True)
calls = 0
next_batch = StreamBatcher.__next__


def interrupting(self):
    global calls
    if self.loop:
        calls += 1
        if calls == stop_at:
            signal.raise_signal(signal.SIGINT)
    return next_batch(self)


loss_fn = step_mod.next_token_loss


def logged(logits, labels, reduction="mean"):
    loss = loss_fn(logits, labels, reduction)
    with open(os.path.join(cfg.out_dir, f"losses-rank{rank}.txt"), "a") as f:
        f.write(f"{loss.item()!r}\n")
    return loss


StreamBatcher.__next__ = interrupting
step_mod.next_token_loss = logged
train_mod.train(cfg)
'''


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_torchrun_kill_and_resume_with_dropout_matches_uninterrupted(workspace, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)

    def launch(name: str, stop_at: int, **kw):
        cfg = config(workspace, name, steps=6, eval_interval=100, save_interval=2, **kw)
        path = tmp_path / f"{name}-{stop_at}-{int(cfg.resume)}.json"
        path.write_text(json.dumps(dataclasses.asdict(cfg)))
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               str(driver), str(path), str(stop_at)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return workspace / name

    def rank_losses(run, rank):
        return (run / f"losses-rank{rank}.txt").read_text().split()

    full = launch("ddp-full", 0)
    cut = launch("ddp-cut", 3)
    assert (cut / "latest").read_text().strip() == "step-000003" and not (cut / "final").exists()
    assert len(rank_losses(cut, 0)) == len(rank_losses(cut, 1)) == 3
    launch("ddp-cut", 0, resume=True)
    assert len(losses(cut)) == 6 and losses(full) == losses(cut)  # rank 0's logged losses, memory sizes, dev ppl
    for rank in (0, 1):
        assert rank_losses(full, rank) == rank_losses(cut, rank) and len(rank_losses(full, rank)) == 6
    assert rank_losses(full, 0) != rank_losses(full, 1)
    summary = json.loads((full / "summary.json").read_text())
    assert summary["step"] == 6 and summary["replica_max_abs_diff"] == 0.0
    a = (full / "final" / "sidenet.safetensors").read_bytes()
    b = (cut / "final" / "sidenet.safetensors").read_bytes()
    assert a == b
