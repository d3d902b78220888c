"""One memory-augmented adaptation step (docs/method.md, "Training data order"): reset, forward with memory, loss, update.

The step is the part of training that defines what is learned; `train.py` around it owns the
run (data, checkpoints, logging, DDP). Shape letters: B rows, T segment length, V vocabulary.
"""

from __future__ import annotations

import torch

from longmem.loss import next_token_loss  # the loss forward(labels=...) uses; streams give aligned targets
from longmem.memory import MemoryBank
from longmem.runtime import autocast
from longmem.training.streams import StreamBatch

__all__ = ["next_token_loss", "train_step"]


def train_step(run: torch.nn.Module, batch: StreamBatch, memory: MemoryBank, optimizer: torch.optim.Optimizer,
               scheduler, device: torch.device, *, grad_clip: float, precision: str) -> torch.Tensor:
    """One optimizer step on `batch`; returns the (detached) mean loss over its targets.

    `run` is the model (or its DDP wrapper). Rows that start a new document get an empty
    memory first; the segment retrieves from the memory and is then written into it. The
    gradient norm is clipped to `grad_clip` (0: no clipping); `precision` ("bf16", "fp32") is the
    autocast of the forward (`longmem.runtime.autocast`).
    """
    x, y, mask = batch.input_ids.to(device), batch.labels.to(device), batch.attention_mask.to(device)
    memory.reset(rows=batch.new_document.nonzero().flatten().tolist())
    with autocast(device, precision):
        out = run(x, memory=memory, attention_mask=mask)
        loss = next_token_loss(out.logits, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    scheduler.step()
    return loss.detach()
