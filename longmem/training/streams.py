"""Data order: Transformer-XL streams for adaptation training (docs/method.md, "Training data
order") and random windows for backbone pretraining. Both are deterministic for a seed and
resume exactly.

Shape letters: B = rows (streams) per rank, T = segment length.

StreamBatcher: documents of the epoch (shuffled by seed + epoch, every `world_size`-th
one for this rank) form a queue. Each row reads one document at a time, T targets per
step; a document [bos, t1 .. tn, eos] gives n+1 (input, target) pairs. When a row's
document ends mid-segment the rest of the row is padding, and the row takes the next
document from the queue at the next step (`new_document` set: reset its memory). Rows
never mix documents, and each step's segment continues the row's previous one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from longmem.errors import LongMemError
from longmem.loss import IGNORE_INDEX
from longmem.training.tokens import TokenizedCorpus


@dataclass
class StreamBatch:
    input_ids: torch.Tensor  # (B, T) long, padding = eos id
    labels: torch.Tensor  # (B, T) long, next-token targets, IGNORE_INDEX where none
    attention_mask: torch.Tensor  # (B, T) long, 1 on real tokens
    new_document: torch.Tensor  # (B,) bool, row starts a new document: reset its memory
    doc_index: torch.Tensor  # (B,) long, corpus index of the row's document, -1 if none

    @property
    def num_targets(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


class StreamBatcher:
    """Iterator of `StreamBatch`es over a corpus.

    loop=True: endless, epoch e+1's queue follows epoch e's (training).
    loop=False: one pass, stops once every document of this rank has been read (eval).
    """

    def __init__(self, corpus: TokenizedCorpus, batch_size: int, seq_len: int, seed: int = 0,
                 shuffle: bool = True, loop: bool = True, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.corpus, self.batch_size, self.seq_len = corpus, batch_size, seq_len
        self.seed, self.shuffle, self.loop, self.rank, self.world_size = seed, shuffle, loop, rank, world_size
        self.epoch = 0  # epoch of the queue
        self.next = 0  # position in this epoch's queue
        self.row_doc = [-1] * batch_size  # document each row is reading, -1 = needs one
        self.row_pos = [0] * batch_size  # index in that document of the row's next input token
        self._queue = self._epoch_queue(0)

    def _epoch_queue(self, epoch: int) -> np.ndarray:
        """Document indices this rank reads in `epoch`."""
        order = np.arange(len(self.corpus))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(order)
        return order[self.rank :: self.world_size]

    def _pop(self) -> int:
        """Next document of the queue, or -1 when a non-looping pass is exhausted."""
        if self.next >= len(self._queue):
            if not self.loop or len(self.corpus) < self.world_size:
                return -1
            self.epoch, self.next = self.epoch + 1, 0
            self._queue = self._epoch_queue(self.epoch)
        self.next += 1
        return int(self._queue[self.next - 1])

    def __iter__(self) -> "StreamBatcher":
        return self

    def __next__(self) -> StreamBatch:
        B, T = self.batch_size, self.seq_len
        input_ids = torch.full((B, T), self.corpus.eos_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        new_doc = torch.zeros(B, dtype=torch.bool)
        for j in range(B):
            if self.row_doc[j] < 0:
                self.row_doc[j], self.row_pos[j] = self._pop(), 0
                new_doc[j] = self.row_doc[j] >= 0
        doc_index = torch.tensor(self.row_doc, dtype=torch.long)
        if (doc_index < 0).all():
            raise StopIteration
        for j in range(B):
            if self.row_doc[j] < 0:
                continue
            doc, p = self.corpus.document(self.row_doc[j]), self.row_pos[j]
            n = min(T, len(doc) - 1 - p)  # (input, target) pairs left in the document, at most T
            seg = torch.from_numpy(doc[p : p + n + 1].astype(np.int64))  # (n+1,)
            input_ids[j, :n], labels[j, :n], mask[j, :n] = seg[:-1], seg[1:], 1
            self.row_pos[j] = p + n
            if self.row_pos[j] == len(doc) - 1:
                self.row_doc[j] = -1
        return StreamBatch(input_ids, labels, mask, new_doc, doc_index)

    def state_dict(self) -> dict:
        """JSON-serialisable position; `load_state_dict` continues with the same batches."""
        return {"seed": self.seed, "shuffle": self.shuffle, "rank": self.rank, "world_size": self.world_size,
                "batch_size": self.batch_size, "seq_len": self.seq_len, "num_documents": len(self.corpus),
                "epoch": self.epoch, "next": self.next, "row_doc": list(self.row_doc), "row_pos": list(self.row_pos)}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "shuffle", "rank", "world_size", "batch_size", "seq_len", "num_documents"):
            mine = len(self.corpus) if key == "num_documents" else getattr(self, key)
            if state.get(key) != mine:
                raise LongMemError(f"the checkpoint's data order has {key}={state.get(key)} but this run has {mine}; "
                                   f"resume with the same data and settings, or start a new run")
        self.epoch, self.next = state["epoch"], state["next"]
        self.row_doc, self.row_pos = list(state["row_doc"]), list(state["row_pos"])
        self._queue = self._epoch_queue(self.epoch)


class RandomWindows:
    """Random contiguous windows of T+1 tokens from a flat token array (pretraining).

    Batch `index` depends only on (seed, rank, index), so resuming needs only the index.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0):
        if len(tokens) < seq_len + 1:
            raise LongMemError(f"the training data has {len(tokens)} tokens, fewer than one window of "
                               f"seq_len+1={seq_len + 1}; add data or lower --seq-len")
        self.tokens, self.seq_len, self.batch_size, self.seed, self.rank = tokens, seq_len, batch_size, seed, rank

    def batch(self, index: int) -> torch.Tensor:
        """(B, T+1) long: inputs are [:, :-1], targets [:, 1:]."""
        rng = np.random.default_rng([self.seed, self.rank, index])
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)  # (B,)
        idx = starts[:, None] + np.arange(self.seq_len + 1)  # (B, T+1)
        return torch.from_numpy(self.tokens[idx].astype(np.int64))
