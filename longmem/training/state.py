"""Training-loop pieces shared by backbone pretraining and adaptation training:
optimizer and schedule, configs from JSON + overrides, checkpoints, device and tokenizer
loading, Ctrl-C handling, metrics and progress.

A run folder holds:

    run_dir/
      latest                  # "step-000200": the newest complete checkpoint
      step-000200/
        weights.safetensors   # trainable parameters (fp32, as trained)
        trainer.pt            # optimizer + scheduler state + torch RNG (torch.save of tensors
                              # and plain containers, loaded with weights_only=True)
        state.json            # step, data-sampler state, run config, numpy + python RNG
      metrics.csv

A checkpoint is written into a hidden temporary folder and renamed into place, then
`latest` is replaced atomically: a crash mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import json
import math
import os
import pickle
import random
import shutil
import signal
import threading
import time
import types
import typing
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from longmem.errors import LongMemError
from longmem.io import read_json, replace_dir, write_bytes


# ---------------------------------------------------------------- optimizer and schedule

@dataclass
class OptimizerConfig:
    lr: float = 1e-3
    """Peak learning rate, reached after warmup."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay for matrices and embeddings; norms, biases and gates get none."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping)."""
    warmup_steps: int = 200
    """Linear warmup from 0 to `lr` over this many optimizer steps."""
    min_lr_ratio: float = 0.1
    """The learning rate decays to `lr * min_lr_ratio` at the last step."""
    decay: str = "cosine"
    """Decay after warmup: "cosine" or "polynomial" (linear, power 1, as in fairseq)."""


def build_optimizer(named_params: Iterable[tuple[str, torch.nn.Parameter]], cfg: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW over the parameters that require grad. Tensors with fewer than 2 dims (norm
    weights, biases, per-head gates) are not decayed."""
    decay, no_decay = [], []
    for _, p in named_params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in decay + no_decay) or None
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    min_lr_ratio: float = 0.1, decay: str = "cosine") -> torch.optim.lr_scheduler.LambdaLR:
    """Multiplier on the peak lr: linear warmup, then cosine or linear decay to `min_lr_ratio`."""
    if decay not in ("cosine", "polynomial"):
        raise LongMemError(f'unknown lr decay "{decay}"; use "cosine" or "polynomial"')

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else 1 - progress
        return min_lr_ratio + (1 - min_lr_ratio) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------- configs

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

    saved = flatten(read_json(checkpoint / "state.json", "checkpoint state").get("config", {}))
    mine = flatten(json.loads(json.dumps(dataclasses.asdict(cfg))))  # tuples -> lists, as saved
    for key in sorted(set(saved) | set(mine)):
        if key not in resumable and saved.get(key) != mine.get(key):
            raise LongMemError(f"{checkpoint.parent} was trained with {key}={saved.get(key)} but this run has "
                               f"{key}={mine.get(key)}; use the same value to resume, or a new out_dir")


# ---------------------------------------------------------------- checkpoints

