"""Retrieval backends: which memory chunks each query attends to.

A backend answers `search(bank, queries, k)`: for every query vector, the slots of the k
chunks whose search key (mean of the chunk's token keys) has the largest inner product with
it, per key/value head and per batch row. `ExactRetriever` (torch matmul + top-k) is the
reference every approximate backend is tested against.

Shapes: B rows, Hkv key/value heads, Q queries per head, S chunk slots in use, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from longmem.memory.bank import MemoryBank


@dataclass
class Retrieval:
    """The chunks found for each query: what `search` returns and `LongMemOutput.retrieval` reports.

    Every field is (B, Hkv, Q, k). In the model's output Q = G*T (G query heads per key/value
    head, T tokens): query head h searches kv head h // G, and its token t is at index (h % G)*T + t.
    """
    slots: torch.Tensor   # (B, Hkv, Q, k) int64 chunk slots in the bank
    valid: torch.Tensor   # (B, Hkv, Q, k) bool: False where the row holds fewer than k chunks
    scores: torch.Tensor  # (B, Hkv, Q, k) inner products (-inf where not valid)


class Retriever(Protocol):
    def search(self, bank: "MemoryBank", queries: torch.Tensor, k: int) -> Retrieval: ...


class ExactRetriever:
    """Brute-force inner-product search over every stored chunk; blocked to bound memory.

    Scores are computed in the memory's storage dtype (float16 is upcast on CPU, where it
    has no fast matmul). With a float32 memory the result is exactly the brute-force top-k;
    with bfloat16 (the default) near-ties can be ordered differently than in float32.
    """

    def __init__(self, max_scores: int = 1 << 25):
        self.max_scores = max_scores  # score elements materialised at once

    def search(self, bank: "MemoryBank", queries: torch.Tensor, k: int) -> Retrieval:
        B, Hkv, Q, D = queries.shape
        S = bank.slots_in_use
        assert k <= S, (k, S)
        keys = bank.chunk_keys[:, :, :S]  # (B, Hkv, S, D)
        dtype = torch.float32 if keys.dtype == torch.float16 and keys.device.type == "cpu" else keys.dtype
        keys = keys.to(dtype).transpose(-1, -2)  # (B, Hkv, D, S)
        # slots past a row's chunk count hold nothing (rows fill at different rates)
        empty = torch.arange(S, device=keys.device) >= bank.num_chunks[:, None]  # (B, S)
        empty = empty[:, None, None, :] if bool(empty.any()) else None           # (B, 1, 1, S)
        block = max(1, self.max_scores // max(1, B * Hkv * S))
        out_scores, out_slots = [], []
        for start in range(0, Q, block):
            s = queries[:, :, start:start + block].to(dtype) @ keys  # (B, Hkv, q, S), in the storage dtype
            if empty is not None:
                s.masked_fill_(empty, float("-inf"))
            top = s.topk(k, dim=-1)
            out_scores.append(top.values)
            out_slots.append(top.indices)
        scores = torch.cat(out_scores, dim=2)  # (B, Hkv, Q, k)
        return Retrieval(torch.cat(out_slots, dim=2), torch.isfinite(scores), scores)
