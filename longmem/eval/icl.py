"""`icl`: memory-augmented in-context learning (paper §5: demonstrations in memory + in context).

Per dataset and seed, `memory_demos` labelled demonstrations (default 2,000) are written into a
fresh memory and `context_demos` (default 20) more precede every test example in the local
context; all are sampled with the seed from a train pool, the test examples from a disjoint
test pool. Each example is verbalised with a per-dataset template,

    Review: <text>\\nSentiment: positive\\n\\n

and a test example ends after "Sentiment:". Two predictions are read off:

- label likelihood: the label whose verbalisation (" positive") has the highest sum of
  token log-probs right after the prompt (one forward pass of prompt + label each);
- argmax next token (the paper's rule): the label whose *first* token has the highest
  next-token probability after the prompt. Labels sharing a first token tie; the first in
  the dataset's label order wins, and the summary lists such labels.

Rows: the k demonstrations in context only (empty memory), and k in context + N in memory
(read, never written while scoring). Accuracies are mean ± sample std over the seeds.

Details that shape the numbers:
- a demonstration's (and test example's) text is cut to its first `max_demo_tokens` tokens;
- when the k demonstrations, the test prompt and the longest label do not fit in one segment,
  demonstrations are dropped from the front (oldest first); `context_demos` per example records
  how many fit;
- when the N demonstrations exceed the memory capacity, the oldest are evicted (FIFO); the
  summary gives how many are held;
- pools: the test pool is a fixed `test_fraction` of the examples chosen by a hash of the text
  (the same for every seed and run); for `brown-genres` from a prepared folder, the test pool is
  the paragraphs of the *dev* Brown files (10 of the 15 genres occur there) and the train pool
  the rest, so no test paragraph was seen in training; the label set is always every label.
"""

from __future__ import annotations

import hashlib
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from longmem.errors import LongMemError
from longmem.eval.common import EvalOptions, data_fingerprint, markdown_table, options_dict
from longmem.eval.runner import Item, Plan, Task
from longmem.eval.scoring import score_continuations
from longmem.memory import held_span

TASK = "icl"


@dataclass
class IclOptions(EvalOptions):
    datasets: str = field(default="vader-movies,vader-tweets,brown-genres", metadata={
        "help": "comma-separated named sets of the prepared --data folder (unused if --data is a label<TAB>text file)"})
    memory_demos: int = field(default=2000, metadata={"help": "demonstrations written into memory (N)"})
    context_demos: int = field(default=20, metadata={"help": "demonstrations in the local context (k)"})
    seeds: int = field(default=6, metadata={
        "help": "seeds (--seed, --seed+1, ...): each samples demonstrations and tests"})
    examples: int = field(default=200, metadata={"help": "test examples per seed and dataset (--limit caps it too)"})
    max_demo_tokens: int = field(default=64, metadata={"help": "tokens kept of each example's text (the rest is cut)"})
    test_fraction: float = field(default=0.3, metadata={"help": "share of a dataset held out as the test pool"})
    memory_size: int = field(default=0, metadata={"help": "memory capacity in tokens (0: the model's)"})


# ---- datasets and prompts ----------------------------------------------------------------------
@dataclass(frozen=True)
class Template:
    text_prefix: str   # before the text: "Review:"
    label_prefix: str  # between the text and the label: "\nSentiment:"
    end: str = "\n\n"  # after the label


TEMPLATES = {"vader-movies": Template("Review:", "\nSentiment:"),
             "vader-tweets": Template("Tweet:", "\nSentiment:"),
             "brown-genres": Template("Text:", "\nGenre:")}
USER_TEMPLATE = Template("Input:", "\nLabel:")


def label_word(label: str) -> str:
    return label.replace("_", " ")  # brown's "science_fiction" reads as "science fiction"


@dataclass
class Dataset:
    name: str
    labels: list[str]  # every label of the dataset, sorted: the candidates of every prediction
    train: list        # LabelledText pool of demonstrations
    test: list         # LabelledText pool of test examples, disjoint from train
    template: Template
    split: str         # how train/test were split, in words


def _held_out(text: str, fraction: float) -> bool:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % 10_000 < fraction * 10_000


