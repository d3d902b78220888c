"""`BatchScheduler`: the model's one worker thread; generations for different memories share forwards.

Every use of the model (generation, memorize) runs on this thread, one job at a time, so the
event loop never blocks on compute and forwards never compete for the cores. Requests queue
up while a batch runs; when the worker is free it takes everything waiting (after a short
`batch_wait_ms` pause when it was idle, so near-simultaneous requests meet), groups the
generations that can share a batch and runs each group as one batch. Each row works on a copy
of its memory (a stored memory never changes by generating); the copies are stacked into one
bank (`MemoryBank.stack`), the prompts left-padded, and one decoder steps every row at once.
The decoder treats rows independently (each row's prompt split and window overflow follow its
own length, `longmem.decoding`), so a row's tokens are those it would get alone, to float
rounding, however long its neighbours' prompts.

Rows of one batch share the sampling settings (do_sample, temperature, top_k, top_p,
repetition_penalty, end token); `max_new_tokens` and stop strings are per row (a row that is
done stops emitting; the batch ends when every row is done). A request with a `seed` runs
in a batch of its own, so its output depends on the seed alone, not on its neighbours.
Requests for the *same* memory never meet here: the app serialises them with the memory's lock.

Shapes: B rows (requests) in a batch, N longest prompt.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from longmem.runtime import autocast

if TYPE_CHECKING:
    from longmem.generation import GenerationOptions
    from longmem.memory import MemoryBank
    from longmem.model import LongMemForCausalLM


@dataclass
class Finish:
    """The end of one generation (the last event a job emits)."""
    reason: str            # "stop" (end token or stop string) or "length" (max_new_tokens)
    text: str              # the whole generated text (up to a stop string)
    token_ids: list[int]   # the generated tokens, the end token excluded
    generated: int         # tokens the model produced for this row (an end token included)
    prompt_tokens: int


@dataclass
class GenerationJob:
    prompt_ids: list[int]
    memory: "MemoryBank | None"  # a one-row bank, read only (None: an empty memory)
    options: "GenerationOptions"  # validated; max_new_tokens and stop_strings are this request's
    emit: Callable[[Any], None]  # called on the worker thread: text deltas (str), then a Finish or an Exception
    cancelled: threading.Event = field(default_factory=threading.Event)

    def group_key(self) -> tuple:
        """Jobs with equal keys can share a batch."""
        o = self.options
        return (o.do_sample, o.temperature, o.top_k, o.top_p, o.repetition_penalty, tuple(o.eos_ids), o.pad_id,
                id(self) if o.seed is not None else None)


@dataclass
class _Call:
    fn: Callable[[], Any]
    future: Future


class BatchScheduler:
    def __init__(self, model: "LongMemForCausalLM", tokenizer, max_batch: int = 16, batch_wait_ms: float = 2.0,
                 precision: str = "bf16", retriever: str | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.retriever = retriever  # search backend of a batch's memory (None: the model's)
        self.max_batch, self.batch_wait = max_batch, batch_wait_ms / 1000
        self.precision = precision
        self.batches: list[int] = []  # size of every batch run (for tests and the benchmark)
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="longmem-model", daemon=True)

    # ---- the event-loop side ------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def submit(self, job: GenerationJob) -> None:
        self._queue.put(job)

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn()` on the model thread (between batches); its result or exception comes in the Future."""
        future: Future = Future()
        self._queue.put(_Call(fn, future))
        return future

    # ---- the worker ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            items = [first]
            deadline = time.monotonic() + self.batch_wait
            while len(items) < self.max_batch:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # stop after this round
                    break
                items.append(item)
            groups: dict[tuple, list[GenerationJob]] = {}
            for item in items:
                if isinstance(item, _Call):
                    self._run_call(item)
                elif not item.cancelled.is_set():
                    groups.setdefault(item.group_key(), []).append(item)
            for jobs in groups.values():
                self._run_batch(jobs)

    def _run_call(self, call: _Call) -> None:
        if not call.future.set_running_or_notify_cancel():
            return
        try:
            with torch.no_grad(), autocast(self.model.device, self.precision):
                call.future.set_result(call.fn())
        except BaseException as e:  # handed to the awaiting request
            call.future.set_exception(e)

    def _run_batch(self, jobs: list[GenerationJob]) -> None:
        try:
            self._generate(jobs)
        except Exception as e:  # every request of the batch gets it (the app answers 500)
            for job in jobs:
                job.emit(e)

    def _generate(self, jobs: list[GenerationJob]) -> None:
        from longmem.decoding import make_decoder
        from longmem.generation import stream_tokens
        from longmem.memory import MemoryBank
        from longmem.textstream import TextStream

        model, B = self.model, len(jobs)
        self.batches.append(B)
        o = jobs[0].options
        options = o.replace(max_new_tokens=max(j.options.max_new_tokens for j in jobs), stop_strings=None)
        memory = MemoryBank.stack([job.memory.select([0]) if job.memory is not None
                                   else model.new_memory(1, retriever=self.retriever)
                                   for job in jobs])  # copies: generating never changes a stored memory
        local = [job.prompt_ids for job in jobs]
        N = max(len(ids) for ids in local)
        input_ids = torch.full((B, N), o.pad_id or 0, dtype=torch.long)  # (B, N) left-padded
        attention_mask = torch.zeros(B, N, dtype=torch.long)             # (B, N) 1 = real token
        for b, ids in enumerate(local):
            input_ids[b, N - len(ids):] = torch.tensor(ids)
            attention_mask[b, N - len(ids):] = 1
        ends = set(o.eos_ids)
        texts = [TextStream(self.tokenizer, j.prompt_ids, j.options.stops) for j in jobs]
        pieces: list[list[str]] = [[] for _ in jobs]
        ids: list[list[int]] = [[] for _ in jobs]
        live = [True] * B

        def send(b: int, piece: str) -> None:
            if piece:
                pieces[b].append(piece)
                jobs[b].emit(piece)

        def finish(b: int, reason: str, generated: int) -> None:
            live[b] = False
            send(b, texts[b].flush())
            jobs[b].emit(Finish(reason, "".join(pieces[b]), ids[b], generated, len(jobs[b].prompt_ids)))

        with torch.no_grad(), autocast(model.device, self.precision):
            decoder = make_decoder(model, memory, incremental=True)
            steps = stream_tokens(decoder, input_ids.to(model.device), attention_mask.to(model.device), options)
            try:
                for tokens in steps:  # (B,) one new token per row
                    for b, token in enumerate(tokens.tolist()):
                        if not live[b]:
                            continue
                        if jobs[b].cancelled.is_set():
                            live[b] = False
                        elif token in ends:
                            finish(b, "stop", len(ids[b]) + 1)
                        else:
                            ids[b].append(token)
                            send(b, texts[b].push(token))
                            if texts[b].stop.stopped:
                                finish(b, "stop", len(ids[b]))
                            elif len(ids[b]) >= jobs[b].options.max_new_tokens:
                                finish(b, "length", len(ids[b]))
                    if not any(live):
                        break
            finally:
                steps.close()
        for b in range(B):
            if live[b]:  # the loop ended without this row finishing: it used all its tokens
                finish(b, "length", len(ids[b]))
