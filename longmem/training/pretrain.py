"""Pretrain the default backbone: a small Llama (GQA, RoPE, tied embeddings) from scratch.

    cfg = load_config(PretrainConfig, "configs/default-backbone.json", ["steps=100"])
    result = pretrain(cfg)          # -> runs/backbone/final/ (HF model + tokenizer)

Training reads random windows of `seq_len + 1` tokens from the train split, under bf16
autocast on CPU or CUDA. Every `save_interval` steps, and on Ctrl-C, it checkpoints into
`out_dir`; `resume=true` continues the newest checkpoint exactly (same batches, same
losses as an uninterrupted run). Shape letters: B = batch, T = seq_len, V = vocab.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from longmem.errors import LongMemError
from longmem.io import atomic_dir, read_json, write_json
from longmem.runtime import autocast, load_tokenizer, quiet_transformers, resolve_device, set_threads
from longmem.training.checkpoints import TrainState, latest_checkpoint, load_checkpoint, save_checkpoint
from longmem.training.config_io import check_resumable
from longmem.training.interrupt import StopOnCtrlC
from longmem.training.metrics import MetricsLog, Throughput, progress_bar
from longmem.training.optim import OptimizerConfig, build_optimizer, build_scheduler
from longmem.training.streams import RandomWindows
from longmem.training.tokens import TokenizedCorpus


@dataclass
class BackboneConfig:
    hidden_size: int = 384
    """Model width d."""
    num_layers: int = 8
    """Decoder blocks (LongMem's SideNet gets half; the memory layer sits at ~3/4 depth)."""
    num_heads: int = 6
    """Query heads (head dim = hidden_size / num_heads)."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention; must divide num_heads)."""
    intermediate_size: int = 896
    """SwiGLU MLP width."""
    max_position_embeddings: int = 2048
    """Longest sequence the RoPE positions are configured for."""
    rope_theta: float = 10000.0
    """RoPE base."""

    def llama_config(self, tokenizer):
        from transformers import LlamaConfig

        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise LongMemError(f"model.num_heads={self.num_heads} must divide model.hidden_size={self.hidden_size} "
                               f"and be a multiple of model.num_kv_heads={self.num_kv_heads}")
        eos = tokenizer.eos_token_id
        return LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
            intermediate_size=self.intermediate_size, max_position_embeddings=self.max_position_embeddings,
            rope_theta=self.rope_theta, tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos,
            pad_token_id=eos, attn_implementation="sdpa")