def load_datasets(opts: IclOptions) -> list[Dataset]:
    from longmem.data.documents import load_documents, load_labelled

    if not 0 < opts.test_fraction < 1:
        raise LongMemError(f"--test-fraction {opts.test_fraction} must be between 0 and 1")
    if Path(opts.data).is_file():
        named = [(Path(opts.data).stem, load_labelled(opts.data), USER_TEMPLATE)]
    else:
        names = [n.strip() for n in opts.datasets.split(",") if n.strip()]
        if not names:
            raise LongMemError("--datasets is empty; name at least one of vader-movies, vader-tweets, brown-genres")
        named = [(n, load_labelled(n, prepared_dir=opts.data), TEMPLATES.get(n, USER_TEMPLATE)) for n in names]
    out = []
    for name, examples, template in named:
        dev = set()
        if name == "brown-genres" and (Path(opts.data) / "manifest.json").is_file():
            dev = {p.strip() for d in load_documents(opts.data, "dev") if d.source == "brown"
                   for p in d.text.split("\n\n")}
        if dev:
            test = [e for e in examples if e.text in dev]
            train = [e for e in examples if e.text not in dev]
            split = "test: paragraphs of the dev Brown files; train: the rest"
        else:
            test = [e for e in examples if _held_out(e.text, opts.test_fraction)]
            train = [e for e in examples if not _held_out(e.text, opts.test_fraction)]
            split = f"test: {opts.test_fraction:.0%} of the examples by a hash of the text; train: the rest"
        labels = sorted({e.label for e in examples})
        if len(labels) < 2 or not test or not train:
            raise LongMemError(f"dataset {name} has {len(labels)} label(s), {len(train)} train and {len(test)} test "
                               f"examples; it needs 2+ labels and examples in both pools")
        out.append(Dataset(name, labels, train, test, template, split))
    return out


class Prompter:
    """Token ids of demonstrations, test prompts and label continuations for one dataset."""

    def __init__(self, tok, template: Template, labels: list[str], max_text_tokens: int):
        self.tok, self.template, self.cap = tok, template, max_text_tokens
        self._cache: dict[str, list[int]] = {}
        self.label_ids = {label: self.ids(" " + label_word(label)) for label in labels}

    def ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self._cache[text]

    def query(self, text: str) -> list[int]:
        """'Review: <text>\\nSentiment:' with the text cut to its first max_text_tokens tokens."""
        t = self.template
        return self.ids(t.text_prefix) + self.ids(" " + text)[:self.cap] + self.ids(t.label_prefix)

    def demo(self, example) -> list[int]:
        return self.query(example.text) + self.label_ids[example.label] + self.ids(self.template.end)

    def context(self, demos: list[list[int]], query: list[int], segment_length: int) -> tuple[list[int], int]:
        """The longest suffix of `demos` that fits with query and any label: (prompt ids, demos kept)."""
        room = segment_length - len(query) - max(len(ids) for ids in self.label_ids.values())
        if room < 0:
            raise LongMemError(f"a test prompt of {len(query)} tokens and its label do not fit in segment_length="
                               f"{segment_length}; lower --max-demo-tokens")
        kept, used = 0, 0
        for d in reversed(demos):
            if used + len(d) > room:
                break
            kept, used = kept + 1, used + len(d)
        return [t for d in demos[len(demos) - kept:] for t in d] + query, kept


def score_labels(model, prompter: Prompter, prompt: list[int], memory=None) -> dict:
    """Per label: sum of its tokens' log-probs after `prompt`, and the next-token log-prob of its first token."""
    labels = list(prompter.label_ids)
    s = score_continuations(model, prompt, [prompter.label_ids[label] for label in labels], memory)
    return {"label_logprob": dict(zip(labels, s.sums)),
            "next_token_logprob": {label: float(s.next_token[prompter.label_ids[label][0]]) for label in labels}}


def predict(scores: dict[str, float], labels: list[str]) -> str:
    return max(labels, key=lambda label: (scores[label], -labels.index(label)))


# ---- one seed --------------------------------------------------------------------------------
@dataclass
class SeedPlan:
    seed: int
    context: list                # k demonstrations for the local context (LabelledText)
    memory: list                 # N demonstrations for the memory
    tests: list[tuple[int, object]]  # (test pool index, LabelledText), in evaluation order


def plan_seed(ds: Dataset, seed: int, memory_demos: int, context_demos: int, n_test: int) -> SeedPlan:
    rng = random.Random(f"icl:{ds.name}:{seed}")
    picked = [ds.train[i] for i in rng.sample(range(len(ds.train)), min(len(ds.train), memory_demos + context_demos))]
    order = list(range(len(ds.test)))
    rng.shuffle(order)  # a full permutation, so a smaller --limit evaluates a prefix of the same tests
    return SeedPlan(seed, picked[:context_demos], picked[context_demos:], [(i, ds.test[i]) for i in order[:n_test]])


