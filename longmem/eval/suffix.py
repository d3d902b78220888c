"""`suffix`: ChapterBreak-style suffix identification: which opening really comes next?

For a chapter boundary of a book, the prefix (everything before the boundary's heading,
capped at `max_prefix` tokens) is read as LongMem reads a long input: its last
`segment_length - opening_tokens` tokens stay in the local context, everything before them
goes into a fresh memory (`model.memorize`). The candidates are the true next chapter's
opening and `negatives` openings of other chapters of the same book (the first
`opening_tokens` tokens after each heading; headings are never part of a candidate). Each
candidate follows the local context in one forward pass and is scored by its log-likelihood,

- with the memory, read but never written (`update_memory=False`), so every candidate sees
  the very same memory;
- without it: the same local context, an empty memory (plain local attention).

A model is right when the true opening scores highest, by mean log-prob per token
(length-normalised) or by the sum. The two agree whenever every candidate has the full
`opening_tokens` tokens (the usual case in novels); they differ only for short chapters.

Negatives come from *later* chapters by default (ChapterBreak's hard negatives): an earlier
chapter's opening is text the prefix, and so the memory, already holds, which a memory model
could recognise as seen rather than judge as a continuation. `negatives_from="any"` allows
every other chapter.

Chapter boundaries: a heading is a line of its own made of CHAPTER/Chapter/ACT/Act/SCENE/
Scene, a roman or arabic numeral or a number word, and optionally `.`, `:` or `-` and a short
title ("SCENE II. A street."). Headings with only blank lines between them (ACT 1 / SCENE 1)
form one boundary; the opening is the text after the last of them. A chapter is a candidate
only if its body has at least MIN_OPENING_TOKENS tokens. The first chapter is never a
boundary (its prefix is front matter only), nor is one without `negatives` eligible others.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field

import torch

from longmem.errors import LongMemError
from longmem.eval.common import EvalOptions, data_fingerprint, markdown_table, options_dict
from longmem.eval.runner import Item, Plan, Task
from longmem.eval.scoring import score_continuations

TASK = "suffix"
MIN_OPENING_TOKENS = 16

_WORDS = ("(?i:(?:twenty|thirty|forty|fifty|sixty|seventy|eighty|ninety|one|two|three|four|five|six|seven|eight|nine|"
          "ten|eleven|twelve|thirteen|fourteen|fifteen|sixteen|seventeen|eighteen|nineteen)"
          "(?:[- ](?:one|two|three|four|five|six|seven|eight|nine))?)")
HEADING = re.compile(r"^[ \t]*(?:CHAPTER|Chapter|ACT|Act|SCENE|Scene)[ \t]+(?:[IVXLCDM]+|\d+|" + _WORDS + r")\b"
                     r"(?:[ \t]*[.:\-\u2014][^\n]{0,100})?[ \t]*$", re.MULTILINE)


@dataclass
class SuffixOptions(EvalOptions):
    opening_tokens: int = field(default=128, metadata={"help": "tokens of each chapter opening (a candidate)"})
    negatives: int = field(default=5, metadata={"help": "wrong openings per boundary (chance = 1/(negatives+1))"})
    negatives_from: str = field(default="later", metadata={
        "help": "later: negatives from chapters after the boundary (ChapterBreak); any: any other chapter"})
    max_prefix: int = field(default=0, metadata={
        "help": "prefix tokens read before a boundary (0: what fits, memory_size + segment_length - opening_tokens)"})
    memory_size: int = field(default=0, metadata={"help": "memory capacity in tokens (0: the model's)"})


# ---- chapters and examples -------------------------------------------------------------------
@dataclass
class Chapter:
    heading: str     # the heading line(s), stripped
    start: int       # character offset of the (first) heading
    body_start: int  # first non-blank character after the (last) heading
    end: int         # where the body ends: the next chapter's start, or the end of the text


def find_chapters(text: str) -> list[Chapter]:
    """Chapters of a book, in order: consecutive headings with only blank lines between them are one."""
    groups: list[list[re.Match]] = []
    for m in HEADING.finditer(text):
        if groups and not text[groups[-1][-1].end():m.start()].strip():
            groups[-1].append(m)
        else:
            groups.append([m])
    chapters = []
    for i, g in enumerate(groups):
        end = groups[i + 1][0].start() if i + 1 < len(groups) else len(text)
        body = g[-1].end()
        body += len(text[body:end]) - len(text[body:end].lstrip())
        chapters.append(Chapter(" / ".join(m.group().strip() for m in g), g[0].start(), body, end))
    return chapters


@dataclass
class SuffixExample:
    key: str                      # "<book id>#<chapter index>"
    book: str
    chapter: int                  # index of the gold chapter in find_chapters(book)
    heading: str
    prefix: list[int]             # the capped prefix: memory part + local context
    candidates: list[list[int]]   # openings, in the (seeded, shuffled) order they are scored
    candidate_chapters: list[int]
    gold: int                     # position of the true opening in `candidates`


def tokenize(tok, texts: list[str]) -> list[list[int]]:
    return tok(texts, add_special_tokens=False)["input_ids"] if texts else []


def book_examples(book_id: str, text: str, tok, opening_tokens: int, negatives: int, max_prefix: int,
                  seed: int, negatives_from: str = "later") -> list[SuffixExample]:
    """Every usable boundary of one book, its candidates chosen with a per-boundary seed."""
    if negatives_from not in ("later", "any"):
        raise LongMemError(f"--negatives-from {negatives_from!r} is not one of: later, any")
    chapters = find_chapters(text)
    if len(chapters) < 2:
        return []
    # Tokenise the book piecewise (front matter, then each heading and body) so that prefixes are slices.
    pieces = [text[:chapters[0].start]]
    for c in chapters:
        pieces += [text[c.start:c.body_start], text[c.body_start:c.end]]
    ids = tokenize(tok, pieces)
    flat, starts = [], []  # the book's tokens; starts[i]: where chapter i's heading starts in them
    flat += ids[0]
    for i in range(len(chapters)):
        starts.append(len(flat))
        flat += ids[1 + 2 * i] + ids[2 + 2 * i]
    openings = [ids[2 + 2 * i][:opening_tokens] for i in range(len(chapters))]
    eligible = [i for i, o in enumerate(openings) if len(o) >= MIN_OPENING_TOKENS]
    out = []
    for i in eligible:
        if i == 0:
            continue
        pool = [j for j in eligible if (j > i if negatives_from == "later" else j != i)]
        if len(pool) < negatives:
            continue
        rng = random.Random(f"suffix:{seed}:{book_id}:{i}")
        order = [i] + rng.sample(pool, negatives)
        rng.shuffle(order)
        prefix = flat[max(0, starts[i] - max_prefix):starts[i]]
        out.append(SuffixExample(f"{book_id}#{i}", book_id, i, chapters[i].heading, prefix,
                                 [openings[j] for j in order], order, order.index(i)))
    return out


def evaluate(model, ex: SuffixExample, memory_size: int | None) -> dict:
    """One boundary: score the candidates with the memory of the prefix and without it."""
    n_local = model.config.segment_length - max(len(c) for c in ex.candidates)
    local, past = ex.prefix[-n_local:], ex.prefix[:-n_local]
    memory = model.new_memory(1, memory_size=memory_size)
    if past:
        model.memorize(torch.tensor([past], device=model.device), memory)
    with_memory = score_continuations(model, local, ex.candidates, memory)
    without = score_continuations(model, local, ex.candidates, None)
    return {"book": ex.book, "chapter": ex.chapter, "heading": ex.heading, "candidate_chapters": ex.candidate_chapters,
            "gold": ex.gold, "prefix_tokens": len(ex.prefix), "local_tokens": len(local), "memory_tokens": len(memory),
            "candidate_tokens": [len(c) for c in ex.candidates],
            "memory": {"sum": with_memory.sums, "mean": with_memory.means},
            "no_memory": {"sum": without.sums, "mean": without.means}}


def argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))


def wilson(right: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval (percent) of an accuracy of right/n."""
    if n == 0:
        return 0.0, 100.0
    p = right / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return 100.0 * (centre - half) / (1 + z * z / n), 100.0 * (centre + half) / (1 + z * z / n)