@dataclass
class PretrainConfig:
    data_dir: str = "data/prepared"
    """Prepared documents (read with longmem.data.documents.load_documents)."""
    tokenizer_dir: str = "data/tokenizer"
    """A fast tokenizer folder (tokenizer.json) with an eos token."""
    token_cache_dir: str = "data/tokens"
    """Where tokenised splits are cached (rebuilt when the tokenizer or documents change)."""
    out_dir: str = "runs/backbone"
    """Run folder: checkpoints, metrics.csv, and the final model in `final/`."""
    model: BackboneConfig = field(default_factory=BackboneConfig)
    """Model dimensions."""
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW and learning-rate schedule."""
    seq_len: int = 512
    """Training window T in tokens."""
    batch_size: int = 8
    """Windows per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (tokens per step = batch_size * grad_accum * seq_len)."""
    steps: int = 4500
    """Optimizer steps in total."""
    eval_interval: int = 250
    """Dev loss every this many steps (and at the end)."""
    eval_tokens: int = 65536
    """Dev tokens scored per evaluation (fixed windows spread over the dev split)."""
    save_interval: int = 250
    """Checkpoint every this many steps (also at the end and on Ctrl-C)."""
    seed: int = 0
    """Seed for initialisation and data order."""
    device: str = "auto"
    """"auto" (CUDA if available, else CPU), "cpu" or "cuda"."""
    dtype: str = "bf16"
    """Autocast dtype: "bf16" (weights stay fp32) or "fp32" (no autocast)."""
    threads: int = 0
    """CPU threads (0 = keep the process's setting: `longmem` applies longmem.runtime's default policy)."""
    resume: bool = False
    """Continue the newest checkpoint in out_dir; without it, a run folder with checkpoints is an error."""


# fields that may differ between a checkpoint and the run resuming it
RESUMABLE_CHANGES = {"data_dir", "tokenizer_dir", "token_cache_dir", "out_dir", "steps", "eval_interval",
                      "eval_tokens", "save_interval", "device", "threads", "resume"}


@dataclass
class PretrainResult:
    step: int
    """Optimizer steps completed."""
    train_loss: float | None
    """Loss of the last step run in this call (None if none ran)."""
    dev_loss: float | None
    """Last dev loss computed in this call."""
    tokens_per_s: float
    """Training throughput of this call."""
    final_dir: Path | None
    """`out_dir/final` once all steps are done; None if interrupted."""


def load_split(cfg: PretrainConfig, tokenizer, split: str) -> TokenizedCorpus:
    """The `split` documents of cfg.data_dir, tokenised (cached in cfg.token_cache_dir).

    Without the documents (e.g. only the token cache was copied to a GPU machine), a cache
    made with this very tokenizer is used as is.
    """
    from longmem.data.documents import load_documents
    from longmem.training.tokens import tokenizer_fingerprint

    if not Path(cfg.data_dir).exists():
        corpus = TokenizedCorpus.load(cfg.token_cache_dir, split)
        header = Path(cfg.token_cache_dir) / f"{split}.json"
        if corpus is not None and read_json(header).get("tokenizer_sha256") == tokenizer_fingerprint(tokenizer):
            return corpus
        raise LongMemError(f"data_dir {cfg.data_dir} not found (and no matching token cache in "
                           f"{cfg.token_cache_dir}); run `longmem data prepare` or set data_dir")
    docs = load_documents(cfg.data_dir, split=split)
    if not docs:
        raise LongMemError(f"no {split} documents in {cfg.data_dir}; prepare the data first or set data_dir")
    return TokenizedCorpus.cached(docs, tokenizer, cfg.token_cache_dir, split)


def lm_loss(model, x: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of windows x: (B, T+1)."""
    logits = model(input_ids=x[:, :-1]).logits  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())