def memory_stats(demo_lengths: list[int], capacity: int, chunk_size: int) -> dict:
    """What a memory of `capacity` tokens holds after the demonstrations are written in order.

    The stream positions it holds are those `held_span` gives (the bank's own eviction rule). A
    demonstration counts as held unless some of its tokens were evicted."""
    total = sum(demo_lengths)
    first_kept, end = held_span(total, capacity, chunk_size)
    held_tokens = end - first_kept
    start, evicted_demos = 0, 0
    for n in demo_lengths:
        evicted_demos += start < first_kept
        start += n
    return {"demo_tokens": total, "held_tokens": held_tokens, "demos_held": len(demo_lengths) - evicted_demos,
            "evicted": first_kept > 0}


# ---- summary ---------------------------------------------------------------------------------
CONDITIONS = {"no_memory": "k in context, empty memory", "memory": "k in context + N in memory"}


def _mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.1f}"


def summarize(ds_details: dict[str, list[dict]], labels: dict[str, list[str]],
              mem: dict[str, dict]) -> tuple[dict, str]:
    summary, rows = {}, []
    averages = {c: {"label_logprob": [], "next_token_logprob": []} for c in CONDITIONS}
    for name, details in ds_details.items():
        seeds = sorted({d["seed"] for d in details})
        s = {"labels": labels[name], "seeds": seeds, "examples_per_seed": len(details) // max(len(seeds), 1),
             "mean_context_demos": statistics.mean(d["context_demos"] for d in details),
             "chance": 100.0 / len(labels[name])}
        bank = {k: v for k, v in mem[name].items() if k != "per_seed"}
        per_seed_bank = mem[name]["per_seed"]
        bank.update(demo_tokens=statistics.mean(b["demo_tokens"] for b in per_seed_bank),
                    demos_held=statistics.mean(b["demos_held"] for b in per_seed_bank),
                    evicted=any(b["evicted"] for b in per_seed_bank))
        s["memory_bank"] = bank
        firsts: dict[int, list[str]] = {}
        for label, first in mem[name]["first_tokens"].items():
            firsts.setdefault(first, []).append(label)
        s["labels_sharing_a_first_token"] = [group for group in firsts.values() if len(group) > 1]
        counts = {label: sum(d["gold"] == label for d in details) for label in labels[name]}
        s["majority"] = 100.0 * max(counts.values()) / len(details)
        for cond in CONDITIONS:
            s[cond] = {}
            for how in ("label_logprob", "next_token_logprob"):
                per_seed = [100.0 * statistics.mean(predict(d[cond][how], labels[name]) == d["gold"]
                                                    for d in details if d["seed"] == seed) for seed in seeds]
                s[cond][how] = {"per_seed": per_seed, "mean": statistics.mean(per_seed),
                                "std": statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0}
                averages[cond][how].append(statistics.mean(per_seed))
            held = f"{bank['demos_held']:.0f}" if cond == "memory" else "0"
            rows.append([name, CONDITIONS[cond], _mean_std(s[cond]["label_logprob"]["per_seed"]),
                         _mean_std(s[cond]["next_token_logprob"]["per_seed"]), f"{s['mean_context_demos']:.1f}", held])
        rows.append([name, "chance (1 / labels)", f"{s['chance']:.1f}", f"{s['chance']:.1f}", "", ""])
        rows.append([name, "always the majority test label", f"{s['majority']:.1f}", f"{s['majority']:.1f}", "", ""])
        summary[name] = s
    if len(ds_details) > 1:
        for cond in CONDITIONS:
            a = averages[cond]
            rows.append(["average", CONDITIONS[cond], f"{statistics.mean(a['label_logprob']):.1f}",
                         f"{statistics.mean(a['next_token_logprob']):.1f}", "", ""])
        summary["average"] = {cond: {how: statistics.mean(v) for how, v in a.items()} for cond, a in averages.items()}
    table = markdown_table(["dataset", "condition", "accuracy % (label likelihood)", "accuracy % (argmax next token)",
                            "demos in context (mean)", "demos in memory"], rows)
    return summary, table


