"""Fast CPU tests of the training utilities: token cache, stream batching, checkpoints,
configs, and exact kill-and-resume of backbone pretraining on a tiny Llama."""

from __future__ import annotations

import json
import signal
import sysconfig
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from longmem.errors import LongMemError
from longmem.training import pretrain as pretrain_mod
from longmem.training.pretrain import BackboneConfig, PretrainConfig, pretrain
from longmem.training.checkpoints import TrainState, latest_checkpoint, load_latest, save_checkpoint
from longmem.training.config_io import load_config
from longmem.training.metrics import MetricsLog
from longmem.training.optim import OptimizerConfig, build_optimizer, build_scheduler
from longmem.training.streams import IGNORE_INDEX, RandomWindows, StreamBatcher
from longmem.training.tokens import TokenizedCorpus

STDLIB = Path(sysconfig.get_paths()["stdlib"])
MODULES = ["bisect", "heapq", "colorsys", "keyword", "textwrap", "fnmatch", "shlex", "glob"]


@dataclass
class Doc:
    id: str
    text: str


def make_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([d.text for d in stdlib_docs()], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def stdlib_docs() -> list[Doc]:
    return [Doc(m, (STDLIB / f"{m}.py").read_text()) for m in MODULES]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def synthetic_corpus(lengths, seed=0, eos=0) -> TokenizedCorpus:
    """Documents of the given numbers of text tokens (values 1..999, never eos)."""
    rng = np.random.default_rng(seed)
    pieces, offsets = [np.array([eos])], [0]
    for n in lengths:
        pieces.append(np.append(rng.integers(1, 1000, n), eos))
        offsets.append(offsets[-1] + n + 1)
    ids = [f"d{i}" for i in range(len(lengths))]
    return TokenizedCorpus(np.concatenate(pieces).astype(np.int32), np.array(offsets), ids, eos)


# ---------------------------------------------------------------- tokens

def test_tokenized_corpus_roundtrip_and_cache(tokenizer, tmp_path, monkeypatch):
    docs = stdlib_docs()[:3]
    corpus = TokenizedCorpus.cached(docs, tokenizer, tmp_path, "train")
    assert corpus.tokens.dtype == np.uint16 and len(corpus) == 3
    for i, doc in enumerate(docs):
        ids = corpus.document(i)
        assert ids[0] == ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids[1:-1].tolist()) == doc.text
    assert corpus.document_lengths().sum() == corpus.num_tokens - 1

    monkeypatch.setattr(TokenizedCorpus, "build", classmethod(lambda *a, **k: pytest.fail("cache not used")))
    again = TokenizedCorpus.cached(docs, tokenizer, tmp_path, "train")
    assert np.array_equal(again.tokens, corpus.tokens) and again.doc_ids == corpus.doc_ids
    monkeypatch.undo()

    other = make_tokenizer(vocab_size=280)  # a different tokenizer invalidates the cache
    rebuilt = TokenizedCorpus.cached(docs, other, tmp_path, "train")
    assert rebuilt.num_tokens != corpus.num_tokens
    header = json.loads((tmp_path / "train.json").read_text())
    assert header["doc_ids"] == [d.id for d in docs]


# ---------------------------------------------------------------- streams

LENGTHS = [0, 1, 7, 8, 9, 30, 3, 64, 15, 16, 2, 41, 5]


def read_epoch(batcher):
    """Replay the batches of a non-looping batcher; return {doc index: labels read}."""
    corpus, T = batcher.corpus, batcher.seq_len
    seen, current = {}, [None] * batcher.batch_size
    for batch in batcher:
        assert batch.input_ids.shape == batch.labels.shape == batch.attention_mask.shape == (batcher.batch_size, T)
        for j in range(batcher.batch_size):
            d, n = int(batch.doc_index[j]), int(batch.attention_mask[j].sum())
            assert batch.attention_mask[j, :n].all() and not batch.attention_mask[j, n:].any()
            assert (batch.labels[j, n:] == IGNORE_INDEX).all() and (batch.labels[j, :n] != IGNORE_INDEX).all()
            if d < 0:
                assert n == 0 and not batch.new_document[j]
                continue
            starts = current[j] is None or current[j] != d
            assert bool(batch.new_document[j]) == starts
            if starts:
                assert d not in seen, "a document was read twice"
                assert current[j] is None or len(seen[current[j]]) == len(corpus.document(current[j])) - 1
                seen[d], current[j] = [], d
            doc, p = corpus.document(d), len(seen[d])
            assert batch.input_ids[j, :n].tolist() == doc[p : p + n].tolist()  # this row reads only document d
            seen[d] += batch.labels[j, :n].tolist()
    return seen


