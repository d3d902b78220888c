"""The long-term memory: a per-row chunked FIFO bank and its retrieval backends."""

from longmem.memory.bank import MemoryBank, MemorySpec, held_span
from longmem.memory.retrieval import ExactRetriever, Retrieval, Retriever, make_retriever

__all__ = ["MemoryBank", "MemorySpec", "held_span", "ExactRetriever", "Retriever", "Retrieval", "make_retriever"]
