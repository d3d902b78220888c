"""The long-term memory: a per-row chunked FIFO bank and its retrieval backends."""

from longmem.memory.bank import MemoryBank, MemorySpec
from longmem.memory.retrieval import ExactRetriever, Retriever, SearchResult

__all__ = ["MemoryBank", "MemorySpec", "ExactRetriever", "Retriever", "SearchResult"]
