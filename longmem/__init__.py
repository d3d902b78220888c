"""longmem: long-term memory for pretrained causal language models (LongMem, NeurIPS 2023).

    from longmem import LongMemConfig, LongMemForCausalLM, MemoryBank
    from longmem import ChatSession, GenerationOptions, load_tokenizer
"""

__version__ = "0.1.0"

_EXPORTS = {
    "LongMemConfig": "longmem.config",
    "LongMemForCausalLM": "longmem.model",
    "LongMemOutput": "longmem.model",
    "MemoryBank": "longmem.memory",
    "MemorySpec": "longmem.memory",
    "LongMemError": "longmem.errors",
    "GenerationOptions": "longmem.generation",
    "ChatSession": "longmem.chat",
    "load_tokenizer": "longmem.runtime",
}


def __getattr__(name):  # lazy: `import longmem` stays light (no torch/transformers until used)
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'longmem' has no attribute {name!r}")


__all__ = list(_EXPORTS)
