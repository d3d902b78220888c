"""Scoring long documents segment by segment: every token is predicted exactly once.

A document of N tokens is cut into consecutive segments of T = segment_length inputs; the
segment starting at s reads inputs ids[s : s+T] and predicts targets ids[s+1 : s+T+1], so
every token but the first is scored once, always from its own segment's local context. The
scorers differ only in what else the prediction may see:

- `BackboneScorer`: the frozen backbone alone on the local segment;
- `LocalScorer`: LongMem with its memory disabled;
- `MemoryScorer`: LongMem with a memory holding every earlier segment (written after the
  segment is scored, so no token is ever predicted with itself in memory).

Scorers work on `lanes` rows at once, one document (or document piece) per lane: `start(lane,
prefix)` begins a lane's next piece after the document's tokens `prefix`, and `logits(segment)`
scores one segment of every lane: its inputs right-padded (B, T) with a mask 1 on real tokens.
Right padding never changes a real token's prediction (attention is causal and the memory skips
padding). The backbone, the LongMem rows and the sliding window all run the same frozen backbone
on the same segment: `Segment` runs it once, on first use, and every scorer of the step reuses
it (`model.backbone_forward`), with the numbers each would get running it alone.
`score_document` is the one-document reference path; `longmem.eval.lanes` drives many lanes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from longmem.model import BackbonePass


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits (B, T, V), targets (B, T) -> log p(target) (B, T) in float32: logit minus logsumexp over the
    vocabulary. The logsumexp is torch.logsumexp's own computation (max, masked where infinite; exp of the
    shifted logits, summed, logged, plus the max), done in place on one float32 copy: the same bits, about 3x
    faster on a CPU than torch.logsumexp, which allocates the shifted logits anew (and much faster than
    cross_entropy on the transposed logits)."""
    x = logits.to(torch.float32, copy=True)                      # (B, T, V), overwritten below
    picked = x.gather(-1, targets[..., None])[..., 0]             # (B, T)
    top = x.amax(-1, keepdim=True)                                # (B, T, 1)
    top.masked_fill_(top.abs() == float("inf"), 0)
    return picked - x.sub_(top).exp_().sum(-1).log_().add_(top[..., 0])


class Segment:
    """One scoring step: inputs x (B, T), right-padded, and mask (B, T), 1 on real tokens; and what its scorers
    share, computed on first use: the frozen backbone's pass over x and the backbone's own logits."""

    def __init__(self, model, x: torch.Tensor, mask: torch.Tensor):
        self.model, self.x, self.mask = model, x, mask

    @functools.cached_property
    def backbone(self) -> "BackbonePass":
        return self.model.backbone_forward(self.x, self.mask)

    @functools.cached_property
    def backbone_logits(self) -> torch.Tensor:  # (B, T, V)
        return self.model.backbone_logits(self.backbone)


class Scorer:
    name = "scorer"

    def __init__(self, model, lanes: int = 1):
        self.model, self.lanes = model, lanes

    def start(self, lane: int, prefix: torch.Tensor, show_progress: bool = False, continued: bool = False) -> None:
        """Lane `lane` begins a piece whose first segment follows `prefix` (P,), the document's earlier tokens.
        continued: the lane's previous piece ended where this one starts, in the same document (so what the
        scorer holds for the lane already follows `prefix`)."""

    def logits(self, segment: Segment) -> torch.Tensor:  # -> (B, T, V)
        raise NotImplementedError


class BackboneScorer(Scorer):
    name = "backbone"

    def logits(self, segment):
        return segment.backbone_logits


class LocalScorer(Scorer):
    name = "longmem_no_memory"

    def logits(self, segment):
        return self.model(segment.x, backbone_output=segment.backbone).logits


