"""`ServerConfig`: everything a deployment of `longmem serve` sets, with the limits it enforces."""

from __future__ import annotations

from dataclasses import dataclass

from longmem.config import parse_retriever
from longmem.errors import LongMemError


@dataclass
class ServerConfig:
    model: str = "default"
    """LongMem checkpoint folder, or 'default' (the shipped model)."""
    data_dir: str = "memories"
    """Folder of the named memories (created if missing); one subfolder per memory."""
    host: str = "127.0.0.1"
    """Interface to listen on; the default accepts connections from this machine only."""
    port: int = 8000
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    retriever: str = ""
    """Search backend of every memory the server loads or creates, optionally with settings ('faiss-ivf:nprobe=8');
    '' is the model's (`LongMemConfig.retriever`)."""
    precision: str = "bf16"
    """Compute precision of every forward (bf16 autocast, or fp32)."""
    max_loaded: int = 64
    """Memories kept in RAM; the least recently used one is dropped past this (its file is always current)."""
    max_batch: int = 16
    """Most generations run together in one forward."""
    batch_wait_ms: float = 2.0
    """How long the worker waits for more requests before starting a batch (when it was idle)."""
    max_body_bytes: int = 1 << 20
    """Largest JSON request body (bytes); a memory file upload may be as large as a full memory file."""
    max_prompt_tokens: int = 4096
    """Longest prompt (after the chat template), in tokens."""
    max_new_tokens: int = 512
    """Largest `max_new_tokens` / `max_tokens` a request may ask for."""
    max_append_tokens: int = 65536
    """Most tokens one append may add to a memory."""

    def validate(self) -> "ServerConfig":
        for name in ("port", "max_loaded", "max_batch", "max_body_bytes", "max_prompt_tokens", "max_new_tokens",
                     "max_append_tokens"):
            value = getattr(self, name)
            low = 0 if name == "port" else 1
            if not isinstance(value, int) or value < low or (name == "port" and value > 65535):
                raise LongMemError(f"server setting {name}={value!r} is out of range; give a whole number "
                                   f"{'0..65535' if name == 'port' else 'of at least 1'}")
        if not self.batch_wait_ms >= 0:
            raise LongMemError(f"server setting batch_wait_ms={self.batch_wait_ms!r} must be a number >= 0")
        if self.retriever:
            parse_retriever(self.retriever)  # a bad name or setting is a LongMemError
        if self.precision not in ("bf16", "fp32"):
            raise LongMemError(f"server setting precision={self.precision!r}; use bf16 or fp32")
        return self
