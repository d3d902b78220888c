"""Scored tokens bucketed by how far back the same token (or word) last occurred in the document.

This is what says whether a memory reaches far: a token whose previous occurrence lies in its
own local segment can be copied by any model; one last seen 8k tokens back can only come from a
memory (or a window that long). For the target at document position j, predicted from the
segment whose inputs start at s = (j-1) // T * T, with its previous occurrence at i < j:

    local    i >= s               (in the local segment every row sees)
    <2k      i < s, j - i < 2048   (an earlier segment, under 2k tokens back: mostly 512-2k)
    2k-8k, 8k-32k, 32k+            by j - i
    never    no earlier occurrence in the document

Views: "token" (the same token id) and "word" (the same word: a run of tokens without
whitespace or punctuation between them, compared by its characters; every token of a word gets
the word's bucket, measured from the start of the previous occurrence).
"""

from __future__ import annotations

import numpy as np

BUCKETS = ("local", "<2k", "2k-8k", "8k-32k", "32k+", "never")
EDGES = (2048, 8192, 32768)  # distance bounds between "<2k", "2k-8k", "8k-32k" and "32k+"
VIEWS = ("token", "word")


def previous_occurrence(keys) -> np.ndarray:
    """(N,) keys -> (N,) index of the previous equal key, -1 where there is none."""
    last: dict = {}
    out = np.full(len(keys), -1, dtype=np.int64)
    for i, k in enumerate(keys):
        out[i] = last.get(k, -1)
        last[k] = i
    return out


def bucket_targets(prev: np.ndarray, segment_length: int) -> np.ndarray:
    """prev (N,): previous-occurrence position per document position (-1: none) -> (N-1,) bucket index of
    the targets 1..N-1 (an index into BUCKETS)."""
    j = np.arange(1, len(prev))
    i = prev[1:]
    seg_start = (j - 1) // segment_length * segment_length
    far = 1 + np.searchsorted(np.array(EDGES), j - i, side="right")  # 1: <2k ... 4: 32k+
    return np.where(i < 0, BUCKETS.index("never"), np.where(i >= seg_start, BUCKETS.index("local"), far))


def word_starts(token_texts: list[str]) -> np.ndarray:
    """(N,) bool: does token k start a new word? It does after whitespace or punctuation, at whitespace or
    punctuation, and at the first token."""
    def word_char(c: str) -> bool:
        return c.isalnum() or c in "'’"

    out = np.ones(len(token_texts), dtype=bool)
    for k in range(1, len(token_texts)):
        t, before = token_texts[k], token_texts[k - 1]
        out[k] = not (t[:1] and word_char(t[0]) and before[-1:] and word_char(before[-1]))
    return out


def word_previous(token_texts: list[str]) -> np.ndarray:
    """(N,) position of the first token of the previous occurrence of each token's word (-1: none)."""
    starts = np.flatnonzero(word_starts(token_texts))          # (W,) first token of each word
    bounds = np.append(starts, len(token_texts))
    words = ["".join(token_texts[a:b]).strip() for a, b in zip(bounds[:-1], bounds[1:])]
    prev_word = previous_occurrence(words)                      # (W,) word index, -1: none
    prev_start = np.where(prev_word >= 0, starts[np.maximum(prev_word, 0)], -1)  # (W,)
    return np.repeat(prev_start, np.diff(bounds))               # every token of a word gets the word's


def distance_buckets(ids: list[int], token_texts: list[str], segment_length: int) -> dict[str, np.ndarray]:
    """{view: (N-1,) bucket index of each target} for a document of token ids and their texts."""
    return {"token": bucket_targets(previous_occurrence(ids), segment_length),
            "word": bucket_targets(word_previous(token_texts), segment_length)}
