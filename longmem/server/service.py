"""`Service`: what every route does between HTTP and the model: checks, locks, jobs, appends.

Order of checks on a memory route: the name's syntax (400), a token present (401), the token
opens the memory (404, the same answer whether or not the memory exists), then the memory's
lock is taken for the whole request, so requests on one memory run one after another and no
append is lost; requests on different memories proceed together (their generations batch).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import asdict, dataclass
from typing import AsyncIterator

import torch

from longmem.errors import LongMemError
from longmem.server.auth import check_name
from longmem.server.config import ServerConfig
from longmem.server.scheduler import BatchScheduler, Finish, GenerationJob
from longmem.server.store import MemoryStats, MemoryStore


class ApiError(LongMemError):
    """A request the server refuses, with its HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Result:
    """A finished generation, with the memory's stats when the exchange was appended."""
    finish: Finish
    appended: MemoryStats | None


class Service:
    def __init__(self, config: ServerConfig, model, tokenizer):
        self.config, self.model, self.tokenizer = config, model, tokenizer
        retriever = config.retriever or model.config.retriever
        self.store = MemoryStore(config.data_dir, model.memory_spec(), model.device, config.max_loaded, retriever)
        self.recovered = self.store.recover()
        self.scheduler = BatchScheduler(model, tokenizer, config.max_batch, config.batch_wait_ms, config.precision,
                                        retriever)

    # ---- checks -----------------------------------------------------------------------------
    def authorize(self, name: str, token: str | None) -> str:
        check_name(name)
        if token is None:
            raise ApiError(401, "this request needs the memory's token: send the header Authorization: Bearer <token>")
        self.store.authorize(name, token)
        return name

    def encode(self, text: str, what: str, limit: int) -> list[int]:
        ids = self.tokenizer(text)["input_ids"]
        if not ids:
            raise ApiError(400, f"the {what} is empty; give some text")
        if len(ids) > limit:
            raise ApiError(400, f"the {what} is {len(ids):,} tokens; this server accepts at most {limit:,}")
        return ids

    def options(self, **fields):
        """The model's `generation_config` (its end and pad tokens) with `fields`, checked, within the limits."""
        if fields["max_new_tokens"] > self.config.max_new_tokens:
            raise ApiError(400, f"max_new_tokens {fields['max_new_tokens']} is over this server's limit of "
                                f"{self.config.max_new_tokens}; ask for fewer tokens")
        return self.model.generation_config.replace(**fields).validate()

    # ---- memories ---------------------------------------------------------------------------
    async def append(self, name: str, ids: list[int]) -> MemoryStats:
        """Memorize `ids` into memory `name` (its lock held by the caller); returns once the file is on disk."""
        def work():
            bank = self.store.get(name).select([0])  # a copy: the loaded bank changes only once the file is saved
            self.model.memorize(torch.tensor([ids], device=self.model.device), bank)
            self.store.put(name, bank)
            return self.store.stats(name)
        return await asyncio.wrap_future(self.scheduler.call(work))

    # ---- generation -------------------------------------------------------------------------
    async def generate(self, name: str | None, prompt_ids: list[int], options, append: bool
                       ) -> AsyncIterator[str | Result]:
        """Text deltas, then one Result. Generates on a copy of the memory; appends the exchange when asked."""
        if append and name is None:
            raise ApiError(400, "append needs a memory: name one (the `memory` field)")
        async with self.store.lock(name) if name else contextlib.nullcontext():
            bank = await asyncio.to_thread(self.store.get, name) if name else None
            loop = asyncio.get_running_loop()
            events: asyncio.Queue = asyncio.Queue()

            def emit(event) -> None:  # on the model thread
                with contextlib.suppress(RuntimeError):  # the loop is gone (server stopping)
                    loop.call_soon_threadsafe(events.put_nowait, event)
            job = GenerationJob(prompt_ids, bank, options, emit)
            self.scheduler.submit(job)
            try:
                while not isinstance(event := await events.get(), Finish):
                    if isinstance(event, BaseException):
                        raise event
                    yield event
            finally:
                job.cancelled.set()  # a client that left frees its row
            appended = await self.append(name, prompt_ids + event.token_ids) if append else None
        yield Result(event, appended)  # after the lock is released: the caller may stop reading here


def usage(finish: Finish) -> dict:
    n = finish.generated
    return {"prompt_tokens": finish.prompt_tokens, "completion_tokens": n, "total_tokens": finish.prompt_tokens + n}


def stats_dict(stats: MemoryStats | None) -> dict | None:
    return None if stats is None else asdict(stats)
