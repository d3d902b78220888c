"""A conversation with long-term memory that lives in a file.

    session = ChatSession(model, tokenizer, "chat.safetensors")
    for piece in session.say("Hello, my name is Ada."):
        print(piece, end="", flush=True)

Each turn is laid out as `TEMPLATE` ("User: ...\nAssistant:") and is the model's whole local
context: everything said before reaches the model only through its memory. After the reply,
the turn (the user's text and the reply, as tokens) is written into the memory and the
memory is saved to its file, atomically (`MemoryBank.save`: a temporary file, fsynced, then
renamed over the old one), so a session killed at any moment leaves the previous or the new
memory, never a torn one. Only complete turns are kept: if the reply fails, is interrupted or
its consumer stops iterating, the session goes back to its file as it was before the turn.
A session opened on an existing file continues from it (a file written by `longmem memorize`,
a book say, works too).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from longmem.errors import LongMemError
from longmem.generation import GenerationOptions, decode_steps
from longmem.textstream import TextStream

TEMPLATE = "User: {text}\nAssistant:"
STOP_STRINGS = ("\nUser:",)  # the model starting the next user turn ends its reply
MAX_NEW_TOKENS = 128


def chat_options(model) -> GenerationOptions:
    """A chat's default options: the model's, with replies of at most MAX_NEW_TOKENS ending at STOP_STRINGS."""
    return model.generation_config.replace(max_new_tokens=MAX_NEW_TOKENS, stop_strings=list(STOP_STRINGS))


class ChatSession:
    """A conversation of `model` whose memory is kept in `memory_path` (created if absent) after every turn."""

    def __init__(self, model, tokenizer, memory_path: str | Path, options: GenerationOptions | None = None,
                 template: str = TEMPLATE, incremental: bool = True):
        if "{text}" not in template:
            raise LongMemError(f"the chat template {template!r} has no {{text}} for the user's words; add it")
        self.model, self.tokenizer, self.path = model, tokenizer, Path(memory_path)
        self.options = (options or chat_options(model)).validate()
        self.template, self.incremental = template, incremental
        if self.path.is_dir():
            raise LongMemError(f"chat memory {self.path} is a folder; give a file path, e.g. {self.path / 'chat.safetensors'}")
        if self.path.exists():
            self.memory = self._open()
        else:
            self.memory = model.new_memory(1)
            self.memory.save(self.path)

    def _open(self):
        memory = self.model.load_memory(self.path)
        if memory.batch_size != 1:
            raise LongMemError(f"chat memory {self.path} has {memory.batch_size} rows; a conversation needs a "
                               f"single-row memory (one written by `longmem chat` or `longmem memorize`)")
        return memory

    def say(self, text: str) -> Iterator[str]:
        """Stream the reply to `text` as text pieces; once it is complete, the turn is memorized and saved."""
        if not text.strip():
            raise LongMemError("say() needs some text; an empty turn has nothing to answer")
        from longmem.decoding import make_decoder

        prompt = self.tokenizer(self.template.format(text=text))["input_ids"]
        ids = torch.tensor([prompt], device=self.model.device)  # (1, N)
        written = int(self.memory.written[0])
        decoder = make_decoder(self.model, self.memory, self.incremental)
        steps = decode_steps(decoder, ids, None, self.options, tokenizer=self.tokenizer)
        return self._reply(prompt, steps, written)

    def _reply(self, prompt: list[int], steps, written: int) -> Iterator[str]:
        stream = TextStream(self.tokenizer, prompt, self.options.stops)
        reply: list[int] = []
        started = complete = False
        try:
            for step in steps:
                reply.append(int(step.tokens[0]))
                piece = stream.push(reply[-1])
                piece = piece if started else piece.lstrip()  # the reply starts at its first visible character
                if piece:
                    started = True
                    yield piece
            tail = stream.flush()
            tail = tail if started else tail.lstrip()
            if tail:
                yield tail
            self._keep(prompt + reply, written)
            complete = True
        finally:
            if not complete:  # the turn did not happen: back to the file
                self.memory = self._open()

    @torch.no_grad()
    def _keep(self, turn: list[int], written: int) -> None:
        """Write the part of the turn the decoder has not written into memory yet, then save the memory."""
        fed = int(self.memory.written[0]) - written  # the decoder memorizes a prefix of what it reads
        if fed < len(turn):
            self.model.memorize(torch.tensor([turn[fed:]], device=self.model.device), self.memory)
        self.memory.save(self.path)

    def reset(self) -> None:
        """Forget the whole conversation (the file is saved empty)."""
        self.memory.reset()
        self.memory.save(self.path)