def test_stream_batcher_reads_every_token_once():
    corpus = synthetic_corpus(LENGTHS)
    seen = read_epoch(StreamBatcher(corpus, batch_size=3, seq_len=8, seed=1, loop=False))
    assert sorted(seen) == list(range(len(corpus)))
    for d, labels in seen.items():
        assert labels == corpus.document(d)[1:].tolist()


def test_stream_batcher_rank_shards_are_disjoint():
    corpus = synthetic_corpus(LENGTHS)
    shards = [set(read_epoch(StreamBatcher(corpus, 2, 8, seed=3, loop=False, rank=r, world_size=3))) for r in range(3)]
    assert set().union(*shards) == set(range(len(corpus)))
    assert sum(len(s) for s in shards) == len(corpus)


def test_stream_batcher_resume_is_exact_across_epochs():
    corpus = synthetic_corpus(LENGTHS)
    a = StreamBatcher(corpus, 3, 8, seed=5)
    for _ in range(11):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))
    expected = [next(a) for _ in range(40)]  # crosses into later epochs
    assert a.epoch >= 2
    b = StreamBatcher(corpus, 3, 8, seed=5)
    b.load_state_dict(state)
    for x, y in zip(expected, (next(b) for _ in range(40)), strict=True):
        for name in ("input_ids", "labels", "attention_mask", "new_document", "doc_index"):
            assert torch.equal(getattr(x, name), getattr(y, name))
    with pytest.raises(LongMemError, match="batch_size"):
        StreamBatcher(corpus, 4, 8, seed=5).load_state_dict(state)


def test_epochs_are_shuffled_by_seed():
    corpus = synthetic_corpus([3] * 20)
    first = [StreamBatcher(corpus, 1, 8, seed=s, loop=False) for s in (0, 0, 1)]
    orders = [[int(b.doc_index[0]) for b in batcher] for batcher in first]
    assert orders[0] == orders[1] != orders[2]


def test_random_windows_deterministic_and_contiguous():
    tokens = np.arange(1000, dtype=np.uint16)
    s = RandomWindows(tokens, seq_len=16, batch_size=4, seed=7)
    x = s.batch(3)
    assert x.shape == (4, 17) and torch.equal(x, RandomWindows(tokens, 16, 4, seed=7).batch(3))
    assert (x[:, 1:] - x[:, :-1] == 1).all()
    assert not torch.equal(x, s.batch(4))


# ---------------------------------------------------------------- optimizer, schedule, config

def test_optimizer_groups_and_schedule():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model.named_parameters(), OptimizerConfig(lr=1.0, weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert [p.ndim for p in decay["params"]] == [2] and no_decay["weight_decay"] == 0 and len(no_decay["params"]) == 3
    sched = build_scheduler(opt, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    lrs = []
    for _ in range(110):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))