# ---- the task ----------------------------------------------------------------------------------
class IclTask(Task):
    name = TASK

    def check(self):
        opts = self.opts
        for flag, v in (("--memory-demos", opts.memory_demos), ("--context-demos", opts.context_demos),
                        ("--max-demo-tokens", opts.max_demo_tokens)):
            least = 1 if flag == "--max-demo-tokens" else 0
            if v < least:
                raise LongMemError(f"{flag} {v} must be at least {least}")
        if opts.seeds < 1 or opts.examples < 1:
            raise LongMemError("--seeds and --examples must be at least 1")

    def plan(self) -> Plan:
        opts, T = self.opts, self.model.config.segment_length
        self.capacity = opts.memory_size or self.model.config.memory_size
        self.datasets = load_datasets(opts)
        n_test = min(opts.examples, opts.limit) if opts.limit is not None else opts.examples
        fp = data_fingerprint(f"{ds.name}\t{e.label}\t{e.text}" for ds in self.datasets for e in ds.train + ds.test)
        self.jobs = []  # (dataset, prompter, plan, [(key, pool index, example)]), one per dataset and seed
        items = []
        for ds in self.datasets:
            if len(ds.train) < opts.memory_demos + opts.context_demos:
                print(f"note: {ds.name} has {len(ds.train)} train examples, fewer than --memory-demos + "
                      f"--context-demos = {opts.memory_demos + opts.context_demos}; the memory gets "
                      f"{max(0, len(ds.train) - opts.context_demos)}")
            prompter = Prompter(self.tok, ds.template, ds.labels, opts.max_demo_tokens)
            for seed in range(opts.seed, opts.seed + opts.seeds):
                plan = plan_seed(ds, seed, opts.memory_demos, opts.context_demos, n_test)
                keys = [(f"{ds.name}/{seed}/{j}", i, e) for j, (i, e) in enumerate(plan.tests)]
                self.jobs.append((ds, prompter, plan, keys))
                items += [Item(k, 1, (ds.name, seed)) for k, _, _ in keys]
        self.mem_info = self._memory_info()
        intro = (f"icl: {len(self.datasets)} dataset(s) x {opts.seeds} seeds x {n_test} tests = {len(items)} "
                 f"examples; N={opts.memory_demos} in memory (capacity {self.capacity:,} tokens), "
                 f"k={opts.context_demos} in context of {T} tokens")
        return Plan(options_dict(opts, resolved_memory_size=self.capacity), fp, items, intro)

    def _memory_info(self) -> dict[str, dict]:
        """Per dataset: what the memory holds for each seed (from the bank's eviction rule) and the labels' tokens."""
        info: dict[str, dict] = {}
        for ds, prompter, plan, _ in self.jobs:
            stats = memory_stats([len(prompter.demo(e)) for e in plan.memory], self.capacity,
                                 self.model.config.chunk_size)
            entry = info.setdefault(ds.name, {"first_tokens": {lb: ids[0] for lb, ids in prompter.label_ids.items()},
                                              "split": ds.split, "train_pool": len(ds.train),
                                              "test_pool": len(ds.test), "capacity": self.capacity, "per_seed": []})
            entry["per_seed"].append(stats)
        return info

    def evaluate(self, todo, result, bar):
        T = self.model.config.segment_length
        for ds, prompter, plan, keys in self.jobs:
            if all(result.done(k) for k, _, _ in keys):
                continue
            memory = self.model.new_memory(1, memory_size=self.capacity)
            demo_ids = [prompter.demo(e) for e in plan.memory]
            if demo_ids:
                self.model.memorize(torch.tensor([[t for d in demo_ids for t in d]], device=self.model.device), memory)
            context = [prompter.demo(e) for e in plan.context]
            for key, index, example in keys:
                if result.done(key):
                    continue
                prompt, kept = prompter.context(context, prompter.query(example.text), T)
                result.add(key, {"dataset": ds.name, "seed": plan.seed, "index": index, "gold": example.label,
                                 "context_demos": kept, "prompt_tokens": len(prompt),
                                 "no_memory": score_labels(self.model, prompter, prompt),
                                 "memory": score_labels(self.model, prompter, prompt, memory)})
                bar.update(1)

    def summarize(self, details):
        by_name: dict[str, list[dict]] = {ds.name: [] for ds in self.datasets}
        for d in details:
            by_name[d["dataset"]].append(d)
        return summarize(by_name, {ds.name: ds.labels for ds in self.datasets}, self.mem_info)

    def notes(self, summary):
        out = []
        for name, s in summary.items():
            m = s.get("memory_bank")
            if m and m["evicted"]:
                out.append(f"note: {name}: the {self.opts.memory_demos} demonstrations take {m['demo_tokens']:,.0f} "
                           f"tokens, more than the memory's {self.capacity:,}; the oldest were evicted, "
                           f"{m['demos_held']:.0f} are held (mean over seeds)")
        return out


def run(opts: IclOptions) -> dict:
    """In-context learning with k demonstrations in context, with and without N more in memory."""
    return IclTask(opts).run()
