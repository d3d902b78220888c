"""Optimizer and learning-rate schedule shared by backbone pretraining and adaptation training."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch

from longmem.errors import LongMemError


@dataclass
class OptimizerConfig:
    lr: float = 1e-3
    """Peak learning rate, reached after warmup."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay for matrices and embeddings; norms, biases and gates get none."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping)."""
    warmup_steps: int = 200
    """Linear warmup from 0 to `lr` over this many optimizer steps."""
    min_lr_ratio: float = 0.1
    """The learning rate decays to `lr * min_lr_ratio` at the last step."""
    decay: str = "cosine"
    """Decay after warmup: "cosine" or "polynomial" (linear, power 1, as in fairseq)."""


def build_optimizer(named_params: Iterable[tuple[str, torch.nn.Parameter]], cfg: OptimizerConfig,
                    lr_scale: dict[str, float] | None = None) -> torch.optim.AdamW:
    """AdamW over the parameters that require grad. Tensors with fewer than 2 dims (norm
    weights, biases, per-head gates) are not decayed. `lr_scale` maps parameter name prefixes to
    learning-rate multipliers (the first prefix that matches; the schedule scales every group alike)."""
    if not cfg.lr >= 0:  # also NaN
        raise LongMemError(f"optim.lr must be a number of at least 0, not {cfg.lr}")
    for prefix, v in (lr_scale or {}).items():
        if not v >= 0:
            raise LongMemError(f"the learning-rate multiplier of {prefix!r} must be a number of at least 0, not {v}")
    groups: dict[tuple[bool, float], list] = {}
    for name, p in named_params:
        if p.requires_grad:
            scale = next((v for prefix, v in (lr_scale or {}).items() if name.startswith(prefix)), 1.0)
            groups.setdefault((p.ndim >= 2, scale), []).append(p)
    params = [p for group in groups.values() for p in group]
    fused = all(p.is_cuda for p in params) or None
    return torch.optim.AdamW([{"params": ps, "weight_decay": cfg.weight_decay if decayed else 0.0, "lr": cfg.lr * scale}
                              # unscaled groups first: group 0's lr is the one logged, decayed before not decayed
                              for (decayed, scale), ps in sorted(groups.items(),
                                                                 key=lambda g: (g[0][1] != 1.0, not g[0][0], g[0][1]))],
                             lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    min_lr_ratio: float = 0.1, decay: str = "cosine") -> torch.optim.lr_scheduler.LambdaLR:
    """Multiplier on the peak lr: linear warmup, then cosine or linear decay to `min_lr_ratio`."""
    if decay not in ("cosine", "polynomial"):
        raise LongMemError(f'unknown lr decay "{decay}"; use "cosine" or "polynomial"')

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else 1 - progress
        return min_lr_ratio + (1 - min_lr_ratio) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