def paired_difference(a: list[bool], b: list[bool], z: float = 1.96) -> dict:
    """Accuracy of a minus accuracy of b on the same examples (percent points), with its 95% interval (normal
    approximation of the mean of the per-example differences in {-1, 0, 1}) and the discordant counts."""
    n = len(a)
    d = [int(x) - int(y) for x, y in zip(a, b)]
    mean = sum(d) / max(n, 1)
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    half = z * math.sqrt(var / n) if n else 0.0
    return {"points": 100.0 * mean, "low": 100.0 * (mean - half), "high": 100.0 * (mean + half),
            "only_a": sum(x > 0 for x in d), "only_b": sum(x < 0 for x in d)}


def summarize(details: list[dict], negatives: int) -> tuple[dict, str]:
    n = len(details)
    right = {cond: {how: [argmax(d[cond][how]) == d["gold"] for d in details] for how in ("mean", "sum")}
             for cond in ("memory", "no_memory")}
    acc = {cond: {how: 100.0 * sum(r) / max(n, 1) for how, r in hows.items()} for cond, hows in right.items()}
    interval = {cond: {how: wilson(sum(r), n) for how, r in hows.items()} for cond, hows in right.items()}
    gain = {how: paired_difference(right["memory"][how], right["no_memory"][how]) for how in ("mean", "sum")}
    chance = 100.0 / (negatives + 1)
    summary = {"examples": n, "books": sorted({d["book"] for d in details}), "chance": chance,
               "accuracy": acc,  # percent; "mean": length-normalised, "sum": raw log-likelihood
               "interval95": interval,  # Wilson 95% interval of each accuracy
               "memory_minus_no_memory": gain,  # paired, percent points, with its 95% interval
               "mean_memory_tokens": sum(d["memory_tokens"] for d in details) / max(n, 1),
               "mean_local_tokens": sum(d["local_tokens"] for d in details) / max(n, 1)}

    def cell(cond, how):
        lo, hi = interval[cond][how]
        return f"{acc[cond][how]:.1f} [{lo:.1f}, {hi:.1f}]"

    def diff(how):
        g = gain[how]
        return f"{g['points']:+.1f} [{g['low']:+.1f}, {g['high']:+.1f}] ({g['only_a']} vs {g['only_b']})"

    rows = [[label, cell("memory", how), cell("no_memory", how), diff(how), f"{chance:.2f}"]
            for label, how in (("length-normalised (mean log-prob)", "mean"), ("raw (sum of log-probs)", "sum"))]
    table = markdown_table([f"suffix accuracy % ({n} boundaries), 95% interval", "with memory", "without memory",
                            "with - without, points (boundaries only one gets right)", "chance"], rows)
    return summary, table


