"""One memory-augmented adaptation step (docs/method.md, "Training data order"): reset, forward with memory, loss, update.

The step is the part of training that defines what is learned; `train.py` around it owns the
run (data, checkpoints, logging, DDP). Shape letters: B rows, T segment length, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longmem.loss import next_token_loss  # the loss forward(labels=...) uses; streams give aligned targets
from longmem.memory import MemoryBank
from longmem.retrieval_loss import RetrievalSupervision
from longmem.runtime import autocast
from longmem.training.streams import StreamBatch

__all__ = ["StepLosses", "next_token_loss", "train_step"]


@dataclass
class StepLosses:
    """What one step minimised, detached: the next-token loss and the auxiliary retrieval loss (None when off)."""
    loss: torch.Tensor
    retrieval_loss: torch.Tensor | None = None


def train_step(run: torch.nn.Module, batch: StreamBatch, memory: MemoryBank, optimizer: torch.optim.Optimizer,
               scheduler, device: torch.device, *, grad_clip: float, precision: str,
               retrieval_loss_weight: float = 0.0, retrieval_candidates: int = 64,
               retrieval_through_lower_layers: bool = False) -> StepLosses:
    """One optimizer step on `batch`; returns the (detached) mean loss over its targets.

    `run` is the model (or its DDP wrapper). Rows that start a new document get an empty
    memory first; the segment retrieves from the memory and is then written into it. The
    gradient norm is clipped to `grad_clip` (0: no clipping); `precision` ("bf16", "fp32") is the
    autocast of the forward (`longmem.runtime.autocast`). With `retrieval_loss_weight` > 0 the
    auxiliary retrieval loss over `retrieval_candidates` chunks per query (`longmem.retrieval_loss`) is
    added with that weight (its gradient reaching only the memory layer's query projection, or the
    layers below it too with `retrieval_through_lower_layers`).
    """
    x, y, mask = batch.input_ids.to(device), batch.labels.to(device), batch.attention_mask.to(device)
    memory.reset(rows=batch.new_document.nonzero().flatten().tolist())
    sup = (RetrievalSupervision(y, retrieval_candidates, retrieval_through_lower_layers)
           if retrieval_loss_weight > 0 else None)
    with autocast(device, precision):
        extra = {} if sup is None else {"retrieval_supervision": sup}  # the plain call unless the loss is on
        out = run(x, memory=memory, attention_mask=mask, **extra)
        loss = next_token_loss(out.logits, y)
        total = loss if sup is None or sup.loss is None else loss + retrieval_loss_weight * sup.loss
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    if grad_clip > 0:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    scheduler.step()
    return StepLosses(loss.detach(), None if sup is None or sup.loss is None else sup.loss.detach())
