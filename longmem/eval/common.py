"""What every evaluation task shares: options, the model, and a resumable JSON result file.

A result file holds the task's config, the checkpoint and data fingerprints, one entry per
finished example (its detail) and, once complete, the summary and the markdown table. It is
rewritten atomically after every example, so an interrupted run resumes where it stopped:
`ResultFile.open` keeps the finished examples if the task, config and fingerprints match,
and refuses (one-line error) to mix results of a different run into the same file.
"""

from __future__ import annotations

import hashlib
import json
import resource
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

from longmem.errors import LongMemError
from longmem.io import read_json, write_json

FORMAT = "longmem.eval/1"


@dataclass
class EvalOptions:
    """Options common to every `longmem eval` task."""
    model: str = "default"
    """LongMem checkpoint folder, or 'default' (the shipped model)."""
    data: str = "data/prepared"
    """A file or folder of documents (or, for icl, a label<TAB>text file or a named set)."""
    out: str = ""
    """Result JSON file (default: results/<task>.json)."""
    limit: int | None = None
    """Evaluate at most this many examples/documents (a quick run)."""
    seed: int = 0
    """Seed for every random choice of the task."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    retriever: str = ""
    """Memory search backend: exact, faiss-ivf, faiss-hnsw or torch-ivf (default: the model's)."""


def model_fingerprint(path: str) -> str:
    """Backbone fingerprint + hash of the SideNet weights: which checkpoint produced the numbers."""
    from longmem.checkpoint import CONFIG_FILE, WEIGHTS_FILE, resolve_model_path

    root = resolve_model_path(path)
    backbone = read_json(root / CONFIG_FILE)["backbone"]["fingerprint"]
    return f"{backbone}-{hashlib.sha256((root / WEIGHTS_FILE).read_bytes()).hexdigest()[:16]}"


def data_fingerprint(items: Iterable[str]) -> str:
    """Hash of the evaluated texts (document ids and contents, or examples), in order."""
    h = hashlib.sha256()
    for text in items:
        h.update(hashlib.sha256(text.encode()).digest())
    return h.hexdigest()[:16]


class ResultFile:
    def __init__(self, path: Path, data: dict):
        self.path, self.data = path, data

    @classmethod
    def open(cls, path: str | Path, task: str, config: dict, model_fp: str, data_fp: str) -> "ResultFile":
        path = Path(path)
        header = {"format": FORMAT, "task": task, "config": json.loads(json.dumps(config)),
                  "model_fingerprint": model_fp, "data_fingerprint": data_fp}
        if path.is_file():
            old = read_json(path, "result file")
            if {k: old.get(k) for k in header} != header:
                raise LongMemError(f"{path} holds results of a different run (task, config, model or data differ); "
                                   f"pass another --out, or delete it to start over")
            return cls(path, old)
        return cls(path, {**header, "examples": {}, "summary": None, "table": None})

    @property
    def examples(self) -> dict[str, Any]:
        return self.data["examples"]

    def done(self, key: str) -> bool:
        return key in self.examples

    def add(self, key: str, detail: Any) -> None:
        self.examples[key] = detail
        write_json(self.path, self.data)

    def finish(self, summary: dict, table: str) -> None:
        self.data["summary"], self.data["table"] = summary, table
        write_json(self.path, self.data)


def options_dict(opts: EvalOptions, **task_options) -> dict:
    """The config recorded in the result file: what changes the numbers (not where they go)."""
    d = asdict(opts)
    d.pop("out")
    d.pop("device")
    return {**d, **task_options}


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def parse_list(text: str, kind: type, flag: str) -> list:
    """'8192,16384' -> [8192, 16384]; a bad item raises a one-line error naming `flag`."""
    try:
        items = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LongMemError(f"{flag} {text!r} is not a comma-separated list of {kind.__name__}s, e.g. "
                           f"{flag} {'8192,16384' if kind is int else '0.1,0.5'}") from None
    if not items:
        raise LongMemError(f"{flag} is empty; give at least one value")
    return items


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
