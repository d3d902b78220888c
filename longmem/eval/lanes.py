"""Scoring many document pieces as one batch (continuous batching), one piece per lane.

A piece is a run of whole segments of one document, [start, end) in its inputs (start a multiple
of the segment length). A lane takes the next piece from the queue as soon as its current one
ends: every scorer is told (`Scorer.start`) what came before the piece in its document (the
memory reads it, keeping only what it would hold; the sliding window keeps its last tokens), and
each step scores one segment of every lane in one batch, running the frozen backbone once for all
scorers (`scoring.Segment`). A lane that takes the next piece of the document it just scored tells
the scorers so, and the memory keeps what it holds instead of reading the document again.
Because a piece's scores depend only on
its document, a long document can be split into pieces that run side by side, and the numbers
equal scoring the whole document in order (`scoring.score_document`).

Shapes: B lanes, T segment length, V vocabulary.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from longmem.eval.scoring import Scorer, Segment, target_logprobs


@dataclass
class Piece:
    key: str            # where its result is stored
    ids: torch.Tensor   # (N,) the whole document
    start: int          # first input of the piece (a multiple of T)
    end: int            # inputs [start, end) are the piece's; its targets are start+1 .. min(end, N-1)

    @property
    def targets(self) -> int:
        return max(0, min(self.end, len(self.ids) - 1) - self.start)


def split_document(key: str, ids: torch.Tensor, piece_tokens: int, segment_length: int) -> list[Piece]:
    """Pieces of at most `piece_tokens` inputs (a multiple of the segment length) covering every target once."""
    assert piece_tokens % segment_length == 0, (piece_tokens, segment_length)
    last = len(ids) - 1  # inputs that have a target
    return [Piece(f"{key}@{s}", ids, s, min(s + piece_tokens, last)) for s in range(0, last, piece_tokens)]


@torch.no_grad()
def score_pieces(scorers: list[Scorer], pieces: list[Piece], done: Callable[[Piece, dict[str, torch.Tensor]], None],
                 step: Callable[[int], None] = lambda n: None) -> None:
    """Score every piece with every scorer (all built for the same number of lanes).

    done(piece, {scorer name: (targets,) log-probs in order}) is called as each piece finishes;
    step(n) after every batch step with the number of targets it scored (for a progress bar).
    """
    lanes = scorers[0].lanes
    model = scorers[0].model
    T, dev = model.config.segment_length, model.device
    queue, active, pos = deque(pieces), [None] * lanes, [0] * lanes
    last: list[Piece | None] = [None] * lanes  # the piece each lane finished last
    scores: list[dict[str, list[torch.Tensor]]] = [{} for _ in range(lanes)]
    while True:
        for b in range(lanes):
            if active[b] is None and queue:
                p = active[b] = queue.popleft()
                pos[b], scores[b] = p.start, {sc.name: [] for sc in scorers}
                continued = last[b] is not None and last[b].ids is p.ids and last[b].end == p.start
                for sc in scorers:
                    sc.start(b, p.ids[:p.start], continued=continued)
        if all(p is None for p in active):
            return
        x = torch.zeros(lanes, T, dtype=torch.long)       # (B, T) right-padded inputs
        y = torch.zeros(lanes, T, dtype=torch.long)       # (B, T) their targets
        mask = torch.zeros(lanes, T, dtype=torch.long)    # (B, T) 1 on real inputs
        n = [0] * lanes                                   # targets per lane this step
        for b, p in enumerate(active):
            if p is None:
                continue
            s = pos[b]
            inputs, targets = p.ids[s:s + T], p.ids[s + 1:min(s + T, p.end) + 1]
            x[b, :len(inputs)], mask[b, :len(inputs)] = inputs, 1
            n[b] = len(targets)
            y[b, :n[b]] = targets
        segment = Segment(model, x.to(dev), mask.to(dev))
        y = y.to(dev)
        for sc in scorers:
            lp = target_logprobs(sc.logits(segment), y).cpu()  # (B, T)
            for b in range(lanes):
                if n[b]:
                    scores[b][sc.name].append(lp[b, :n[b]])
        for b, p in enumerate(active):
            if p is None:
                continue
            pos[b] += T
            if pos[b] >= p.end:
                done(p, {name: torch.cat(parts) for name, parts in scores[b].items()})
                active[b], last[b] = None, p
        step(sum(n))
