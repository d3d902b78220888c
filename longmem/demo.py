"""`longmem demo`: the whole method on a CPU in a few minutes, with the shipped default model.

Reads a held-out novel (Austen's *Persuasion*, never trained on) into memory segment by
segment, then scores the book's last part three ways on the very same local segments: the
frozen backbone alone, LongMem with its memory disabled, and LongMem with its memory. It
then looks at the tokens that matter for long-term memory (words absent from the local
segment but present earlier in the book), and shows a greedy continuation with and
without memory for the first such place.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from longmem.errors import LongMemError
from longmem.eval.scoring import BackboneScorer, LocalScorer, MemoryScorer, score_document


@dataclass
class DemoConfig:
    model: str = "default"
    """LongMem checkpoint folder, or 'default'."""
    data_dir: str = "data/prepared"
    """Prepared data (the Austen source is prepared here if missing)."""
    book: str = "austen/persuasion"
    """Document id of the dev book to read."""
    score_tokens: int = 8192
    """How many of the book's last tokens to score (the rest is read into memory first)."""
    device: str = "auto"
    retriever: str | None = None
    """Memory search backend (None: the model's)."""


def load_book(cfg: DemoConfig):
    from longmem.data.documents import load_documents
    from longmem.data.prepare import prepare

    root = Path(cfg.data_dir)
    source = cfg.book.split("/")[0]
    if not (root / "manifest.json").is_file() or not any(root.glob(f"*/{source}")):
        print(f"preparing the {source} source into {root} (one download, a few seconds)")
        prepare(root, sources=[source], show_progress=False)
    docs = {d.id: d for d in load_documents(root, split="dev")}
    if cfg.book not in docs:
        raise LongMemError(f"--book {cfg.book} is not a dev document of {root}; choose one of "
                           f"{', '.join(sorted(docs)[:8])}, ...")
    return docs[cfg.book].text


def run_demo(cfg: DemoConfig) -> None:
    from longmem.runtime import autocast, load_model

    t0 = time.time()
    model, tok = load_model(cfg.model, cfg.device)
    model.config.retriever = cfg.retriever or model.config.retriever  # what every new memory searches with
    text = load_book(cfg)
    ids = torch.tensor(tok(text)["input_ids"])
    T, M = model.config.segment_length, model.config.memory_size
    score_from = max(0, len(ids) - cfg.score_tokens)
    print(f"{cfg.book}: {len(ids):,} tokens; segments of {T} tokens; memory capacity {M:,} tokens; "
          f"scoring the last {len(ids) - score_from:,} tokens")
    results = {}
    with autocast(model.device):
        for scorer in (BackboneScorer(model), LocalScorer(model), MemoryScorer(model)):
            start = time.time()
            results[scorer.name] = score_document(scorer, ids, score_from, show_progress=True)
            memory = getattr(scorer, "memory", None)
            extra = f", memory {len(memory):,} tokens" if memory is not None else ""
            print(f"  {scorer.name:<18} {time.time() - start:6.1f} s{extra}")
    first = results["longmem_memory"].first_target
    far = far_reference_mask(ids, first, T)  # (n,) targets unseen locally but seen earlier in the book
    print()
    print("| model | perplexity | perplexity on far-reference tokens |")
    print("|---|---:|---:|")
    labels = {"backbone": "frozen backbone, local segment only",
              "longmem_no_memory": "LongMem, memory disabled",
              "longmem_memory": f"LongMem, memory ({len(memory):,} tokens)"}
    for name, r in results.items():
        print(f"| {labels[name]} | {math.exp(r.nll):.2f} | {math.exp(float(-r.logprobs[far].mean())):.2f} |")
    print(f"\nfar-reference tokens: {int(far.sum()):,} of {len(far):,} scored tokens do not occur in their local "
          f"segment but do occur earlier in the book.")
    show_generation(model, tok, ids, far, first, T, results)
    print(f"\ndemo finished in {time.time() - t0:.0f} s")


def far_reference_mask(ids: torch.Tensor, first: int, T: int) -> torch.Tensor:
    """(n,) bool over targets ids[first:]: the target token is absent from its segment's inputs so far
    but present somewhere earlier in the document (only memory can supply it)."""
    out = []
    seen_before = set(ids[: first - 1].tolist())
    for s in range(first - 1, len(ids) - 1, T):
        local: set[int] = set()
        for i in range(s, min(s + T, len(ids) - 1)):
            local.add(int(ids[i]))
            target = int(ids[i + 1])
            out.append(target not in local and target in seen_before)
        seen_before |= local
    return torch.tensor(out, dtype=torch.bool)


def pick_example(tok, ids: torch.Tensor, far: torch.Tensor, first: int) -> int | None:
    """The first far-reference target (an index into far) that is a rare capitalised word of the book, usually a
    name: not the most favourable place, just the first. None when there is none."""
    counts = torch.bincount(ids, minlength=len(tok))

    def is_name(i: int) -> bool:
        token = int(ids[first + i])
        word = tok.decode([token])
        if not (word.startswith(" ") and word.strip()[:1].isupper() and word.strip().isalpha()
                and len(word.strip()) >= 3 and 3 <= int(counts[token]) <= 300):
            return False
        lower = tok(word.lower())["input_ids"]  # "You" is just "you" capitalised: not a name
        return not (len(lower) == 1 and int(counts[lower[0]]) > int(counts[token]))
    return next((i for i in far.nonzero().flatten().tolist() if is_name(i)), None)


def show_generation(model, tok, ids, far, first, T, results) -> None:
    from longmem.runtime import autocast

    pick = pick_example(tok, ids, far, first)
    if pick is None:
        return
    pos = first + pick                      # document index of the target token
    seg_start = (pos - 1) // T * T          # its local segment starts here
    prompt = ids[seg_start:pos][None].to(model.device)
    target = tok.decode([int(ids[pos])])
    print(f"\nexample: the book continues with {target.strip()!r}, which is not in the local segment "
          f"but appears {int((ids[:seg_start] == ids[pos]).sum())} times earlier in the book.")
    probs = {name: math.exp(float(r.logprobs[pick])) for name, r in results.items()}
    print(f"probability of {target.strip()!r} there: frozen backbone {probs['backbone']:.2%}, LongMem without "
          f"memory {probs['longmem_no_memory']:.2%}, with memory {probs['longmem_memory']:.2%}")
    print("prompt (end of the local segment): ..." + tok.decode(prompt[0, -40:].tolist()).replace("\n", " "))
    with torch.no_grad(), autocast(model.device):
        for label, use_memory in (("without memory", False), ("with memory", True)):
            memory = model.new_memory(1)
            if use_memory:
                model.memorize(ids[None, :seg_start].to(model.device), memory, show_progress=True)
            out = model.generate(prompt, memory=memory, max_new_tokens=24)  # greedy
            print(f"  {label:<15}: " + tok.decode(out[0, prompt.shape[1]:].tolist()).replace("\n", " "))
