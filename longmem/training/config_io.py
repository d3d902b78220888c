"""Run configs: dataclasses from JSON files plus `key=value` overrides, and the resume check."""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Iterable

from longmem.errors import LongMemError
from longmem.io import read_json


def config_from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a (nested) dict, checking option names and types."""
    if not isinstance(data, dict):
        raise LongMemError(f"option {prefix.rstrip('.') or 'config'} must be a JSON object")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in data:
        if k not in names:
            raise LongMemError(f"unknown option {prefix}{k}; valid options: {', '.join(prefix + n for n in names)}")
    return cls(**{k: _coerce(hints[k], v, f"{prefix}{k}") for k, v in data.items()})


def _coerce(tp, value, name: str):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # e.g. int | None
        if value is None and type(None) in typing.get_args(tp):
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if dataclasses.is_dataclass(tp):
        return config_from_dict(tp, value, f"{name}.")
    if typing.get_origin(tp) is tuple and isinstance(value, (list, tuple)) and len(value) == len(typing.get_args(tp)):
        return tuple(_coerce(a, v, name) for a, v in zip(typing.get_args(tp), value, strict=True))
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool, dict) and type(value) is tp:
        return value
    raise LongMemError(f"option {name} must be {getattr(tp, '__name__', tp)}, got {value!r}")


def load_config(cls, path: str | os.PathLike | None = None, overrides: Iterable[str] = ()):
    """Dataclass `cls` from a JSON file (or its defaults), then `key=value` overrides with
    dotted keys for nested options, e.g. `optim.lr=3e-4`, `--seq-len=256`. Values are
    parsed as JSON (numbers, true/false, lists), except for text options."""
    data = dataclasses.asdict(cls()) if path is None else read_json(path, "config file")
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().lstrip("-").replace("-", "_").split(".")
        if not sep:
            raise LongMemError(f'override "{item}" must look like key=value, e.g. steps=1000')
        tp, node = cls, data
        for i, part in enumerate(parts):
            if not (dataclasses.is_dataclass(tp) and part in {f.name for f in dataclasses.fields(tp)}):
                raise LongMemError(f"unknown option {'.'.join(parts[:i + 1])} in override \"{item}\"")
            tp = typing.get_type_hints(tp)[part]
            if i < len(parts) - 1:
                node = node.setdefault(part, {})
        try:
            node[parts[-1]] = raw if tp is str else json.loads(raw)
        except json.JSONDecodeError:
            raise LongMemError(f'override "{item}": {raw!r} is not a valid {getattr(tp, "__name__", tp)}') from None
    return config_from_dict(cls, data)


def check_resumable(checkpoint: Path, cfg, resumable: set[str]) -> None:
    """Raise unless dataclass config `cfg` equals the one saved in `checkpoint`, except for
    the (dotted) option names in `resumable`, which may change between runs."""
    def flatten(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    def as_saved(c) -> dict:
        return flatten(json.loads(json.dumps(dataclasses.asdict(c))))  # tuples -> lists, as saved

    # an option added after the checkpoint was written counts as saved with its default
    saved = {**as_saved(type(cfg)()), **flatten(read_json(checkpoint / "state.json", "checkpoint state").get("config", {}))}
    mine = as_saved(cfg)
    for key in sorted(set(saved) | set(mine)):
        if key not in resumable and saved.get(key) != mine.get(key):
            raise LongMemError(f"{checkpoint.parent} was trained with {key}={saved.get(key)} but this run has "
                               f"{key}={mine.get(key)}; use the same value to resume, or a new out_dir")
