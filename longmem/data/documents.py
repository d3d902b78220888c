"""Read text back: documents for language modelling, labelled examples for in-context learning.

`load_documents` accepts a folder written by `prepare` (it has a manifest.json), or the
user's own `.txt` files (one document each) and `.jsonl` files (one document a line, in
its "text" field), as one file or a folder searched recursively. `load_labelled` reads
`label<TAB>text` files, or a named set of a prepared folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from longmem.data.prepare import MANIFEST, SPLITS, Manifest
from longmem.errors import LongMemError

LABELLED_SETS = ("vader-movies", "vader-tweets", "brown-genres")  # written by `prepare` into labelled/


@dataclass
class Document:
    id: str  # "<source>/<name>" for prepared data; the path (plus "#<line>" for jsonl) for user files
    text: str
    source: str  # a prepared source name, or "user"
    split: str  # "train" | "dev"


@dataclass
class LabelledText:
    label: str
    text: str


def read_text(path: Path) -> str:
    """A file's UTF-8 text, without a leading byte-order mark (editors on Windows write one; it is not
    text and would become tokens); folders, empty, binary and non-UTF-8 files raise `LongMemError`."""
    if path.is_dir():
        raise LongMemError(f"{path} is a folder, not a text file; give the path of a UTF-8 text file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise LongMemError(f"cannot read {path}: {e.strerror}; check the path and its permissions") from e
    bom = len(raw) - len(raw := raw.removeprefix(b"\xef\xbb\xbf"))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LongMemError(f"{path} is not UTF-8 text (bad byte at offset {e.start + bom}); convert it to UTF-8 or "
                           f"remove it") from e
    if "\0" in text:
        raise LongMemError(f"{path} is a binary file (it contains NUL bytes), not text; remove it or pass a text file")
    if not text.strip():
        raise LongMemError(f"{path} is empty; add text to it or remove it")
    return text


def _jsonl_documents(path: Path, doc_id: str, split: str) -> list[Document]:
    docs = []
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LongMemError(f"{where} is not valid JSON ({e.msg}); fix or remove that line") from e
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise LongMemError(f'{where} has no non-empty "text" string; each line must be an object like {{"text": "..."}}')
        docs.append(Document(f"{doc_id}#{n}", text, "user", split))
    return docs


def _user_documents(path: Path, split: str) -> list[Document]:
    if path.is_file():
        files, root = [path], path.parent
    else:
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        root = path
        if not files:
            raise LongMemError(f"{path} holds no .txt or .jsonl files; put your documents there, or pass a prepared data folder")
    docs = []
    for f in files:
        doc_id = f.relative_to(root).with_suffix("").as_posix()
        if f.suffix == ".jsonl":
            docs += _jsonl_documents(f, doc_id, split)
        elif f.suffix == ".txt":
            docs.append(Document(doc_id, read_text(f), "user", split))
        else:
            raise LongMemError(f"{f} is neither .txt nor .jsonl; pass a .txt file, a .jsonl file of "
                               f'{{"text": ...}} lines, or a folder of them')
    return docs


def _prepared_documents(root: Path, split: str) -> list[Document]:
    docs = []
    for entry in Manifest.load(root).documents:
        if entry.split == split:
            path = root / entry.path
            if not path.is_file():
                raise LongMemError(f"prepared data in {root} is incomplete: {path} is missing; run prepare again")
            docs.append(Document(entry.id, path.read_bytes().decode("utf-8"), entry.source, entry.split))
    return docs


def load_documents(path: str | os.PathLike, split: str = "train") -> list[Document]:
    """Documents of a prepared folder's `split`, or of the user's .txt/.jsonl file or folder
    (whose documents are all given `split`)."""
    path = Path(path)
    if split not in SPLITS:
        raise LongMemError(f"unknown split '{split}'; use one of {', '.join(SPLITS)}")
    if not path.exists():
        raise LongMemError(f"{path} does not exist; pass a prepared data folder, a folder of .txt/.jsonl files, or one such file")
    return _prepared_documents(path, split) if (path / MANIFEST).is_file() else _user_documents(path, split)


def load_labelled(path_or_name: str | os.PathLike, prepared_dir: str | os.PathLike = "data/prepared") -> list[LabelledText]:
    """Examples of a `label<TAB>text` file, or of a named set (see `LABELLED_SETS`) in `prepared_dir`."""
    if str(path_or_name) in LABELLED_SETS:
        path = Path(prepared_dir) / "labelled" / f"{path_or_name}.tsv"
        if not path.is_file():
            raise LongMemError(f"labelled set '{path_or_name}' is not in {prepared_dir}; "
                               "prepare the data there first, or pass the prepared folder")
    else:
        path = Path(path_or_name)
        if not path.is_file():
            raise LongMemError(f"{path} does not exist; pass a label<TAB>text file or one of {', '.join(LABELLED_SETS)}")
    examples = []
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        label, tab, text = line.partition("\t")
        if not (tab and label.strip() and text.strip()):
            raise LongMemError(f"{path}, line {n} is not 'label<TAB>text'; fix or remove that line")
        examples.append(LabelledText(label.strip(), text.strip()))
    return examples
