"""Memory-augmented adaptation training (docs/method.md): frozen backbone, trainable SideNet, per-row memory.

    cfg = load_config(TrainConfig, "configs/default-longmem.json", ["steps=100"])
    train(cfg)                       # -> out_dir/final/ (a LongMem checkpoint)

Batches are Transformer-XL streams (docs/method.md, "Training data order"): row j of consecutive steps reads consecutive
segments of one document, so row j's memory holds that document's earlier part; a row's
memory is reset when it starts a new document. Every `save_interval` steps (and on Ctrl-C)
a checkpoint holds the SideNet, optimizer, scheduler, data position, RNG *and every row's
memory*, so a resumed run continues exactly. Under `torchrun` each rank trains its own
streams with its own memories; PyTorch DDP averages the SideNet's gradients (gloo on CPU,
NCCL on GPU). Shape letters: B rows per rank, T segment length, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from longmem.config import LongMemConfig
from longmem.errors import LongMemError
from longmem.io import read_json, write_json
from longmem.runtime import autocast, load_tokenizer, quiet_transformers, resolve_device, set_threads
from longmem.training.checkpoints import TrainState, latest_checkpoint, load_checkpoint, save_checkpoint
from longmem.training.config_io import check_resumable
from longmem.training.interrupt import StopOnCtrlC
from longmem.training.metrics import MetricsLog, Throughput, progress_bar
from longmem.training.optim import OptimizerConfig, build_optimizer, build_scheduler
from longmem.training.step import next_token_loss, train_step
from longmem.training.streams import StreamBatcher
from longmem.training.tokens import TokenizedCorpus


def adaptation_optim() -> OptimizerConfig:
    # the paper's adaptation settings: Adam(0.9, 0.98, eps 1e-6), lr 2e-4, polynomial decay, weight decay 0.01
    return OptimizerConfig(lr=2e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01, grad_clip=1.0,
                           warmup_steps=100, min_lr_ratio=0.0, decay="polynomial")


@dataclass
class TrainConfig:
    backbone: str = "runs/backbone/final"
    """The frozen backbone: a HuggingFace model folder (with its tokenizer)."""
    data_dir: str = "data/prepared"
    """Prepared documents, or a folder of the user's .txt/.jsonl files (then dev_dir is needed for eval)."""
    dev_dir: str = ""
    """Dev documents for periodic evaluation; empty = the dev split of data_dir."""
    token_cache_dir: str = "data/tokens"
    """Where tokenised splits are cached."""
    out_dir: str = "runs/longmem"
    """Run folder: checkpoints, metrics.csv, and the final LongMem checkpoint in `final/`."""
    longmem: LongMemConfig = field(default_factory=LongMemConfig)
    """The LongMem model: memory_layer, memory_size, chunk_size, topk_tokens, segment_length, ..."""
    optim: OptimizerConfig = field(default_factory=adaptation_optim)
    """AdamW and learning-rate schedule (the paper's adaptation values by default)."""
    memory_layer_lr_scale: float = 1.0
    """Learning-rate multiplier for the SideNet's memory-augmented layer (its block and per-head gates: the layer whose
    queries search the memory)."""
    retrieval_loss_weight: float = 0.0
    """Weight of the auxiliary retrieval loss (`longmem.retrieval_loss`: each memory query is trained to rank the
    chunks holding its next token first); 0 = off, the paper's recipe."""
    retrieval_loss_candidates: int = 64
    """Chunks each memory query searches for that loss (at least the chunks it attends, topk_tokens / chunk_size)."""
    retrieval_loss_through_lower_layers: bool = False
    """That loss's gradient reaches the SideNet layers below the memory layer too (default: only the memory layer's
    query projection, which measured as good at retrieval without making the SideNet worse without memory)."""
    min_document_chars: int = 0
    """Train and evaluate only on documents at least this long (memory matters on long documents)."""
    batch_size: int = 4
    """Streams (rows) per rank; each row has its own memory."""
    steps: int = 1000
    """Optimizer steps in total."""
    eval_interval: int = 200
    """Dev evaluation (perplexity with and without memory) every this many steps and at the end."""
    eval_segments: int = 64
    """Segment rows scored per dev evaluation (streams over the dev documents, fresh memories)."""
    save_interval: int = 200
    """Checkpoint every this many steps (also at the end and on Ctrl-C)."""
    seed: int = 0
    """Seed for data order and dropout."""
    device: str = "auto"
    """"auto", "cpu" or "cuda" (under torchrun: cuda:LOCAL_RANK)."""
    dtype: str = "bf16"
    """Autocast dtype: "bf16" (SideNet weights stay fp32) or "fp32"."""
    threads: int = 0
    """CPU threads per process (0 = keep the process's setting: `longmem` applies longmem.runtime's default policy)."""
    resume: bool = False
    """Continue the newest checkpoint in out_dir."""
    init_from: str = ""
    """Warm start: a LongMem checkpoint (for this backbone, with the same SideNet shape) whose SideNet weights
    this run starts from, with a fresh optimizer, schedule and data order. Empty = a new SideNet."""