# ---- the task ----------------------------------------------------------------------------------
class SuffixTask(Task):
    name, unit = TASK, "boundary"

    def check(self):
        opts = self.opts
        if opts.negatives < 1:
            raise LongMemError(f"--negatives {opts.negatives} must be at least 1")
        if opts.negatives_from not in ("later", "any"):
            raise LongMemError(f"--negatives-from {opts.negatives_from!r} is not one of: later, any")

    def plan(self) -> Plan:
        from longmem.data.documents import load_documents

        opts, T = self.opts, self.model.config.segment_length
        self.memory_size = opts.memory_size or self.model.config.memory_size
        if not MIN_OPENING_TOKENS <= opts.opening_tokens < T:
            raise LongMemError(f"--opening-tokens {opts.opening_tokens} must be between {MIN_OPENING_TOKENS} and "
                               f"segment_length - 1 = {T - 1} (the local context needs room)")
        max_prefix = opts.max_prefix or self.memory_size + T - opts.opening_tokens
        examples, used = [], []
        for doc in load_documents(opts.data, split="dev"):
            if len(HEADING.findall(doc.text)) < opts.negatives + 2:
                continue
            found = book_examples(doc.id, doc.text, self.tok, opts.opening_tokens, opts.negatives, max_prefix,
                                  opts.seed, opts.negatives_from)
            if found:
                examples += found
                used.append(f"{doc.id}\n{doc.text}")
        if not examples:
            raise LongMemError(f"no usable chapter boundary in {opts.data}: a book needs headings like 'CHAPTER I', "
                               f"'Chapter 1', 'ACT II' or 'SCENE 3.' on lines of their own, and at least "
                               f"{opts.negatives + 2} chapters of {MIN_OPENING_TOKENS}+ tokens")
        if opts.limit is not None:
            examples = examples[:opts.limit]
        config = options_dict(opts, resolved_max_prefix=max_prefix, resolved_memory_size=self.memory_size)
        intro = (f"suffix: {len(examples)} boundaries in {len(used)} books; local context "
                 f"{T - opts.opening_tokens} tokens, memory up to {self.memory_size:,} tokens")
        return Plan(config, data_fingerprint(used), [Item(ex.key, 1, ex) for ex in examples], intro)

    def evaluate_one(self, item: Item) -> dict:
        return evaluate(self.model, item.data, self.memory_size)

    def summarize(self, details):
        return summarize(details, self.opts.negatives)


def run(opts: SuffixOptions) -> dict:
    """Suffix identification over the chapter boundaries of the dev books (or the user's books) in --data."""
    return SuffixTask(opts).run()
