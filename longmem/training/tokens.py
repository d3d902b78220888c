"""Tokenised corpora: one flat token array per split, cached on disk.

Layout of the flat array for documents d0, d1, ... (E = the tokenizer's eos id, which
also serves as bos):

    tokens  = [E] d0 [E] d1 [E] ... [E] dN [E]
    offsets = [o0, o1, ..., oN, o_end]   # o_i: index of the E that opens document i

`corpus.document(i)` = tokens[o_i : o_{i+1} + 1] = [E, text tokens..., E], so every text
token and the closing E of a document have a predecessor inside the document and can be
a training target. The cache is `{name}.tokens.npy`, `{name}.offsets.npy` (np.save,
never pickled) and a `{name}.json` header naming the tokenizer and document fingerprints;
a different tokenizer or different documents invalidate it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from longmem.errors import LongMemError
from longmem.io import atomic_path, read_json, write_json

FORMAT = 1


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's `tokenizer.json` serialisation (a fast tokenizer)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def documents_fingerprint(documents: Sequence) -> str:
    """sha256 over every document's id and text, in order."""
    h = hashlib.sha256()
    for doc in documents:
        for part in (doc.id, doc.text):
            data = part.encode()
            h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


@dataclass
class TokenizedCorpus:
    tokens: np.ndarray  # (N,) uint16 (vocab <= 65536) or int32
    offsets: np.ndarray  # (D+1,) int64, see the module docstring
    doc_ids: list[str]
    eos_id: int

    def __len__(self) -> int:
        return len(self.doc_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def document(self, i: int) -> np.ndarray:
        """Document i as [eos, text tokens..., eos]."""
        return self.tokens[self.offsets[i] : self.offsets[i + 1] + 1]

    def document_lengths(self) -> np.ndarray:
        """(D,) number of predictable tokens per document (text tokens + closing eos)."""
        return np.diff(self.offsets)

    @classmethod
    def build(cls, documents: Sequence, tokenizer, batch_size: int = 64, desc: str = "tokenize") -> "TokenizedCorpus":
        """Tokenise `documents` (objects with `.id` and `.text`) with a fast tokenizer."""
        eos = tokenizer.eos_token_id
        if eos is None:
            raise LongMemError("the tokenizer has no eos token; set `eos_token` in its tokenizer_config.json")
        vocab = len(tokenizer)
        dtype = np.uint16 if vocab <= 2**16 else np.int32
        pieces, lengths = [np.array([eos], dtype=dtype)], []
        backend = tokenizer.backend_tokenizer
        with tqdm(total=sum(len(d.text) for d in documents), desc=desc, unit="char", unit_scale=True) as bar:
            for start in range(0, len(documents), batch_size):
                batch = documents[start : start + batch_size]
                for enc in backend.encode_batch([d.text for d in batch], add_special_tokens=False):
                    ids = np.asarray(enc.ids + [eos], dtype=dtype)
                    pieces.append(ids)
                    lengths.append(len(ids))
                bar.update(sum(len(d.text) for d in batch))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # (D+1,)
        return cls(np.concatenate(pieces), offsets, [d.id for d in documents], eos)

    @classmethod
    def cached(cls, documents: Sequence, tokenizer, cache_dir: str | Path, name: str) -> "TokenizedCorpus":
        """Load `{cache_dir}/{name}.*` if it matches the tokenizer and documents, else build and save it."""
        cache_dir = Path(cache_dir)
        header_path = cache_dir / f"{name}.json"
        header = {
            "format": FORMAT,
            "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
            "documents_sha256": documents_fingerprint(documents),
            "doc_ids": [d.id for d in documents],
        }
        if header_path.is_file():
            try:
                old = read_json(header_path, "token cache header")
            except LongMemError:
                old = None
            if old is not None and {k: old.get(k) for k in header} == header:
                corpus = cls.load(cache_dir, name)
                if corpus is not None:
                    return corpus
        corpus = cls.build(documents, tokenizer, desc=f"tokenize {name}")
        for suffix, array in (("tokens", corpus.tokens), ("offsets", corpus.offsets)):
            with atomic_path(cache_dir / f"{name}.{suffix}.npy") as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, array, allow_pickle=False)
        write_json(header_path, {**header, "eos_id": corpus.eos_id, "num_tokens": corpus.num_tokens})
        return corpus

    @classmethod
    def load(cls, cache_dir: str | Path, name: str) -> "TokenizedCorpus | None":
        """The cached corpus, or None if its files are missing or inconsistent."""
        cache_dir = Path(cache_dir)
        try:
            header = read_json(cache_dir / f"{name}.json", "token cache header")
            tokens = np.load(cache_dir / f"{name}.tokens.npy", allow_pickle=False, mmap_mode="r")
            offsets = np.load(cache_dir / f"{name}.offsets.npy", allow_pickle=False)
        except (LongMemError, OSError, ValueError):
            return None
        if len(offsets) != len(header["doc_ids"]) + 1 or (len(offsets) and offsets[-1] + 1 != len(tokens)):
            return None
        return cls(tokens, offsets, header["doc_ids"], header["eos_id"])