def test_lr_scale_multiplies_the_learning_rate_of_the_matching_parameters():
    """A name prefix's multiplier scales its parameters' lr through the whole schedule; Adam's first step moves
    every weight by about its lr (g / |g|), so the scaled layer moves 10x as far."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"layers": torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])})
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = build_optimizer(model.named_parameters(), OptimizerConfig(lr=1e-3, weight_decay=0.0), {"layers.1.": 10.0})
    sched = build_scheduler(opt, warmup_steps=2, total_steps=10)
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([5e-4, 5e-4, 5e-3, 5e-3])  # warm-up step 1 of 2
    model["layers"][1](model["layers"][0](torch.randn(3, 4))).square().sum().backward()
    opt.step()
    sched.step()
    moved = {k: (v - before[k]).abs().mean().item() for k, v in model.named_parameters()}
    assert moved["layers.1.weight"] == pytest.approx(10 * moved["layers.0.weight"], rel=1e-3)
    assert moved["layers.1.bias"] == pytest.approx(10 * moved["layers.0.bias"], rel=1e-3)
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([1e-3, 1e-3, 1e-2, 1e-2])  # after warm-up
    # without a scale: the two groups of before (decayed, not decayed)
    assert len(build_optimizer(model.named_parameters(), OptimizerConfig()).param_groups) == 2
    # a multiplier below 1 still leaves an unscaled group first (group 0's lr is the one logged)
    low = build_optimizer(model.named_parameters(), OptimizerConfig(lr=1e-3), {"layers.1.": 0.1})
    assert [g["lr"] for g in low.param_groups] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4])
    with pytest.raises(LongMemError, match=r"^optim.lr must be a number of at least 0, not -1.0$"):
        build_optimizer(model.named_parameters(), OptimizerConfig(lr=-1.0))
    with pytest.raises(LongMemError, match=r"^the learning-rate multiplier of 'layers.1.' must be a number of at least 0"):
        build_optimizer(model.named_parameters(), OptimizerConfig(), {"layers.1.": -2.0})


def test_load_config_with_overrides(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"steps": 10, "model": {"hidden_size": 64}, "optim": {"betas": [0.9, 0.98]}}))
    cfg = load_config(PretrainConfig, path, ["optim.lr=3e-4", "--seq-len=128", "device=cpu"])
    assert cfg.steps == 10 and cfg.model.hidden_size == 64 and cfg.model.num_layers == BackboneConfig().num_layers
    assert cfg.optim.lr == 3e-4 and cfg.optim.betas == (0.9, 0.98) and cfg.seq_len == 128 and cfg.device == "cpu"
    assert load_config(PretrainConfig, None, ["out_dir=123"]).out_dir == "123"
    with pytest.raises(LongMemError, match="unknown option optim.lrr"):
        load_config(PretrainConfig, path, ["optim.lrr=3"])
    with pytest.raises(LongMemError, match="option steps must be int"):
        load_config(PretrainConfig, path, ["steps=1.5"])
    path.write_text(json.dumps({"model": {"layers": 3}}))
    with pytest.raises(LongMemError, match="unknown option model.layers; valid options: model.hidden_size"):
        load_config(PretrainConfig, path)


# ---------------------------------------------------------------- checkpoints

def tiny_training(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 1))
    opt = build_optimizer(model.named_parameters(), OptimizerConfig(lr=0.1))
    return model, opt, build_scheduler(opt, 2, 10)


def train_step(model, opt, sched):
    model(torch.randn(5, 4)).pow(2).mean().backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def test_checkpoint_roundtrip_and_failed_save(tmp_path, monkeypatch):
    model, opt, sched = tiny_training()
    train_step(model, opt, sched)
    save_checkpoint(tmp_path, TrainState(1, {"pos": 1}, {"lr": 0.1}), model, opt, sched)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    rng_after_save = torch.rand(3)
    train_step(model, opt, sched)

    def crash(*args, **kwargs):
        raise OSError("disk full")
    import longmem.training.checkpoints as checkpoints
    monkeypatch.setattr(checkpoints, "trainer_state", crash)  # fails after the weights file is written
    with pytest.raises(LongMemError, match="cannot write checkpoint .*step-000002: disk full"):
        save_checkpoint(tmp_path, TrainState(2, {"pos": 2}, {}), model, opt, sched)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["latest", "step-000001"]
    assert not list(tmp_path.glob("*step-000002*"))

    model2, opt2, sched2 = tiny_training(seed=1)
    state = load_latest(tmp_path, model2, opt2, sched2)
    assert state == TrainState(1, {"pos": 1}, {"lr": 0.1})
    assert all(torch.equal(saved[k], v) for k, v in model2.state_dict().items())
    assert sched2.last_epoch == 1 and opt2.state_dict()["state"][0]["step"] == 1
    assert torch.equal(torch.rand(3), rng_after_save)  # RNG restored to its state at the save


def test_checkpoint_of_the_older_format_still_resumes(tmp_path):
    """A checkpoint written before trainer state moved to safetensors + JSON (torch.save'd trainer.pt)."""
    model, opt, sched = tiny_training()
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched.step()
    path = save_checkpoint(tmp_path, TrainState(1), model, opt, sched)
    (path / "trainer.json").unlink()
    (path / "trainer.safetensors").unlink()
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": []}, path / "trainer.pt")
    model2, opt2, sched2 = tiny_training(seed=1)
    load_latest(tmp_path, model2, opt2, sched2)
    a, b = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[i][n], b[i][n]) for i in a for n in a[i])
    assert sched2.last_epoch == sched.last_epoch


