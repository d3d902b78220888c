"""The one next-token loss, used by `LongMemForCausalLM.forward(labels=...)` and by training.

Two ways to give the targets, one function:

- `labels` (B, T), unshifted, as in HuggingFace: `labels[:, t]` is the token at position t, so
  position t is scored against `labels[:, t + 1]` and the last position against nothing (the shift
  happens inside, `shift_labels`). This is what `forward(labels=...)` takes; `labels=input_ids`
  scores every next token of the segment.
- targets (B, T) already aligned with the logits: `targets[:, t]` is the token after position t.
  Training streams give these (`StreamBatch.labels`), because a segment's last target is the first
  token of the next segment, which unshifted labels cannot hold.

Either way the loss is the mean cross-entropy over targets that are not IGNORE_INDEX, in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Unshifted labels (B, T) -> aligned targets (B, T): labels[:, 1:] then one IGNORE_INDEX column."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """logits (B, T, V) against aligned targets (B, T) (IGNORE_INDEX skipped); reduction as in F.cross_entropy."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction=reduction)
