"""The skeleton every `longmem eval` task shares: check the options, load the model, open the
resumable result file, evaluate what it does not hold yet under one progress bar, summarize,
write the summary and table, print the table.

A task subclasses `Task` and says only what is its own: `check` (before the model loads),
`plan` (the config the numbers depend on, a data fingerprint, and the work items), `evaluate`
(the items not done yet; by default one `evaluate_one` per item), `summarize` and `notes`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from longmem.eval.common import EvalOptions, ResultFile, model_fingerprint


@dataclass
class Item:
    key: str        # where its result is stored in the result file
    size: int = 1   # progress units it is worth (tokens, examples)
    data: Any = None


@dataclass
class Plan:
    config: dict            # what the numbers depend on (recorded; a resume must match it)
    data_fingerprint: str
    items: list[Item]
    intro: str = ""         # a line printed before the work starts


class Task:
    name = "task"
    unit = "example"  # what the progress bar counts

    def __init__(self, opts: EvalOptions):
        self.opts = opts
        self.model = self.tok = None

    def check(self) -> None:
        """Option checks that need no model (they run before it loads)."""

    def plan(self) -> Plan:
        raise NotImplementedError

    def evaluate(self, todo: list[Item], result: ResultFile, bar) -> None:
        """Evaluate the items not done yet, adding each result as soon as it is known; advance `bar`."""
        for item in todo:
            result.add(item.key, self.evaluate_one(item))
            bar.update(item.size)

    def evaluate_one(self, item: Item) -> Any:
        raise NotImplementedError

    def summarize(self, details: list[Any]) -> tuple[dict, str]:
        """(summary, markdown table) from the details of every item, in plan order."""
        raise NotImplementedError

    def notes(self, summary: dict) -> list[str]:
        """Lines printed after the table."""
        return []

    def run(self) -> dict:
        import torch
        from tqdm.auto import tqdm

        from longmem.runtime import autocast, load_model

        self.check()
        self.model, self.tok = load_model(self.opts.model, self.opts.device)
        self.model.config.retriever = self.opts.retriever or self.model.config.retriever  # every new memory's search
        plan = self.plan()
        result = ResultFile.open(self.opts.out or f"results/{self.name}.json", self.name, plan.config,
                                 model_fingerprint(self.opts.model), plan.data_fingerprint)
        todo = [item for item in plan.items if not result.done(item.key)]
        if plan.intro:
            print(plan.intro + f" ({len(plan.items) - len(todo)} of {len(plan.items)} already done)")
        t0 = time.time()
        with tqdm(total=sum(item.size for item in todo), desc=self.name, unit=self.unit, unit_scale=True) as bar, \
                torch.no_grad(), autocast(self.model.device):
            self.evaluate(todo, result, bar)
        summary, table = self.summarize([result.examples[item.key] for item in plan.items])
        result.finish(summary, table)
        print(table)
        for line in self.notes(summary):
            print(line)
        print(f"{len(todo)} of {len(plan.items)} items evaluated in {time.time() - t0:.1f} s; results -> {result.path}")
        return summary