RESUMABLE_CHANGES = {"data_dir", "dev_dir", "token_cache_dir", "out_dir", "steps", "eval_interval", "eval_segments",
                     "save_interval", "device", "threads", "resume"}


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Distributed":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def build_model(cfg: TrainConfig, device: torch.device):
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from longmem.model import LongMemForCausalLM

    if not Path(cfg.backbone).is_dir():
        raise LongMemError(f"backbone folder not found: {cfg.backbone}; pretrain one (`longmem pretrain`) or set backbone")
    try:
        with quiet_transformers():  # no "Loading weights" bar
            backbone = AutoModelForCausalLM.from_pretrained(cfg.backbone, dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise LongMemError(f"cannot load the backbone from {cfg.backbone} ({' '.join(str(e).split())}); it is "
                           f"missing, corrupt or truncated: restore it or point backbone to another folder") from e
    model = LongMemForCausalLM.from_backbone(backbone, cfg.longmem)
    if cfg.init_from:
        warm_start(model, cfg.init_from)
    return model.to(device)


STRUCTURE = ("memory_layer", "sidenet_layers", "sidenet_memory_layer")
"""LongMemConfig fields that decide what the SideNet's weights mean; a warm start must keep them."""


def warm_start(model, path: str) -> None:
    """Copy the SideNet weights of checkpoint `path` into `model` (built for the same backbone)."""
    from longmem.model import LongMemForCausalLM

    source = LongMemForCausalLM.from_pretrained(path, backbone=model.backbone)  # checks the backbone's fingerprint
    for name in STRUCTURE:
        mine, theirs = getattr(model.config, name), getattr(source.config, name)
        if mine != theirs:
            raise LongMemError(f"init_from={path} has {name}={theirs}, this run {mine}; set longmem.{name}={theirs} "
                               f"or start without init_from")
    try:
        model.sidenet.load_state_dict(source.sidenet.state_dict())
    except RuntimeError as e:
        raise LongMemError(f"init_from={path}: its SideNet does not fit this run's ({' '.join(str(e).split())[:200]}); "
                           f"use the longmem settings it was trained with") from e


@torch.no_grad()
def evaluate(model, corpus: TokenizedCorpus, cfg: TrainConfig, device) -> dict[str, float]:
    """Dev losses on the same stream batches: backbone alone, LongMem without and with memory."""
    seg = model.config.segment_length
    batcher = StreamBatcher(corpus, cfg.batch_size, seg, seed=1234, shuffle=True, loop=False)
    memory = model.new_memory(cfg.batch_size)
    sums = {"backbone": 0.0, "no_memory": 0.0, "memory": 0.0}
    n_tokens = 0
    was_training = model.training
    model.eval()
    for _ in range(max(1, cfg.eval_segments // cfg.batch_size)):
        try:
            batch = next(batcher)
        except StopIteration:
            break
        x, y, mask = batch.input_ids.to(device), batch.labels.to(device), batch.attention_mask.to(device)
        memory.reset(rows=batch.new_document.nonzero().flatten().tolist())
        with autocast(device, cfg.dtype):
            sums["backbone"] += next_token_loss(model.backbone(input_ids=x, attention_mask=mask).logits, y, "sum").item()
            sums["no_memory"] += next_token_loss(model(x, attention_mask=mask).logits, y, "sum").item()
            sums["memory"] += next_token_loss(model(x, memory=memory, attention_mask=mask).logits, y, "sum").item()
        n_tokens += batch.num_targets
    model.train(was_training)
    return {f"dev_ppl_{k}": math.exp(v / max(1, n_tokens)) for k, v in sums.items()}


def load_corpus(path: str, split: str, tokenizer, cfg: TrainConfig) -> TokenizedCorpus | None:
    """The documents of `split` at least `min_document_chars` long, tokenised and cached."""
    from longmem.data.documents import load_documents

    docs = [d for d in load_documents(path, split=split) if len(d.text) >= cfg.min_document_chars]
    if not docs:
        if split == "dev":
            return None
        raise LongMemError(f"no {split} documents of at least {cfg.min_document_chars} characters in {path}; "
                           f"lower min_document_chars or add data")
    name = f"{split}-{Path(path).name}-min{cfg.min_document_chars}"
    return TokenizedCorpus.cached(docs, tokenizer, cfg.token_cache_dir, name)


def train(cfg: TrainConfig) -> dict:
    """Train (or resume) a LongMem SideNet as described by `cfg`; returns the final metrics."""
    if cfg.dtype not in ("bf16", "fp32"):
        raise LongMemError(f'dtype must be "bf16" or "fp32", not "{cfg.dtype}"')
    if not cfg.memory_layer_lr_scale >= 0:  # also NaN
        raise LongMemError(f"memory_layer_lr_scale must be a number of at least 0, not {cfg.memory_layer_lr_scale}")
    if not 0 <= cfg.retrieval_loss_weight < math.inf:  # also NaN
        raise LongMemError(f"retrieval_loss_weight must be a finite number of at least 0, not {cfg.retrieval_loss_weight}")
    topk_chunks = cfg.longmem.topk_chunks
    if cfg.retrieval_loss_weight > 0 and cfg.retrieval_loss_candidates < topk_chunks:
        raise LongMemError(f"retrieval_loss_candidates={cfg.retrieval_loss_candidates} is fewer than the {topk_chunks} "
                           f"chunks a query attends (topk_tokens / chunk_size); give at least {topk_chunks}")
    dist = Distributed.from_env()
    if dist.enabled:
        import torch.distributed as td
        backend = "nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo"
        td.init_process_group(backend)
        device = torch.device(f"cuda:{dist.local_rank}") if backend == "nccl" else torch.device("cpu")
        if backend == "nccl":
            torch.cuda.set_device(device)
    else:
        device = resolve_device(cfg.device)
    if cfg.threads:
        set_threads(cfg.threads)
    out_dir = Path(cfg.out_dir)
    checkpoint = latest_checkpoint(out_dir)
    if checkpoint is not None and not cfg.resume:
        raise LongMemError(f"{out_dir} already holds checkpoints; pass resume=true to continue it, or choose a new out_dir")
    if checkpoint is not None:
        check_resumable(checkpoint, cfg, RESUMABLE_CHANGES)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, device)
    torch.manual_seed(cfg.seed + dist.rank)  # the same SideNet everywhere, a different dropout stream per rank
    tokenizer = load_tokenizer(cfg.backbone)
    seg = model.config.segment_length
    corpus = load_corpus(cfg.data_dir, "train", tokenizer, cfg)
    dev = load_corpus(cfg.dev_dir or cfg.data_dir, "dev", tokenizer, cfg)
    batcher = StreamBatcher(corpus, cfg.batch_size, seg, seed=cfg.seed, rank=dist.rank, world_size=dist.world_size)
    memory_layer = f"layers.{model.config.sidenet_memory_layer}."  # its block and gate
    optimizer = build_optimizer(model.sidenet.named_parameters(), cfg.optim, {memory_layer: cfg.memory_layer_lr_scale})
    scheduler = build_scheduler(optimizer, cfg.optim.warmup_steps, cfg.steps, cfg.optim.min_lr_ratio, cfg.optim.decay)
    memory = model.new_memory(cfg.batch_size)
    step = 0
    if checkpoint is not None:
        step = load_checkpoint(checkpoint, model, optimizer, scheduler).step
        rank_state = read_json(checkpoint / f"data-rank{dist.rank}.json", "checkpoint data position")
        batcher.load_state_dict(rank_state["batcher"])
        torch.set_rng_state(torch.tensor(rank_state["torch_rng"], dtype=torch.uint8))
        memory = model.load_memory(checkpoint / f"memory-rank{dist.rank}.safetensors")
    run = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP
        # the gate gets no gradient while every memory is empty: let DDP skip it then
        run = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)

    is_main = dist.rank == 0
    log = MetricsLog(out_dir, ["loss", "lr", "tokens_per_s", "memory_tokens", "gate_mean", "retrieval_loss", "dev_ppl_backbone",
                               "dev_ppl_no_memory", "dev_ppl_memory"], resume_step=step) if is_main else None

    def save(step: int) -> None:
        # every rank stages its own memories, data position and RNG; rank 0 moves them into its checkpoint
        staging = out_dir / f".ranks-step-{step:06d}"
        memory.save(staging / f"memory-rank{dist.rank}.safetensors")
        write_json(staging / f"data-rank{dist.rank}.json",
                   {"batcher": batcher.state_dict(), "torch_rng": torch.get_rng_state().tolist()})
        if dist.enabled:
            torch.distributed.barrier()
        if is_main:
            def extra(folder: Path) -> None:
                for f in staging.iterdir():
                    os.replace(f, folder / f.name)
                staging.rmdir()
            try:
                save_checkpoint(out_dir, TrainState(step=step, config=dataclasses.asdict(cfg)), model, optimizer,
                                scheduler, extra=extra)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        if dist.enabled:
            torch.distributed.barrier()

    metrics: dict = {}
    speed = Throughput()
    bar = progress_bar(cfg.steps, step, desc="train") if is_main else None
    model.train()
    with StopOnCtrlC() as stop:
        while step < cfg.steps:
            batch = next(batcher)
            losses = train_step(run, batch, memory, optimizer, scheduler, device, grad_clip=cfg.optim.grad_clip,
                                precision=cfg.dtype, retrieval_loss_weight=cfg.retrieval_loss_weight,
                                retrieval_candidates=cfg.retrieval_loss_candidates,
                                retrieval_through_lower_layers=cfg.retrieval_loss_through_lower_layers)
            step += 1
            tok_s = speed.update(batch.num_targets * dist.world_size)
            if is_main:
                gate = torch.sigmoid(model.sidenet.layers[model.config.sidenet_memory_layer].gate).mean().item()
                row = {"loss": losses.loss.item(), "lr": scheduler.get_last_lr()[0], "tokens_per_s": tok_s,
                       "memory_tokens": len(memory), "gate_mean": gate}
                if losses.retrieval_loss is not None:
                    row["retrieval_loss"] = losses.retrieval_loss.item()
                if dev is not None and (step % cfg.eval_interval == 0 or step == cfg.steps):
                    row.update(evaluate(model, dev, cfg, device))
                    bar.write(f"step {step}: dev ppl backbone {row['dev_ppl_backbone']:.2f} | LongMem without memory "
                              f"{row['dev_ppl_no_memory']:.2f} | with memory {row['dev_ppl_memory']:.2f}")
                log.log(step, **row)
                metrics = row
                bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{tok_s:,.0f}", mem=len(memory))
                bar.update(1)
            if step % cfg.save_interval == 0 or step == cfg.steps or stop.requested:
                save(step)
            if stop.requested:
                break
    if bar is not None:
        bar.close()
        log.close()
    if dist.enabled:
        metrics["replica_max_abs_diff"] = replica_difference(model)
    if is_main and step == cfg.steps:
        extra = {"train_config": dataclasses.asdict(cfg), "final_metrics": metrics}
        if cfg.init_from:  # the run it started from, and so on back: how the weights were made
            extra["init_from"] = checkpoint_history(cfg.init_from)
        model.save_pretrained(out_dir / "final", backbone="save", tokenizer=tokenizer, extra=extra)
        write_json(out_dir / "summary.json", {"step": step, **metrics})
    if dist.enabled:
        torch.distributed.destroy_process_group()
    return metrics


def checkpoint_history(path: str) -> dict:
    """What a LongMem checkpoint's config says of its making (`extra`: train_config, final_metrics, its own
    init_from), recorded in a warm-started run's final checkpoint."""
    from longmem.checkpoint import CONFIG_FILE, resolve_model_path

    return read_json(resolve_model_path(path) / CONFIG_FILE, "LongMem checkpoint config").get("extra", {})


def replica_difference(model) -> float:
    """Largest absolute difference of any SideNet parameter between this rank and the others."""
    import torch.distributed as td
    flat = torch.cat([p.detach().float().flatten() for p in model.sidenet.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(td.get_world_size())]
    td.all_gather(gathered, flat)
    diff = max(float((g - flat).abs().max()) for g in gathered)
    # A gloo worker thread can still hold these tensors for a moment after the collective completed. If it drops
    # the last reference only once the interpreter is shutting down (this runs just before the process exits),
    # freeing them needs the GIL and the process aborts ("terminate called without an active exception",
    # SIGABRT): keep them alive until gloo has let go.
    deadline = time.monotonic() + 10.0
    while any(t._use_count() > 1 for t in (flat, *gathered)) and time.monotonic() < deadline:
        time.sleep(0.001)
    return diff