@torch.no_grad()
def evaluate(model, tokens: np.ndarray, seq_len: int, batch_size: int, max_tokens: int, device, dtype) -> float:
    """Mean loss over fixed, non-overlapping windows spread evenly across `tokens`."""
    n = max(1, min(max_tokens // seq_len, (len(tokens) - 1) // seq_len))
    starts = np.linspace(0, len(tokens) - seq_len - 1, n).astype(np.int64)  # (n,)
    model.eval()
    total = 0.0
    for i in range(0, n, batch_size):
        idx = starts[i : i + batch_size, None] + np.arange(seq_len + 1)  # (b, T+1)
        x = torch.from_numpy(tokens[idx].astype(np.int64)).to(device)
        with autocast(device, dtype):
            total += lm_loss(model, x).item() * len(idx)
    model.train()
    return total / n


def save_final(model, tokenizer, cfg: PretrainConfig, out_dir: Path) -> Path:
    """`out_dir/final/`: bf16 safetensors shards <= 15 MB, the tokenizer and the run config."""
    final = out_dir / "final"
    with atomic_dir(final) as tmp:  # a failed save leaves no partial folder behind
        with quiet_transformers():  # no "Writing model shards" bar
            model.to(torch.bfloat16).save_pretrained(tmp, max_shard_size="15MB")
            tokenizer.save_pretrained(tmp)
        write_json(tmp / "pretrain_config.json", dataclasses.asdict(cfg))
    return final


def pretrain(cfg: PretrainConfig) -> PretrainResult:
    """Train (or resume) the backbone described by `cfg`; see the module docstring."""
    from transformers import LlamaForCausalLM

    if cfg.dtype not in ("bf16", "fp32"):
        raise LongMemError(f'unknown dtype "{cfg.dtype}"; use bf16 or fp32')
    if cfg.threads:
        set_threads(cfg.threads)
    device, out_dir = resolve_device(cfg.device), Path(cfg.out_dir)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    checkpoint = latest_checkpoint(out_dir)
    if checkpoint is not None and not cfg.resume:
        raise LongMemError(f"{out_dir} already holds a run ({checkpoint.name}); set resume=true to continue it, "
                           f"or choose a new out_dir")

    tokenizer = load_tokenizer(cfg.tokenizer_dir)
    train, dev = load_split(cfg, tokenizer, "train"), load_split(cfg, tokenizer, "dev")
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(cfg.model.llama_config(tokenizer)).to(device)
    optimizer = build_optimizer(model.named_parameters(), cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim.warmup_steps, cfg.steps, cfg.optim.min_lr_ratio, cfg.optim.decay)
    state = TrainState(step=0, data={"next_batch": 0}, config=dataclasses.asdict(cfg))
    if checkpoint is not None:
        check_resumable(checkpoint, cfg, RESUMABLE_CHANGES)
        saved = load_checkpoint(checkpoint, model, optimizer, scheduler)
        state = TrainState(step=saved.step, data=saved.data, config=dataclasses.asdict(cfg))
        tqdm.write(f"resuming {checkpoint}")
    n_params = sum(p.numel() for p in model.parameters())
    tqdm.write(f"model: {n_params / 1e6:.2f}M parameters ({2 * n_params / 1e6:.1f} MB in bf16) on {device}; "
               f"train {train.num_tokens:,} tokens, dev {dev.num_tokens:,} tokens")

    sampler = RandomWindows(train.tokens, cfg.seq_len, cfg.batch_size, cfg.seed)
    log = MetricsLog(out_dir, ["loss", "lr", "grad_norm", "tokens_per_s", "dev_loss", "dev_ppl", "time"], state.step)
    step_tokens = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    meter, bar = Throughput(), progress_bar(cfg.steps, initial=state.step, desc="pretrain")
    loss = dev_loss = None
    t0, start_step, saved_step = time.perf_counter(), state.step, state.step
    model.train()
    try:
        with StopOnCtrlC() as stop:
            while state.step < cfg.steps and not stop.requested:
                loss_sum = torch.zeros((), device=device)
                for _ in range(cfg.grad_accum):
                    x = sampler.batch(state.data["next_batch"]).to(device, non_blocking=True)  # (B, T+1)
                    state.data["next_batch"] += 1
                    with autocast(device, cfg.dtype):
                        micro = lm_loss(model, x)
                    (micro / cfg.grad_accum).backward()
                    loss_sum += micro.detach()
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    model.parameters(), cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf)
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                loss, tok_s = loss_sum.item() / cfg.grad_accum, meter.update(step_tokens)
                log.log(state.step, loss=loss, lr=lr, grad_norm=grad_norm.item(), tokens_per_s=round(tok_s),
                        time=round(time.time(), 3))
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}")
                if state.step % cfg.eval_interval == 0 or state.step == cfg.steps:
                    dev_loss = evaluate(model, dev.tokens, cfg.seq_len, cfg.batch_size, cfg.eval_tokens, device,
                                        cfg.dtype)
                    log.log(state.step, dev_loss=dev_loss, dev_ppl=math.exp(min(dev_loss, 50)))
                    tqdm.write(f"step {state.step}: train loss {loss:.3f}, dev loss {dev_loss:.3f} "
                               f"(ppl {math.exp(min(dev_loss, 50)):.1f}), {tok_s:,.0f} tokens/s")
                if state.step % cfg.save_interval == 0:
                    save_checkpoint(out_dir, state, model, optimizer, scheduler)
                    saved_step = state.step
            if state.step != saved_step:  # finished, or stopped by Ctrl-C
                save_checkpoint(out_dir, state, model, optimizer, scheduler)
    finally:
        bar.close()
        log.close()
    elapsed = time.perf_counter() - t0
    tokens_per_s = (state.step - start_step) * step_tokens / max(elapsed, 1e-9)
    tqdm.write(f"trained {(state.step - start_step) * step_tokens:,} tokens in {elapsed:.0f} s: "
               f"{tokens_per_s:,.0f} tokens/s")
    if state.step < cfg.steps:
        tqdm.write(f"stopped at step {state.step}; continue with resume=true")
        return PretrainResult(state.step, loss, dev_loss, tokens_per_s, None)
    final = save_final(model, tokenizer, cfg, out_dir)
    tqdm.write(f"saved the backbone to {final}")
    return PretrainResult(state.step, loss, dev_loss, tokens_per_s, final)
