"""Adaptation training end to end on a tiny backbone: exact kill-and-resume, DDP replicas, bad inputs."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from longmem.config import LongMemConfig
from longmem.errors import LongMemError
from longmem.training.metrics import MetricsLog
from longmem.training.streams import StreamBatcher
from longmem.training.train import TrainConfig, train
from test_training_utils import make_tokenizer, stdlib_docs

ROOT = Path(__file__).resolve().parents[1]


def save_tiny_llama(folder: Path, **config) -> None:
    """A tiny random Llama backbone (seed 0) and the test tokenizer, saved as a HuggingFace model folder."""
    tok = make_tokenizer()
    torch.manual_seed(0)
    backbone = LlamaForCausalLM(LlamaConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=64, vocab_size=len(tok),
                                            max_position_embeddings=64, eos_token_id=0, bos_token_id=0, pad_token_id=0,
                                            **config))
    backbone.save_pretrained(folder)
    tok.save_pretrained(folder)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved tiny Llama backbone + tokenizer and train/dev folders of real text files."""
    root = tmp_path_factory.mktemp("train")
    save_tiny_llama(root / "backbone")
    docs = stdlib_docs()
    for split, chosen in (("train", docs[:6]), ("dev", docs[6:])):
        (root / split).mkdir()
        for d in chosen:
            (root / split / f"{d.id}.txt").write_text(d.text[:6000])
    return root


def config(ws: Path, out: str, **kw) -> TrainConfig:
    base = dict(backbone=str(ws / "backbone"), data_dir=str(ws / "train"), dev_dir=str(ws / "dev"),
                token_cache_dir=str(ws / "tokens"), out_dir=str(ws / out),
                longmem=LongMemConfig(memory_size=64, chunk_size=2, topk_tokens=8, segment_length=16,
                                      memory_dtype="float32"),
                batch_size=2, steps=6, eval_interval=3, eval_segments=4, save_interval=2, device="cpu", dtype="fp32")
    base.update(kw)
    return TrainConfig(**base)


def losses(out_dir):
    return [(r["step"], r["loss"], r["dev_ppl_memory"], r["memory_tokens"]) for r in MetricsLog.read(out_dir)]


def test_kill_and_resume_matches_uninterrupted(workspace, monkeypatch):
    full = train(config(workspace, "full"))
    assert full["memory_tokens"] > 0

    calls = {"n": 0}
    original = StreamBatcher.__next__

    def ctrl_c_at_step_3(self):
        calls["n"] += 1
        if calls["n"] == 3 and self.loop:
            signal.raise_signal(signal.SIGINT)
        return original(self)

    monkeypatch.setattr(StreamBatcher, "__next__", ctrl_c_at_step_3)
    train(config(workspace, "cut"))
    assert (workspace / "cut" / "latest").read_text().strip() == "step-000003"
    assert not (workspace / "cut" / "final").exists()
    assert (workspace / "cut" / "step-000003" / "memory-rank0.safetensors").is_file()
    monkeypatch.setattr(StreamBatcher, "__next__", original)
    with pytest.raises(LongMemError, match="resume=true"):
        train(config(workspace, "cut"))
    train(config(workspace, "cut", resume=True))
    assert losses(workspace / "full") == losses(workspace / "cut")  # identical per-step losses and memory sizes
    assert len(losses(workspace / "cut")) == 6
    a = (workspace / "full" / "final" / "sidenet.safetensors").read_bytes()
    b = (workspace / "cut" / "final" / "sidenet.safetensors").read_bytes()
    assert a == b


