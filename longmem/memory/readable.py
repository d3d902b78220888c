"""Retrieval you can read: which stored chunks a token's query heads read, by stream position and as text.

`read_chunks(retrieval, memory, groups, token=t)` turns the `Retrieval` of a forward (or of a
decoder's newest position) into the chunks token t read, merged over its query heads; and
`describe_reads` into one line: "token t read chunks at stream positions p1, p2, ... (text ...)".
Text needs the chunks' token ids, which `write(..., token_ids=)` stores (forward and memorize
pass them); chunks written without them show no text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from longmem.memory.bank import NO_TOKEN
from longmem.memory.retrieval import Retrieval

if TYPE_CHECKING:
    from longmem.memory.bank import MemoryBank


@dataclass
class ReadChunk:
    """One stored chunk a token read."""
    position: int          # stream position of the chunk's first token (as in `MemoryBank.chunk_positions`)
    heads: int             # how many of the token's query heads retrieved it
    score: float           # its best inner product with those heads' queries
    token_ids: list[int]   # the chunk's tokens (empty when not recorded)


def read_chunks(retrieval: Retrieval, memory: "MemoryBank", groups: int, token: int = -1, row: int = 0,
                top: int | None = None) -> list[ReadChunk]:
    """The chunks token `token` (of the T the retrieval covers; negative counts from the end) of `row` read, over
    all its query heads: the most-read first (ties: higher score first), at most `top`.

    `groups` = query heads per key/value head (model.adapter.num_heads // memory.spec.num_kv_heads): a retrieval's
    Q = groups*T queries per kv head hold query head h's token t at (h % groups)*T + t. Call it before the memory
    is written again (a later write may overwrite the slots)."""
    B, Hkv, Q, k = retrieval.slots.shape
    T = Q // groups
    assert T * groups == Q, (Q, groups)
    t = token % T
    idx = torch.arange(groups) * T + t                       # (G,) this token's queries in each kv head
    slots = retrieval.slots[row][:, idx].flatten().cpu()     # (Hkv*G*k,)
    valid = retrieval.valid[row][:, idx].flatten().cpu()
    scores = retrieval.scores[row][:, idx].flatten().float().cpu()
    heads = torch.arange(Hkv * groups).repeat_interleave(k)  # query head of each entry
    found: dict[int, tuple[set, float]] = {}
    for s, ok, sc, h in zip(slots.tolist(), valid.tolist(), scores.tolist(), heads.tolist()):
        if ok:
            hs, best = found.get(s, (set(), float("-inf")))
            found[s] = (hs | {h}, max(best, sc))
    order = sorted(found, key=lambda s: (-len(found[s][0]), -found[s][1]))[:top]
    if not order:
        return []
    chosen = torch.tensor(order)
    positions = memory.slot_positions(row, chosen).tolist()
    ids = memory.chunk_token_ids(row, chosen).tolist()      # (n, C)
    return [ReadChunk(p, len(found[s][0]), found[s][1], [i for i in tids if i != NO_TOKEN])
            for s, p, tids in zip(order, positions, ids)]


def describe_reads(chunks: list[ReadChunk], token: int, decode: Callable[[list[int]], str] | None = None) -> str:
    """One line: "token {token} read chunks at stream positions p1, p2, ... (text |...| |...|)"; `decode`
    (e.g. tokenizer.decode) turns token ids into text."""
    if not chunks:
        return f"token {token} read no memory"
    line = f"token {token} read chunks at stream positions {', '.join(str(c.position) for c in chunks)}"
    if decode is not None and any(c.token_ids for c in chunks):
        line += " (text " + " ".join(repr(decode(c.token_ids)) for c in chunks) + ")"
    return line
