"""Generation: the decoding options of HuggingFace `generate`, its logits processing, and the decoding loop.

`GenerationOptions` holds what a user chooses (greedy or sampling, temperature, top-k, top-p,
repetition penalty, when to stop); `validate()` refuses an invalid value with a one-line
`LongMemError` and never substitutes another. The logits processing follows transformers'
own processors, in their order: repetition penalty (`RepetitionPenaltyLogitsProcessor`, also
when greedy), then, when sampling, temperature, top-k, top-p (`TemperatureLogitsWarper`,
`TopKLogitsWarper`, `TopPLogitsWarper`). `stream_tokens` drives any `longmem.decoding.Decoder`
and yields one token per row per step.

Shapes: B rows, N prompt tokens, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from longmem.errors import LongMemError
from longmem.memory.retrieval import Retrieval
from longmem.textstream import Detokenizer

SAMPLING_ONLY = ("temperature", "top_k", "top_p")


@dataclass
class GenerationOptions:
    """How to pick the new tokens and when to stop (the names and meanings of HF's `GenerationConfig`)."""

    max_new_tokens: int = 32
    """New tokens per row at most (0: only read the prompt)."""
    do_sample: bool = False
    """Sample from the processed distribution; False (the default, as in HF): greedy, the most likely token."""
    temperature: float = 1.0
    """Sampling: divide the logits by this (> 0). 0 is accepted as the old spelling of greedy, without do_sample."""
    top_k: int | None = None
    """Sampling: keep the k most likely tokens (k >= 1; ties with the k-th are kept, as in HF)."""
    top_p: float | None = None
    """Sampling: keep the most likely tokens whose probabilities sum to at least p, 0 < p <= 1 (nucleus)."""
    repetition_penalty: float = 1.0
    """> 0; a token already in the row (prompt or new, padding excluded) has its logit divided by this when
    positive and multiplied when negative (CTRL; HF's definition). 1.0 = off. Applies to greedy too."""
    eos_token_id: int | list[int] | None = None
    """A row stops after producing any of these (the token is kept in the output)."""
    pad_token_id: int | None = None
    """What a finished row gets while other rows continue (default: the first eos_token_id)."""
    stop_strings: str | list[str] | None = None
    """A row stops once its new text contains one of these (needs a tokenizer). Token outputs keep the tokens
    that completed it, as in HF; text outputs (`model.stream` with a tokenizer, the CLI, chat) end before it."""
    seed: int | None = None
    """Seed of the sampling generator; the same seed gives the same tokens. None: torch's global generator."""

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else [e] if isinstance(e, int) else list(e)

    @property
    def stops(self) -> list[str]:
        s = self.stop_strings
        return [] if s is None else [s] if isinstance(s, str) else list(s)

    @property
    def pad_id(self) -> int | None:
        return self.pad_token_id if self.pad_token_id is not None else (self.eos_ids or [None])[0]

    def replace(self, **changes) -> "GenerationOptions":
        """A copy with some fields changed; an unknown name is an error that lists the known ones."""
        names = [f.name for f in dataclasses.fields(self)]
        unknown = [k for k in changes if k not in names]
        if unknown:
            raise LongMemError(f"unknown generation option {unknown[0]!r}; the options are {', '.join(names)} "
                               f"(and max_length)")
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, config) -> "GenerationOptions":
        """The options a transformers `GenerationConfig` sets (its unset fields keep this class's defaults; its
        sampling fields count only when it samples, which is how transformers reads them)."""
        names = [f.name for f in dataclasses.fields(cls)]
        values = {k: getattr(config, k, None) for k in names if getattr(config, k, None) is not None}
        if not values.get("do_sample"):
            for k in SAMPLING_ONLY:
                values.pop(k, None)
        if getattr(config, "max_length", None) is not None and "max_new_tokens" not in values:
            raise LongMemError("the GenerationConfig sets max_length but not max_new_tokens; set max_new_tokens "
                               "(or pass max_length= to generate, which knows the prompt's length)")
        return cls(**values)

    def validate(self) -> "GenerationOptions":
        """Refuse any invalid value with a one-line LongMemError; returns self."""
        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        def is_real(x):
            return isinstance(x, (int, float)) and not isinstance(x, bool)

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise LongMemError(f"max_new_tokens={self.max_new_tokens!r}: give the number of new tokens, 0 or more")
        if not isinstance(self.do_sample, bool):
            raise LongMemError(f"do_sample={self.do_sample!r}: give True (sample) or False (greedy)")
        t = self.temperature
        if not is_real(t) or not math.isfinite(t) or t < 0:
            raise LongMemError(f"temperature={t!r}: give a finite number > 0 (used when sampling), e.g. 0.8")
        if self.do_sample and t == 0:
            raise LongMemError("temperature=0 with do_sample=True: sampling needs a temperature > 0; for greedy "
                               "decoding leave do_sample off")
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 1):
            raise LongMemError(f"top_k={self.top_k!r}: give the number of candidate tokens, at least 1, "
                               f"or None for all")
        p = self.top_p
        if p is not None and (not is_real(p) or not 0 < p <= 1):
            raise LongMemError(f"top_p={p!r}: give a probability mass in (0, 1], e.g. 0.9, or None for all")
        if not self.do_sample:
            for name in SAMPLING_ONLY:
                value = getattr(self, name)
                if value is not None and not (name == "temperature" and value in (0, 1)):
                    raise LongMemError(f"{name}={value!r} only applies when sampling; pass do_sample=True "
                                       f"(greedy decoding is the default)")
        r = self.repetition_penalty
        if not is_real(r) or not math.isfinite(r) or r <= 0:
            raise LongMemError(f"repetition_penalty={r!r}: give a finite number > 0 (1.0 = off, e.g. 1.2)")
        e = self.eos_token_id
        if e is not None and (isinstance(e, (str, bytes)) or not (is_int(e) or (
                isinstance(e, (list, tuple)) and e and all(is_int(x) for x in e))) or min(self.eos_ids) < 0):
            raise LongMemError(f"eos_token_id={e!r}: give a token id or a non-empty list of token ids (>= 0)")
        if self.pad_token_id is not None and (not is_int(self.pad_token_id) or self.pad_token_id < 0):
            raise LongMemError(f"pad_token_id={self.pad_token_id!r}: give a token id (>= 0)")
        s = self.stop_strings
        if s is not None and (not (isinstance(s, (str, list, tuple))) or not self.stops or
                              not all(isinstance(x, str) and x for x in self.stops)):
            raise LongMemError(f"stop_strings={s!r}: give a non-empty string or a list of non-empty strings")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise LongMemError(f"seed={self.seed!r}: give a whole number >= 0")
        return self


