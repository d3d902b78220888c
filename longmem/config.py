"""`LongMemConfig`: everything that defines a LongMem model besides its backbone's weights.

Defaults follow the published configuration (the paper's 24-layer model, docs/method.md) scaled to the backbone's depth: a
24-layer backbone gets memory layer 17, a 12-layer SideNet and memory-augmented SideNet
layer 8, exactly as in the paper. Fields left as `None` are filled in by `resolve` once the
backbone's number of layers is known; a resolved config is saved next to every checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from longmem.errors import LongMemError
from longmem.runtime import CANONICAL_DTYPES

MEMORY_DTYPES = CANONICAL_DTYPES + ("int8",)  # the table of float dtype names lives in runtime
"""Storage dtypes a memory may use, by their `torch` attribute names (the one table: `MemoryBank` reads it too);
int8 is quantised with one scale per vector (longmem.memory.quant)."""

RETRIEVERS = {"exact": ("max_scores", "tile", "blocks", "query_block"),
              "faiss-ivf": ("nprobe", "nlist_scale", "min_chunks"),
              "faiss-hnsw": ("M", "ef_search", "min_chunks"),
              "torch-ivf": ("nprobe", "nlist_scale", "min_chunks")}
"""Retrieval backends by name, with the integer settings each takes (`longmem.memory.retrieval.make_retriever`
builds them; docs/retrieval.md says what the settings do)."""


def parse_retriever(spec: str) -> tuple[str, dict[str, int]]:
    """'faiss-ivf' or 'faiss-ivf:nprobe=8,min_chunks=512' -> (backend name, settings); a bad spec is a LongMemError."""
    name, _, rest = spec.partition(":")
    if name not in RETRIEVERS:
        raise LongMemError(f"retriever {spec!r}: {name!r} is not one of {', '.join(RETRIEVERS)}")
    settings = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if key not in RETRIEVERS[name] or not eq:
            raise LongMemError(f"retriever {spec!r}: {item!r} is not a setting of {name} (it takes "
                               f"{', '.join(k + '=N' for k in RETRIEVERS[name])})")
        if not value.isdigit() or int(value) < 1:
            raise LongMemError(f"retriever {spec!r}: {key} must be a whole number of at least 1, not {value!r}")
        settings[key] = int(value)
    return name, settings


@dataclass
class LongMemConfig:
    memory_layer: int | None = None
    """Backbone layer (0-based) whose attention keys/values are cached. Default: 17/24 of depth."""
    memory_size: int = 65536
    """Memory capacity in tokens per sequence (FIFO; a multiple of `chunk_size`)."""
    chunk_size: int = 4
    """Tokens per memory chunk; a chunk's search key is the mean of its token keys."""
    topk_tokens: int = 64
    """Memory tokens each query attends to: topk_tokens / chunk_size chunks per head."""
    sidenet_layers: int | None = None
    """SideNet depth. Default: half the backbone's layers (the most it can have)."""
    sidenet_memory_layer: int | None = None
    """SideNet layer holding the joint memory attention. Default: memory_layer // 2."""
    segment_length: int = 1024
    """Tokens per segment: the local context of one forward pass."""
    memory_dtype: str = "bfloat16"
    """Storage dtype of cached keys/values ("float16", "bfloat16", "float32", or "int8": quantised, about half
    the bytes of bfloat16)."""
    retriever: str = "exact"
    """Retrieval backend of new and loaded memories: "exact" (the reference), "faiss-ivf", "faiss-hnsw" (faiss
    installed) or "torch-ivf" (docs/retrieval.md)."""

    def resolve(self, num_layers: int) -> "LongMemConfig":
        """Fill `None` defaults for a backbone of `num_layers` blocks and validate every field."""
        L = num_layers
        memory_layer = (17 * L) // 24 if self.memory_layer is None else self.memory_layer
        sidenet_layers = L // 2 if self.sidenet_layers is None else self.sidenet_layers
        sidenet_memory_layer = memory_layer // 2 if self.sidenet_memory_layer is None else self.sidenet_memory_layer
        cfg = dataclasses.replace(self, memory_layer=memory_layer, sidenet_layers=sidenet_layers,
                                  sidenet_memory_layer=sidenet_memory_layer)
        if not 0 <= memory_layer < L:
            raise LongMemError(f"memory_layer={memory_layer} is outside the backbone's {L} layers; choose 0..{L - 1}")
        if not 1 <= sidenet_layers <= L // 2:
            raise LongMemError(f"sidenet_layers={sidenet_layers} must be between 1 and {L // 2} (half the backbone's {L} layers)")
        if not 0 <= sidenet_memory_layer < sidenet_layers:
            raise LongMemError(f"sidenet_memory_layer={sidenet_memory_layer} must be below sidenet_layers={sidenet_layers}; "
                               f"lower memory_layer or set sidenet_memory_layer explicitly")
        if self.chunk_size < 1 or self.memory_size < self.chunk_size or self.memory_size % self.chunk_size:
            raise LongMemError(f"memory_size={self.memory_size} must be a positive multiple of chunk_size={self.chunk_size}")
        if self.topk_tokens < self.chunk_size or self.topk_tokens % self.chunk_size:
            raise LongMemError(f"topk_tokens={self.topk_tokens} must be a positive multiple of chunk_size={self.chunk_size}")
        if self.segment_length < 2:
            raise LongMemError(f"segment_length={self.segment_length} must be at least 2")
        if self.memory_dtype not in MEMORY_DTYPES:
            raise LongMemError(f"memory_dtype={self.memory_dtype!r} is not one of {', '.join(MEMORY_DTYPES)}")
        parse_retriever(self.retriever)
        return cfg

    @property
    def topk_chunks(self) -> int:
        return self.topk_tokens // self.chunk_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LongMemConfig":
        """The inverse of `to_dict`; configs saved with the former, never read `extra` field (always {}) load too."""
        d = {k: v for k, v in d.items() if k != "extra"}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise LongMemError(f"unknown LongMemConfig field(s) {sorted(unknown)}; valid fields: {sorted(names)}")
        return cls(**d)
