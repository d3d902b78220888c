"""`longmem eval passkey`: retrieve a 5-digit key hidden at a given depth of a long filler text.

A prompt of about L tokens: filler sentences, with "The pass key is 12345. Remember it. 12345
is the pass key." inserted at the sentence boundary nearest to depth d, ending with "What is
the pass key? The pass key is". As in `LongMemForCausalLM.generate`, everything before the
last segment is memorized and the last segment stays local. The prediction is the greedy
continuation's first number; a trial is correct when it equals the key exactly. Rows:
LongMem with its memory, and LongMem with the same local context but an empty memory.

The memory is a FIFO of `memory_size` tokens: when L exceeds it, the oldest part of the
prompt is gone, and a key placed there cannot be retrieved. Each trial records where its
key was (local, memory, partial, evicted), and the table reports it next to the accuracy.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass, field

import torch

from longmem.errors import LongMemError
from longmem.eval.common import (EvalOptions, ResultFile, data_fingerprint, markdown_table, model_fingerprint,
                                 options_dict, parse_list, peak_rss_mib)
from longmem.memory import held_span

TASK = "passkey"
FILLER = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again."]
KEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
ROWS = {"longmem_memory": "LongMem, memory", "longmem_no_memory": "LongMem, memory disabled"}
MAX_PIECE = 64  # tokens: longer filler sentences (from --filler data) are cut into pieces of this size


@dataclass
class PasskeyOptions(EvalOptions):
    lengths: str = field(default="2048,4096,8192,16384,32768,65536,131072", metadata={
        "help": "comma-separated prompt lengths L in tokens"})
    depths: str = field(default="0.1,0.3,0.5,0.7,0.9", metadata={
        "help": "comma-separated depths of the key in the prompt (0: start, 1: end)"})
    trials: int = field(default=3, metadata={"help": "random keys per (length, depth)"})
    max_length: int = field(default=0, metadata={"help": "skip lengths above this many tokens (0: none)"})
    memory_size: int = field(default=0, metadata={"help": "memory capacity in tokens (0: the model's memory_size)"})
    filler: str = field(default="repeat", metadata={
        "help": "filler text: 'repeat' (neutral sentences, repeated) or 'data' (dev documents of --data)"})
    new_tokens: int = field(default=8, metadata={"help": "tokens to decode greedily after the question"})


# ---- prompt construction -------------------------------------------------------------------------
@dataclass
class PasskeyPrompt:
    ids: list[int]  # the whole prompt
    key: str
    key_start: int  # token span [key_start, key_end) of the key sentence
    key_end: int


def encode(tok, text: str) -> list[int]:
    return tok(" " + text, add_special_tokens=False, verbose=False)["input_ids"]


def filler_sentences(opts: PasskeyOptions, tok, need: int) -> tuple[list[list[int]], str]:
    """Token ids of the filler sentences (used in a cycle; about `need` tokens of them at most for
    --filler data), and a fingerprint of their text."""
    if opts.filler == "repeat":
        texts = FILLER
    elif opts.filler == "data":
        from longmem.data.documents import load_documents
        docs = load_documents(opts.data, split="dev")
        texts = [s for d in docs for s in re.split(r"(?<=[.!?])\s+", " ".join(d.text.split())) if s]
    else:
        raise LongMemError(f"--filler {opts.filler!r} is not 'repeat' or 'data'")
    pieces, used, total = [], [], 0
    for t in texts:
        ids = encode(tok, t)
        pieces += [ids[i:i + MAX_PIECE] for i in range(0, len(ids), MAX_PIECE)]
        used.append(t)
        total += len(ids)
        if opts.filler == "data" and total >= need:
            break
    if not pieces:
        raise LongMemError(f"--filler data: the dev documents of {opts.data} hold no text; pass other --data")
    return pieces, data_fingerprint(used)


def build_prompt(tok, sentences: list[list[int]], length: int, depth: float, key: str,
                 first_sentence: int = 0) -> PasskeyPrompt:
    """Whole filler sentences (from `first_sentence`, cycling) up to `length` tokens in all,
    the key sentence at the sentence boundary nearest to `depth`, the question at the end."""
    head = tok("", verbose=False)["input_ids"]  # the special tokens the tokenizer starts a text with (BOS), if any
    key_ids, question = encode(tok, KEY_SENTENCE.format(key=key)), encode(tok, QUESTION)
    budget = length - len(head) - len(key_ids) - len(question)
    if budget < 0:
        raise LongMemError(f"--lengths {length} is too short for the key sentence and question "
                           f"({length - budget} tokens); use longer lengths")
    filler, bounds, i = [], [0], first_sentence  # bounds: token offsets of the sentence boundaries
    while len(filler) + len(sentences[i % len(sentences)]) <= budget:
        filler += sentences[i % len(sentences)]
        bounds.append(len(filler))
        i += 1
    at = min(bounds, key=lambda b: abs(b - depth * len(filler)))
    ids = head + filler[:at] + key_ids + filler[at:] + question
    start = len(head) + at
    return PasskeyPrompt(ids, key, start, start + len(key_ids))


def key_visibility(p: PasskeyPrompt, prefix: int, capacity: int, chunk: int) -> str:
    """Where the key is once `prefix` tokens are memorized: 'local', 'memory', 'partial' or 'evicted'.

    The memory holds the stream positions `held_span` gives (the bank's own eviction rule).
    """
    lo, hi = held_span(prefix, capacity, chunk)  # retrievable memory: [lo, hi)
    span = range(p.key_start, p.key_end)
    local = sum(i >= prefix for i in span)
    memory = sum(lo <= i < hi for i in span)
    if local == len(span):
        return "local"
    if local + memory == len(span):
        return "memory"
    return "evicted" if local + memory == 0 else "partial"


# ---- one trial ------------------------------------------------------------------------------------
@torch.no_grad()
def trial(model, tok, p: PasskeyPrompt, memory_size: int, new_tokens: int) -> dict:
    """Greedy answers and the key's log-likelihood, with the memorized prefix and with an empty memory."""
    from longmem.runtime import autocast

    T = model.config.segment_length
    ids = torch.tensor([p.ids], device=model.device)     # (1, N)
    N = ids.shape[1]
    prefix, _ = model.split_prompt(N)                    # what generate memorizes; the rest stays local
    answer = torch.tensor([encode(tok, p.key)], device=model.device)  # (1, a)
    full = torch.cat([ids, answer], dim=1)               # (1, N + a)
    start = max(prefix, full.shape[1] - T)               # the local segment that scores the answer
    out = {"prefix": prefix, "where": key_visibility(p, prefix, memory_size, model.config.chunk_size),
           "pred": {}, "correct": {}, "key_nll": {}}
    with autocast(model.device):
        for row in ROWS:
            use = row == "longmem_memory"
            memory = model.new_memory(1, memory_size=memory_size)
            prompt = ids if use else ids[:, prefix:]
            gen = model.generate(prompt, memory=memory, max_new_tokens=new_tokens)  # greedy
            text = tok.decode(gen[0, prompt.shape[1]:].tolist())
            m = re.search(r"\d+", text)
            out["pred"][row] = m.group() if m else ""
            out["correct"][row] = out["pred"][row] == p.key
            memory = model.new_memory(1, memory_size=memory_size)
            if use and start:
                model.memorize(full[:, :start], memory)
            logits = model(full[:, start:], memory=memory, update_memory=False).logits  # (1, t, V)
            logp = torch.log_softmax(logits[0, N - start - 1:-1].float(), dim=-1)    # (a, V)
            out["key_nll"][row] = float(-logp.gather(1, answer[0, :, None]).mean())
    return out


# ---- the task --------------------------------------------------------------------------------------
def grid(opts: PasskeyOptions) -> list[tuple[int, float, int]]:
    lengths = parse_list(opts.lengths, int, "--lengths")
    depths = parse_list(opts.depths, float, "--depths")
    if any(not 0 <= d <= 1 for d in depths):
        raise LongMemError(f"--depths {opts.depths}: every depth must be between 0 and 1")
    if opts.trials < 1:
        raise LongMemError(f"--trials {opts.trials} must be at least 1")
    if opts.max_length:
        lengths = [L for L in lengths if L <= opts.max_length]
        if not lengths:
            raise LongMemError(f"--max-length {opts.max_length} excludes every length of --lengths {opts.lengths}")
    cells = [(L, d, t) for L in lengths for d in depths for t in range(opts.trials)]
    if opts.new_tokens < 1:
        raise LongMemError(f"--new-tokens {opts.new_tokens} must be at least 1 (5 digits need a few tokens)")
    if opts.limit is not None and opts.limit < 1:
        raise LongMemError(f"--limit {opts.limit} must be at least 1")
    return cells[:opts.limit]


def example_key(L: int, d: float, t: int) -> str:
    return f"L{L}-d{d:g}-t{t}"


def summarize(examples: list[dict], memory_size: int, segment_length: int) -> dict:
    lengths = sorted({e["length"] for e in examples})
    depths = sorted({e["depth"] for e in examples})

    def acc(row, sel):
        return sum(e["correct"][row] for e in sel) / len(sel) if sel else None

    accuracy = {row: {str(L): {f"{d:g}": acc(row, [e for e in examples if e["length"] == L and e["depth"] == d])
                               for d in depths} for L in lengths} for row in ROWS}
    where = {str(L): {w: sum(e["where"] == w for e in examples if e["length"] == L)
                      for w in ("local", "memory", "partial", "evicted")} for L in lengths}
    return {"examples": len(examples), "memory_size": memory_size, "segment_length": segment_length,
            "accuracy": accuracy, "mean_accuracy": {row: acc(row, examples) for row in ROWS},
            "accuracy_by_length": {row: {str(L): acc(row, [e for e in examples if e["length"] == L])
                                         for L in lengths} for row in ROWS},
            "key_nll": {row: sum(e["key_nll"][row] for e in examples) / len(examples) for row in ROWS},
            "key_where": where, "peak_rss_mib": max(e["peak_rss_mib"] for e in examples),
            "seconds": round(sum(e["seconds"] for e in examples), 1)}


def table(summary: dict) -> str:
    acc = summary["accuracy"]
    depths = list(next(iter(acc["longmem_memory"].values())))

    def pct(v):
        return "-" if v is None else f"{100 * v:.0f}"

    rows = []
    for L, cells in acc["longmem_memory"].items():
        off = acc["longmem_no_memory"][L]
        by_length = summary["accuracy_by_length"]
        everywhere = f"{pct(by_length['longmem_memory'][L])} / {pct(by_length['longmem_no_memory'][L])}"
        where = " ".join(f"{k} {v}" for k, v in summary["key_where"][L].items() if v)
        rows.append([f"{int(L):,}", *(f"{pct(cells[d])} / {pct(off[d])}" for d in depths), everywhere, where])
    caption = (f"pass-key exact-match accuracy (%), with memory / memory disabled; memory capacity "
               f"{summary['memory_size']:,} tokens, local segment {summary['segment_length']:,}. Key location: where "
               f"the key sentence was (local segment, memory, partial, evicted: older than the memory holds).")
    return caption + "\n\n" + markdown_table(["L (tokens)", *(f"depth {d}" for d in depths), "all", "key location"],
                                             rows)


def run(opts: PasskeyOptions) -> dict:
    """Run the (length x depth x trial) grid; resumable; returns the summary."""
    from tqdm.auto import tqdm

    from longmem.runtime import load_model

    cells = grid(opts)
    model, tok = load_model(opts.model, opts.device)
    memory_size = opts.memory_size or model.config.memory_size
    if memory_size % model.config.chunk_size:
        raise LongMemError(f"--memory-size {memory_size} is not a multiple of the model's chunk_size "
                           f"{model.config.chunk_size}")
    sentences, filler_fp = filler_sentences(opts, tok, need=2 * max(L for L, _, _ in cells))
    config = options_dict(opts, memory_size=memory_size)
    result = ResultFile.open(opts.out or f"results/{TASK}.json", TASK, config, model_fingerprint(opts.model), filler_fp)
    todo = [c for c in cells if not result.done(example_key(*c))]
    with tqdm(total=sum(L for L, _, _ in todo), desc=TASK, unit="tok", unit_scale=True) as bar:
        for L, d, t in todo:
            rng = random.Random(f"{opts.seed}:{L}:{d:g}:{t}")
            key = str(rng.randint(10000, 99999))
            p = build_prompt(tok, sentences, L, d, key, first_sentence=rng.randrange(len(sentences)))
            t0 = time.perf_counter()
            detail = trial(model, tok, p, memory_size, opts.new_tokens)
            result.add(example_key(L, d, t), {"length": L, "depth": d, "trial": t, "key": key, "tokens": len(p.ids),
                                              "key_start": p.key_start, **detail,
                                              "seconds": round(time.perf_counter() - t0, 3),
                                              "peak_rss_mib": round(peak_rss_mib(), 1)})
            bar.update(L)
    summary = summarize([result.examples[example_key(*c)] for c in cells], memory_size, model.config.segment_length)
    text = table(summary)
    result.finish(summary, text)
    print(text)
    return summary