@dataclass
class TrainState:
    """What a checkpoint holds besides tensors."""
    step: int
    """Optimizer steps completed."""
    data: dict = field(default_factory=dict)
    """The data sampler's `state_dict()`."""
    config: dict = field(default_factory=dict)
    """The run's config, as a dict."""


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # named_parameters() lists a tied weight once, so safetensors never sees shared storage
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir: str | os.PathLike, state: TrainState, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler, keep: int = 2,
                    extra: Callable[[Path], None] | None = None) -> Path:
    """Write `run_dir/step-XXXXXX/` atomically, point `latest` at it, keep the newest `keep`.

    `extra(folder)` may add files (e.g. memories) to the checkpoint before it is renamed into place.
    """
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.glob(".tmp-step-*"):  # left by an interrupted save
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step-{state.step:06d}"
    tmp = run_dir / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file({n: p.detach().contiguous().cpu() for n, p in _trainable(model).items()},
                  str(tmp / "weights.safetensors"), metadata={"step": str(state.step)})
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                   tmp / "trainer.pt")
        np_rng = np.random.get_state()
        (tmp / "state.json").write_text(json.dumps({
            **dataclasses.asdict(state),
            "numpy_rng": [np_rng[0], np_rng[1].tolist(), *np_rng[2:]],
            "python_rng": random.getstate(),
        }))
        if extra is not None:
            extra(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        final = run_dir / name
        replace_dir(tmp, final)
    except OSError as e:
        why = "no space left on the device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise LongMemError(f"cannot write checkpoint {run_dir / name}: {why}; free disk space and resume "
                           f"(the previous checkpoint is intact)") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_bytes(run_dir / "latest", f"{name}\n".encode())
    for old in sorted(run_dir.glob("step-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler) -> TrainState:
    """Restore weights, optimizer, scheduler and RNG states from a checkpoint folder."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    fix = f"delete {path} to resume from an earlier checkpoint, or start a new run"
    meta = read_json(path / "state.json", "checkpoint state")
    try:
        weights = load_file(str(path / "weights.safetensors"))
        trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    except (OSError, SafetensorError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise LongMemError(f"checkpoint {path} is unreadable ({str(e).splitlines()[0]}); {fix}") from e
    params = _trainable(model)
    if set(weights) != set(params):
        diff = sorted(set(weights) ^ set(params))
        raise LongMemError(f"checkpoint {path} does not match the model (e.g. parameter {diff[0]}); "
                           f"resume with the config that made it, or start a new run")
    for n, p in params.items():
        if weights[n].shape != p.shape:
            raise LongMemError(f"checkpoint {path} does not match the model: {n} has shape {tuple(weights[n].shape)}, "
                               f"the model {tuple(p.shape)}; resume with the config that made it")
    try:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(weights[n])
        optimizer.load_state_dict(trainer["optimizer"])
        scheduler.load_state_dict(trainer["scheduler"])
        torch.set_rng_state(trainer["torch_rng"])
        if trainer["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(trainer["cuda_rng"])
        np_rng = meta["numpy_rng"]
        np.random.set_state((np_rng[0], np.array(np_rng[1], dtype=np.uint32), *np_rng[2:]))
        version, internal, gauss = meta["python_rng"]
        random.setstate((version, tuple(internal), gauss))
        return TrainState(step=meta["step"], data=meta["data"], config=meta["config"])
    except (KeyError, ValueError, TypeError) as e:
        raise LongMemError(f"checkpoint {path} is corrupt or from another kind of run ({e}); {fix}") from e


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The folder `run_dir/latest` points to, or None for a fresh run."""
    pointer = Path(run_dir) / "latest"
    if not pointer.is_file():
        return None
    path = Path(run_dir) / pointer.read_text().strip()
    if not path.name.startswith("step-") or not path.is_dir():
        raise LongMemError(f"{pointer} points to a missing checkpoint {path.name!r}; "
                           f"write the name of an existing step-* folder into it, or delete it to start over")
    return path


def load_latest(run_dir: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                scheduler) -> TrainState | None:
    """Resume from the newest checkpoint of `run_dir`; None if it has none."""
    path = latest_checkpoint(run_dir)
    return None if path is None else load_checkpoint(path, model, optimizer, scheduler)


# ---------------------------------------------------------------- device, tokenizer, Ctrl-C

def resolve_device(name: str) -> torch.device:
    """"auto" -> CUDA when available, else CPU; "cpu"; "cuda" or "cuda:N"."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not (name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit())):
        raise LongMemError(f'unknown device "{name}"; use auto, cpu, cuda or cuda:N')
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LongMemError(f"device {name}: no CUDA GPU is visible; use device auto or cpu")
    return torch.device(name)


def load_tokenizer(path: str | os.PathLike):
    """The fast tokenizer saved in folder `path` (it must hold a tokenizer.json)."""
    from transformers import PreTrainedTokenizerFast

    if not (Path(path) / "tokenizer.json").is_file():
        raise LongMemError(f"no tokenizer.json in {path}; point to a folder holding a fast tokenizer "
                           f"(the prepared data/tokenizer, or a model folder)")
    return PreTrainedTokenizerFast.from_pretrained(str(path))


class StopOnCtrlC:
    """`with StopOnCtrlC() as stop:` the first Ctrl-C sets `stop.requested` (the loop saves
    and exits at the next step boundary); a second one raises KeyboardInterrupt."""

    def __enter__(self) -> "StopOnCtrlC":
        self.requested = False
        self._installed = threading.current_thread() is threading.main_thread()
        if self._installed:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("Ctrl-C: saving a checkpoint after this step (press again to abort without saving)")

    def __exit__(self, *exc):
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)


# ---------------------------------------------------------------- metrics and progress

class MetricsLog:
    """Appends rows `step,<fields>` to `metrics.csv` (empty cells for missing values), and
    mirrors them to TensorBoard when `torch.utils.tensorboard` is importable."""

    def __init__(self, run_dir: str | os.PathLike, fields: Iterable[str], resume_step: int = 0):
        self.path = Path(run_dir) / "metrics.csv"
        self.fields = ["step", *fields]
        rows = []
        if self.path.is_file() and resume_step > 0:  # drop rows logged after the checkpoint we resume from
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= resume_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, self.fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step + 1)
        except ImportError:
            self.tb = None

    def log(self, step: int, **metrics: float) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.fields, extrasaction="ignore").writerow({"step": step, **metrics})
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

    @staticmethod
    def read(run_dir: str | os.PathLike) -> list[dict[str, str]]:
        with open(Path(run_dir) / "metrics.csv", newline="") as f:
            return list(csv.DictReader(f))


class Throughput:
    """Tokens per second over the last `window` seconds (for progress bars and logs)."""

    def __init__(self, window: float = 30.0):
        self.window, self.events = window, [(time.perf_counter(), 0)]

    def update(self, tokens: int) -> float:
        now = time.perf_counter()
        self.events.append((now, self.events[-1][1] + tokens))
        while len(self.events) > 2 and now - self.events[1][0] > self.window:
            self.events.pop(0)
        (t0, n0), (t1, n1) = self.events[0], self.events[-1]
        return (n1 - n0) / max(t1 - t0, 1e-9)


def progress_bar(total: int, initial: int = 0, desc: str = "train") -> tqdm:
    """A step progress bar; update its postfix with `bar.set_postfix(loss=..., tok_s=...)`."""
    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)