# ---- logits processing (transformers' definitions) -------------------------------------------------
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, V), seen (B, V) bool: the tokens already in each row -> penalized logits (B, V)."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (and ties with the k-th), the others -> -inf."""
    k = min(k, logits.shape[-1])
    kth = logits.topk(k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, -math.inf)


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (at least one), the others -> -inf."""
    if p >= 1:
        return logits
    sorted_logits, order = logits.sort(dim=-1)                  # ascending, (B, V)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)   # (B, V)
    drop = cumulative <= 1 - p
    drop[:, -1] = False                                         # the most likely token always stays
    return logits.masked_fill(drop.scatter(1, order, drop), -math.inf)


def process_logits(logits: torch.Tensor, options: GenerationOptions, seen: torch.Tensor | None) -> torch.Tensor:
    """logits (B, V) float32 -> the scores the next token is chosen from (B, V), in HF's order."""
    if options.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, options.repetition_penalty)
    if not options.do_sample:
        return logits
    if options.temperature != 1.0:
        logits = logits / options.temperature
    if options.top_k is not None:
        logits = apply_top_k(logits, options.top_k)
    if options.top_p is not None:
        logits = apply_top_p(logits, options.top_p)
    return logits


def choose(scores: torch.Tensor, options: GenerationOptions, generator: torch.Generator | None) -> torch.Tensor:
    """scores (B, V) -> tokens (B,): the argmax (greedy) or a sample of softmax(scores)."""
    if not options.do_sample:
        return scores.argmax(dim=-1)
    return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator)[:, 0]


# ---- the decoding loop ------------------------------------------------------------------------------
@dataclass
class Step:
    """One step of decoding."""

    tokens: torch.Tensor
    """(B,) the new token of every row (pad_token_id for a row that had already finished)."""
    live: torch.Tensor
    """(B,) bool: the rows whose token is a real new token (not padding after the row finished)."""
    retrieval: Retrieval | None = None
    """What the memory-augmented layer retrieved at the position these tokens were chosen for, fields
    (B, Hkv, G, k) (`longmem.decoding`), or None with an empty memory. Read it (`longmem.memory.readable`)
    before the next step: a window overflow may overwrite its slots."""


