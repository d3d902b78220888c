"""An auxiliary training loss for the memory layer's queries: rank the chunks that hold the next token first.

The language-model loss reaches the memory-augmented layer's queries only through the memory
attention over the chunks already retrieved: which chunks a query retrieves (a top-k) gets no
gradient. This loss gives the ranking a direct signal. Each query searches `candidates` chunks
(more than the k it attends); the candidates holding the query's next token are its positives,
and the loss is the softmax cross-entropy of the positives' share among the candidates,

    loss_q = logsumexp(s_c over all candidates c) - logsumexp(s_c over positive c),
    s_c = <q, chunk key c> / sqrt(D),

averaged over the queries that have both a positive and a negative candidate (and a target).
The gradient moves each query toward its positive chunks' search keys and away from the others,
so positives just outside the top k move into it. The memory (the frozen backbone's keys) gets
no gradient. Weighted into the training loss by `TrainConfig.retrieval_loss_weight` (0: off).

Shapes: B rows, Hkv key/value heads, G query heads per kv head, T tokens, Q = G*T queries per kv
head, K candidates, C chunk size, D head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from longmem.loss import IGNORE_INDEX

if TYPE_CHECKING:
    from longmem.memory import MemoryBank, Retrieval


@dataclass
class RetrievalSupervision:
    """What `forward(retrieval_supervision=...)` needs for the auxiliary retrieval loss, and where it leaves it."""
    targets: torch.Tensor
    """(B, T) the next token after each position (aligned with the logits; IGNORE_INDEX: none)."""
    candidates: int = 64
    """Chunks each query searches for the loss; the first `topk_chunks` of them are the ones it attends."""
    through_lower_layers: bool = False
    """The loss's gradient reaches only the memory layer's query projection (and its input norm; the default), or also
    the SideNet layers below it (True: measured to make the SideNet worse without memory, README)."""
    loss: torch.Tensor | None = None
    """Set by the forward: the loss (a scalar), zero when no query had a positive and a negative candidate."""
    queries: int = 0
    """Set by the forward: how many queries the loss averaged over."""


def retrieval_loss(queries: torch.Tensor, memory: "MemoryBank", found: "Retrieval",
                   targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """queries (B, Hkv, G*T, D) with their gradient, found (B, Hkv, G*T, K) the candidates searched for them,
    targets (B, T) -> (the mean loss over the usable queries, their number). Query i of a kv head is token i % T
    (the model's layout: query head j*G + g, token t at index g*T + t)."""
    B, Hkv, Q, D = queries.shape
    K = found.slots.shape[-1]
    T = targets.shape[1]
    slots = found.slots.to(memory.device)                                       # (B, Hkv, Q, K)
    keys = memory.search_keys(memory.slots_in_use)                               # (B, Hkv, S, D)
    cand = keys.gather(2, slots.reshape(B, Hkv, Q * K, 1).expand(-1, -1, -1, D))
    cand = cand.view(B, Hkv, Q, K, D).to(queries.device)                         # the candidates' search keys
    with torch.autocast(queries.device.type, enabled=False):  # float32 scores, also under a bf16 autocast
        scores = torch.einsum("bhqd,bhqkd->bhqk", queries.float(), cand.float()) / math.sqrt(D)  # (B, Hkv, Q, K)
    held = torch.stack([memory.chunk_token_ids(b, slots[b]) for b in range(B)]).to(queries.device)  # (B, Hkv, Q, K, C)
    target = targets.to(queries.device).repeat(1, Q // T).view(B, 1, Q, 1, 1)  # (B, 1, Q, 1, 1) token i % T
    valid = found.valid.to(queries.device)
    positive = (held == target).any(-1) & valid                                 # (B, Hkv, Q, K)
    usable = positive.any(-1) & (valid & ~positive).any(-1) & (target.view(B, 1, Q) != IGNORE_INDEX)
    n = int(usable.sum())
    if n == 0:
        return scores.sum() * 0.0, 0  # keeps the graph (and DDP's view of the parameters) whole
    all_ = scores.masked_fill(~valid, float("-inf")).logsumexp(-1)             # (B, Hkv, Q)
    pos = scores.masked_fill(~positive, float("-inf")).logsumexp(-1)
    return (all_ - pos)[usable].mean(), n