def test_checkpoint_errors_are_one_line(tmp_path):
    model, opt, sched = tiny_training()
    path = save_checkpoint(tmp_path, TrainState(1), model, opt, sched)
    other = torch.nn.Sequential(torch.nn.Linear(4, 9), torch.nn.LayerNorm(9), torch.nn.Linear(9, 1))
    other_opt = build_optimizer(other.named_parameters(), OptimizerConfig())
    with pytest.raises(LongMemError, match="does not match the model"):
        load_latest(tmp_path, other, other_opt, build_scheduler(other_opt, 1, 2))
    assert sorted(f.name for f in path.iterdir()) == ["state.json", "trainer.json", "trainer.safetensors",
                                                      "weights.safetensors"]  # nothing pickled
    good = (path / "trainer.safetensors").read_bytes()
    (path / "trainer.safetensors").write_bytes(good[:len(good) // 2])
    with pytest.raises(LongMemError, match="unreadable") as e:
        load_latest(tmp_path, model, opt, sched)
    assert "\n" not in str(e.value)
    (path / "trainer.safetensors").write_bytes(good)
    (path / "trainer.json").write_text("{")
    with pytest.raises(LongMemError, match="trainer state") as e:
        load_latest(tmp_path, model, opt, sched)
    assert "\n" not in str(e.value)
    (tmp_path / "latest").write_text("step-000009\n")
    with pytest.raises(LongMemError, match="missing checkpoint"):
        latest_checkpoint(tmp_path)


def test_metrics_log_truncates_on_resume(tmp_path):
    log = MetricsLog(tmp_path, ["loss"])
    for step in range(1, 6):
        log.log(step, loss=float(step))
    MetricsLog(tmp_path, ["loss"], resume_step=3).log(4, loss=40.0)
    rows = [(r["step"], r["loss"]) for r in MetricsLog.read(tmp_path)]
    assert rows == [("1", "1.0"), ("2", "2.0"), ("3", "3.0"), ("4", "40.0")]


# ---------------------------------------------------------------- pretraining kill-and-resume

@pytest.fixture
def tiny_pretrain(tmp_path, tokenizer, monkeypatch):
    tokenizer.save_pretrained(tmp_path / "tok")
    docs = stdlib_docs()
    corpora = {"train": TokenizedCorpus.build(docs[:6], tokenizer), "dev": TokenizedCorpus.build(docs[6:], tokenizer)}
    monkeypatch.setattr(pretrain_mod, "load_split", lambda cfg, tok, split: corpora[split])

    def make(out: str, hidden_size: int = 32, **kw) -> PretrainConfig:
        return PretrainConfig(
            tokenizer_dir=str(tmp_path / "tok"), out_dir=str(tmp_path / out),
            model=BackboneConfig(hidden_size=hidden_size, num_layers=2, num_heads=4, num_kv_heads=2,
                                 intermediate_size=64),
            optim=OptimizerConfig(lr=3e-3, warmup_steps=2), seq_len=16, batch_size=2, grad_accum=2, steps=6,
            eval_interval=3, eval_tokens=128, save_interval=2, device="cpu", dtype="fp32", **kw)
    return make


def losses(out_dir) -> list[tuple[str, str, str]]:
    return [(r["step"], r["loss"], r["dev_loss"]) for r in MetricsLog.read(out_dir)]


def test_pretrain_kill_and_resume_matches_uninterrupted(tiny_pretrain, monkeypatch):
    from transformers import LlamaForCausalLM

    full = pretrain(tiny_pretrain("full"))
    assert full.step == 6 and full.final_dir is not None

    class CtrlCAtStep3(RandomWindows):
        def batch(self, index):
            if index == 2 * 2:  # first micro-batch of step 3
                signal.raise_signal(signal.SIGINT)
            return super().batch(index)
    monkeypatch.setattr(pretrain_mod, "RandomWindows", CtrlCAtStep3)
    cut = pretrain(tiny_pretrain("cut"))
    assert cut.step == 3 and cut.final_dir is None
    cut_dir = Path(tiny_pretrain("cut").out_dir)
    assert (cut_dir / "latest").read_text().strip() == "step-000003"
    monkeypatch.setattr(pretrain_mod, "RandomWindows", RandomWindows)
    with pytest.raises(LongMemError, match="resume=true"):
        pretrain(tiny_pretrain("cut"))
    with pytest.raises(LongMemError, match="model.hidden_size"):
        pretrain(tiny_pretrain("cut", resume=True, hidden_size=64))
    resumed = pretrain(tiny_pretrain("cut", resume=True))
    assert resumed.step == 6

    assert losses(full.final_dir.parent) == losses(cut_dir)  # exactly equal per-step train and dev losses
    assert len([r for r in losses(cut_dir) if r[1]]) == 6
    a = LlamaForCausalLM.from_pretrained(full.final_dir)
    b = LlamaForCausalLM.from_pretrained(resumed.final_dir)
    assert a.dtype == torch.bfloat16 and a.config.tie_word_embeddings
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert (resumed.final_dir / "tokenizer.json").is_file()


def test_an_option_added_since_a_checkpoint_resumes_at_its_default(tmp_path):
    """check_resumable: a key the saved config lacks counts as its default; any other value is a one-line error."""
    from longmem.training.config_io import check_resumable
    from longmem.training.train import TrainConfig
    saved = json.loads(json.dumps(dataclasses.asdict(TrainConfig())))
    del saved["retrieval_loss_weight"]  # a checkpoint from before the option existed
    (tmp_path / "step-000001").mkdir()
    (tmp_path / "step-000001" / "state.json").write_text(json.dumps({"config": saved}))
    check_resumable(tmp_path / "step-000001", TrainConfig(), set())
    with pytest.raises(LongMemError, match=r"trained with retrieval_loss_weight=0\.0 but this run has "
                                           r"retrieval_loss_weight=0\.5; use the same value"):
        check_resumable(tmp_path / "step-000001", TrainConfig(retrieval_loss_weight=0.5), set())