def check_prompt(input_ids, attention_mask) -> None:
    """Refuse what generation cannot continue: not (B, N) token ids, an empty prompt, padding on the right."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise LongMemError(f"input_ids must be a (batch, tokens) tensor of token ids, not {shape}; e.g. "
                           f"tokenizer(text, return_tensors='pt').input_ids")
    if input_ids.shape[1] == 0:
        raise LongMemError("the prompt is empty; generation needs at least one token")
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor):
        raise LongMemError(f"attention_mask must be a (batch, tokens) tensor of 0/1, not {type(attention_mask).__name__}; "
                           f"pass the memory by name: generate(input_ids, memory=memory)")
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise LongMemError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids "
                           f"{tuple(input_ids.shape)}; pass the mask the tokenizer returned with the ids")
    mask = attention_mask.bool()
    if not bool(mask[:, -1].all()) or bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        raise LongMemError("attention_mask has padding on the right (or in the middle) of a row; generation "
                           "continues each row at its end, so pad on the left: tokenizer.padding_side = 'left'")


class StopStrings:
    """Per row, whether its new text (decoded as it grows) contains a stop string yet."""

    def __init__(self, tokenizer, stops: list[str], contexts: list[list[int]]):
        self.stops = stops
        self.rows = [Detokenizer(tokenizer, context) for context in contexts]
        self.tails = ["" for _ in contexts]  # the last characters of each row's text, enough to find a stop string
        self.keep = max(len(s) for s in stops) - 1

    def push(self, tokens: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        """tokens (B,), live (B,) bool -> (B,) bool: the live rows whose text now contains a stop string."""
        hit = torch.zeros_like(live)
        for row in live.nonzero()[:, 0].tolist():
            text = self.tails[row] + self.rows[row].push(int(tokens[row]))
            hit[row] = any(s in text for s in self.stops)
            self.tails[row] = text[len(text) - self.keep:] if self.keep else ""
        return hit


def prompt_contexts(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[list[int]]:
    """The real (unpadded) tokens at the end of every row: the decoding context of its new text."""
    rows = input_ids.tolist()
    if attention_mask is None:
        return rows
    return [[t for t, m in zip(ids, keep) if m] for ids, keep in zip(rows, attention_mask.tolist())]


def decode_steps(decoder, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, options: GenerationOptions,
                 generator: torch.Generator | None = None, tokenizer=None) -> Iterator[Step]:
    """Drive `decoder` over the prompt input_ids (B, N) (left-padded rows: attention_mask) and yield a `Step` per
    new token. A row finishes at an eos token or a stop string; the loop ends when every row has finished or after
    max_new_tokens. The last token chosen is never fed back to the decoder. The arguments are checked now; the
    decoder runs (under torch.no_grad) while the result is iterated."""
    opts = options.validate()
    check_prompt(input_ids, attention_mask)
    if opts.stops and tokenizer is None:
        raise LongMemError("stop_strings need a tokenizer to read the text; pass tokenizer= (or load the model "
                           "with one: model.tokenizer)")
    if input_ids.shape[0] > 1 and opts.pad_id is None and opts.stops:
        raise LongMemError("with several rows and stop_strings, a row that stops needs a pad_token_id to fill "
                           "its place while the others continue; pass pad_token_id")
    if generator is not None and opts.seed is not None:
        raise LongMemError("pass either seed= or generator=, not both")
    if opts.seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(opts.seed)
    return _loop(decoder, input_ids, attention_mask, opts, generator, tokenizer)


@torch.no_grad()
def _loop(decoder, input_ids, attention_mask, opts: GenerationOptions, generator, tokenizer) -> Iterator[Step]:
    B, device, pad = input_ids.shape[0], input_ids.device, opts.pad_id
    logits = decoder.prefill(input_ids, attention_mask)  # (B, V)
    V = logits.shape[-1]
    for name, ids in (("eos_token_id", opts.eos_ids), ("pad_token_id", [] if pad is None else [pad])):
        if any(i >= V for i in ids):
            raise LongMemError(f"{name}={max(ids)} is outside the vocabulary (0..{V - 1}); give a token id of "
                               f"this model's tokenizer")
    eos = torch.tensor(opts.eos_ids, dtype=torch.long, device=device)
    stops = StopStrings(tokenizer, opts.stops, prompt_contexts(input_ids, attention_mask)) if opts.stops else None
    seen = None
    if opts.repetition_penalty != 1.0:  # seen (B, V): the tokens each row holds, padding excluded
        ids = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, V)
        seen = torch.zeros(B, V + 1, dtype=torch.bool, device=device).scatter_(1, ids, True)[:, :V]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for i in range(opts.max_new_tokens):
        tokens = choose(process_logits(logits, opts, seen), opts, generator)  # (B,)
        live = ~done
        if pad is not None:
            tokens = tokens.masked_fill(done, pad)
        if len(eos):
            done = done | (torch.isin(tokens, eos) & live)
        if stops is not None:
            done = done | stops.push(tokens, live)
        yield Step(tokens, live, getattr(decoder, "retrieval", None))
        if bool(done.all()) or i == opts.max_new_tokens - 1:
            return
        logits = decoder.step(tokens)
        if seen is not None:
            seen[torch.arange(B, device=device), tokens] = True


def stream_tokens(decoder, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, options: GenerationOptions,
                  generator: torch.Generator | None = None, tokenizer=None) -> Iterator[torch.Tensor]:
    """`decode_steps`, yielding only the new tokens (B,) of each step (finished rows: pad_token_id)."""
    for step in decode_steps(decoder, input_ids, attention_mask, options, generator, tokenizer):
        yield step.tokens