def test_backbone_is_frozen_and_gate_trains(workspace):
    from safetensors.torch import load_file

    train(config(workspace, "frozen", steps=4, eval_interval=100))
    weights = load_file(str(workspace / "frozen" / "final" / "sidenet.safetensors"))
    gate = [v for k, v in weights.items() if k.endswith("gate")]
    assert len(gate) == 1 and not torch.equal(gate[0], torch.zeros_like(gate[0]))
    # memory_layer_lr_scale: only the memory layer's weights differ after one step (its gate has no gradient yet: the
    # first step's memory is empty)
    moved = {}
    for scale in (1.0, 10.0):
        train(config(workspace, f"scale{scale}", steps=1, eval_interval=100, memory_layer_lr_scale=scale))
        moved[scale] = load_file(str(workspace / f"scale{scale}" / "final" / "sidenet.safetensors"))
    layer = next(k for k in weights if k.endswith("gate")).rsplit(".", 1)[0] + "."  # layers.N.
    for k, v in moved[1.0].items():
        assert torch.allclose(moved[10.0][k], v) != (k.startswith(layer) and not k.endswith("gate")), k
    saved = LlamaForCausalLM.from_pretrained(workspace / "frozen" / "final" / "backbone")
    original = LlamaForCausalLM.from_pretrained(workspace / "backbone")
    for (k, v), w in zip(saved.state_dict().items(), original.state_dict().values()):
        assert torch.equal(v, w), k


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_torchrun_two_processes_keep_replicas_identical(workspace):
    cfg = config(workspace, "ddp", steps=4, eval_interval=100, save_interval=2)
    (workspace / "ddp.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "longmem.cli", "train", "--config", str(workspace / "ddp.json")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((workspace / "ddp" / "summary.json").read_text())
    assert summary["step"] == 4 and summary["replica_max_abs_diff"] == 0.0
    ckpt = workspace / "ddp" / "step-000004"
    assert (ckpt / "memory-rank0.safetensors").is_file() and (ckpt / "memory-rank1.safetensors").is_file()
    # each rank read its own streams: the two memories differ
    from longmem.memory import MemoryBank
    m0, m1 = (MemoryBank.load(ckpt / f"memory-rank{r}.safetensors") for r in (0, 1))
    k0, k1 = m0.tokens(0)[0], m1.tokens(0)[0]
    assert k0.shape != k1.shape or not torch.equal(k0, k1)


def test_bad_inputs_are_one_line_errors(workspace, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "empty.txt").write_text("")
    with pytest.raises(LongMemError, match="empty.txt is empty"):
        train(config(workspace, "bad1", data_dir=str(tmp_path / "data")))
    (tmp_path / "data" / "empty.txt").write_bytes(b"\x00\x01binary")
    with pytest.raises(LongMemError, match="empty.txt"):
        train(config(workspace, "bad2", data_dir=str(tmp_path / "data")))
    with pytest.raises(LongMemError, match="backbone folder not found"):
        train(config(workspace, "bad3", backbone=str(tmp_path / "nope")))
    with pytest.raises(LongMemError, match="memory_layer=7 is outside the backbone's 4 layers"):
        train(config(workspace, "bad4", longmem=LongMemConfig(memory_layer=7)))
    assert not (workspace / "bad4").exists() or not any((workspace / "bad4").glob("step-*"))
    for bad, message in ((dict(memory_layer_lr_scale=-1.0), r"^memory_layer_lr_scale must be a number of at least 0, "
                                                             r"not -1\.0$"),
                         (dict(memory_layer_lr_scale=float("nan")), r"^memory_layer_lr_scale must be .* not nan$")):
        with pytest.raises(LongMemError, match=message):
            train(config(workspace, "bad5", **bad))


def test_cli_reports_user_errors_in_one_line(workspace, tmp_path):
    from longmem.cli import main
    import io, contextlib
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["train", "--config", str(tmp_path / "missing.json")])
    assert rc == 2
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and "config file not found" in lines[0] and "missing.json" in lines[0]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["train", f"backbone={workspace / 'backbone'}", "longmem.memory_layer=9", "stepz=3"])
    assert rc == 2 and "unknown option stepz" in err.getvalue()


def test_full_disk_during_checkpoint_keeps_the_previous_one(workspace, monkeypatch):
    import errno

    from longmem.training import checkpoints

    real_state = checkpoints.trainer_state
    calls = {"n": 0}

    def disk_full_on_second_save(*a, **kw):  # the second checkpoint fails after its weights file is written
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_state(*a, **kw)

    monkeypatch.setattr(checkpoints, "trainer_state", disk_full_on_second_save)
    with pytest.raises(LongMemError, match=r"step-000002: no space left on the device; free disk space"):
        train(config(workspace, "full-disk", steps=4, save_interval=1, eval_interval=100))
    run = workspace / "full-disk"
    assert (run / "latest").read_text().strip() == "step-000001"
    assert sorted(p.name for p in run.iterdir() if p.name.startswith((".", "step-"))) == ["step-000001"]
    monkeypatch.undo()
    train(config(workspace, "full-disk", steps=4, save_interval=1, eval_interval=100, resume=True))
    assert (run / "latest").read_text().strip() == "step-000004"


def test_init_from_starts_from_a_checkpoints_sidenet(workspace):
    from safetensors.torch import load_file

    from longmem.training.optim import OptimizerConfig

    train(config(workspace, "base", steps=4, eval_interval=100))
    base = load_file(str(workspace / "base" / "final" / "sidenet.safetensors"))
    frozen = OptimizerConfig(lr=0.0, weight_decay=0.0, warmup_steps=0)  # a step that cannot move the weights
    train(config(workspace, "warm", steps=1, eval_interval=100, init_from=str(workspace / "base" / "final"),
                 optim=frozen, seed=5))
    warm = load_file(str(workspace / "warm" / "final" / "sidenet.safetensors"))
    assert base.keys() == warm.keys() and all(torch.equal(base[k], warm[k]) for k in base)
    history = json.loads((workspace / "warm" / "final" / "longmem_config.json").read_text())["extra"]["init_from"]
    assert history["train_config"]["steps"] == 4 and history["train_config"]["out_dir"] == str(workspace / "base")
    train(config(workspace, "cold", steps=1, eval_interval=100, optim=frozen, seed=5))
    cold = load_file(str(workspace / "cold" / "final" / "sidenet.safetensors"))
    assert not all(torch.equal(base[k], cold[k]) for k in base)  # without init_from: a new SideNet

    deeper = LongMemConfig(memory_size=64, chunk_size=2, topk_tokens=8, segment_length=16, memory_dtype="float32",
                           sidenet_layers=1, sidenet_memory_layer=0)
    with pytest.raises(LongMemError, match="init_from=.* has sidenet_layers=2, this run 1"):
        train(config(workspace, "mismatch", longmem=deeper, init_from=str(workspace / "base" / "final")))
    with pytest.raises(LongMemError, match="is not a LongMem checkpoint"):
        train(config(workspace, "missing", init_from=str(workspace / "no-such-checkpoint")))
    other = workspace / "other-backbone"
    save_tiny_llama(other)
    foreign = LlamaForCausalLM.from_pretrained(other)
    with torch.no_grad():
        foreign.model.norm.weight.mul_(2.0)  # other weights: another backbone's fingerprint
    foreign.save_pretrained(other)
    with pytest.raises(LongMemError, match="different backbone"):
        train(config(workspace, "foreign", backbone=str(other), init_from=str(workspace / "base" / "final")))