class MemoryScorer(Scorer):
    name = "longmem_memory"

    def __init__(self, model, memory_size: int | None = None, lanes: int = 1):
        super().__init__(model, lanes)
        self.memory = model.new_memory(lanes, memory_size=memory_size)

    def start(self, lane, prefix, show_progress=False, continued=False):
        from longmem.memory import MemoryBank

        if continued:  # the lane's memory has read everything before this piece already
            return
        fresh = self.model.new_memory(1, memory_size=self.memory.spec.capacity)
        if prefix.shape[0]:  # only the segments the memory keeps are read
            self.model.memorize(prefix.to(self.model.device)[None], fresh, show_progress=show_progress)
        rows = [fresh if b == lane else self.memory.select([b]) for b in range(self.lanes)]
        self.memory = MemoryBank.stack(rows) if self.lanes > 1 else fresh

    def logits(self, segment):  # retrieves, then writes the segment
        return self.model(segment.x, memory=self.memory, backbone_output=segment.backbone).logits

    def row_nbytes(self) -> int:
        """Storage of one lane's memory (every lane has the same, grown to the fullest's)."""
        return self.memory.nbytes() // self.lanes


@dataclass
class DocumentScore:
    logprobs: torch.Tensor  # (n,) log p of every scored target, in document order
    first_target: int       # document index of the first scored target

    @property
    def nll(self) -> float:
        return float(-self.logprobs.mean())


@torch.no_grad()
def score_document(scorer: Scorer, ids: torch.Tensor, score_from: int = 0, show_progress: bool = False) -> DocumentScore:
    """Score targets of the segments starting at or after `score_from` (rounded up to a segment), one lane.

    ids: (N,) token ids of one document. Earlier segments only prime the scorer (memorized).
    show_progress: bars that advance per segment (memorizing, then scoring), cleared when done.
    """
    T = scorer.model.config.segment_length
    N = ids.shape[0]
    first = -(-score_from // T) * T
    ids = ids.to(scorer.model.device)[None]  # (1, N)
    scorer.start(0, ids[0, :first], show_progress)
    out = []
    starts = range(first, N - 1, T)
    if show_progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc=f"score ({scorer.name})", unit="seg", leave=False)
    for s in starts:
        x, y = ids[:, s:s + T], ids[:, s + 1:s + T + 1]  # inputs (1, t), targets (1, t') with t' <= t
        lp = target_logprobs(scorer.logits(Segment(scorer.model, x, torch.ones_like(x)))[:, : y.shape[1]], y)
        out.append(lp[0].cpu())
    return DocumentScore(torch.cat(out) if out else torch.zeros(0), first + 1)


@dataclass
class ContinuationScores:
    logprobs: list[torch.Tensor]  # per continuation: (n_i,) log p of each of its tokens, float32 on CPU
    next_token: torch.Tensor      # (V,) log-probs of the token right after the context

    @property
    def sums(self) -> list[float]:
        return [float(lp.sum()) for lp in self.logprobs]

    @property
    def means(self) -> list[float]:
        return [float(lp.mean()) for lp in self.logprobs]


@torch.no_grad()
def score_continuations(model, context: list[int], continuations: list[list[int]], memory=None) -> ContinuationScores:
    """Log-likelihood of each continuation right after `context`, context + continuation in one forward pass.

    With a memory (one row): one pass per continuation with `update_memory=False`, so the memory
    is read, never written, and every continuation sees the same one. Without: all continuations
    in one right-padded batch (the padding comes after every scored token, so causal attention
    never sees it).
    """
    P = len(context)
    assert P >= 1 and continuations and all(continuations), "need a context and non-empty continuations"
    T = P + max(len(c) for c in continuations)
    assert T <= model.config.segment_length, (T, model.config.segment_length)
    dev = model.device
    if memory is None:
        rows = [context + c + [c[-1]] * (T - P - len(c)) for c in continuations]
        logits = model(torch.tensor(rows, device=dev)).logits  # (C, T, V)
        per_row = [logits[i:i + 1] for i in range(len(rows))]
    else:
        assert memory.batch_size == 1
        per_row = [model(torch.tensor([context + c], device=dev), memory=memory, update_memory=False).logits
                   for c in continuations]  # each (1, P + n_i, V)
    logprobs = []
    for lg, c in zip(per_row, continuations):
        y = torch.tensor([c], device=dev)                                       # (1, n)
        logprobs.append(target_logprobs(lg[:, P - 1:P - 1 + len(c)], y)[0].cpu())  # (n,)
    next_token = torch.log_softmax(per_row[0][0, P - 1].float(), dim=-1).cpu()  # (V,)
    return ContinuationScores(logprobs, next_token)
