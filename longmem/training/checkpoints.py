"""Training checkpoints, resumable exactly.

A run folder holds:

    run_dir/
      latest                  # "step-000200": the newest complete checkpoint
      step-000200/
        weights.safetensors   # trainable parameters (fp32, as trained)
        trainer.safetensors   # optimizer state tensors + torch (and CUDA) RNG states
        trainer.json          # optimizer param groups, scheduler state, which tensor is which
        state.json            # step, data-sampler state, run config, numpy + python RNG
      metrics.csv             # (longmem.training.metrics)

A checkpoint is written into a hidden temporary folder and renamed into place, then
`latest` is replaced atomically: a crash mid-save leaves the previous checkpoint intact.
Nothing is pickled; checkpoints of older versions (a `trainer.pt` instead of the two trainer
files) are still read, with torch's weights-only loader.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import pickle
import random
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from longmem.errors import LongMemError
from longmem.io import read_json, replace_dir, write_bytes


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


def trainer_state(optimizer: torch.optim.Optimizer, scheduler) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer, scheduler and RNG states as safetensors tensors plus JSON: every tensor of the optimizer's
    per-parameter state is stored under "optimizer/<param id>/<name>", the rest of it in JSON."""
    opt = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {"rng/torch": torch.get_rng_state()}
    state: dict[str, dict] = {}
    for pid, entries in opt["state"].items():
        state[str(pid)] = {}
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{pid}/{name}"] = value.detach().cpu().contiguous()
                state[str(pid)][name] = {"tensor": f"optimizer/{pid}/{name}"}
            else:
                state[str(pid)][name] = {"value": value}
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    for i, t in enumerate(cuda):
        tensors[f"rng/cuda/{i}"] = t
    plain = {"optimizer": {"state": state, "param_groups": opt["param_groups"]},
             "scheduler": scheduler.state_dict(), "cuda_rng": len(cuda)}
    return tensors, plain


def read_trainer_state(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    """The inverse of `trainer_state`: {"optimizer", "scheduler", "torch_rng", "cuda_rng"} ready to load."""
    state = {int(pid): {name: tensors[v["tensor"]] if "tensor" in v else v["value"] for name, v in entries.items()}
             for pid, entries in plain["optimizer"]["state"].items()}
    return {"optimizer": {"state": state, "param_groups": plain["optimizer"]["param_groups"]},
            "scheduler": plain["scheduler"], "torch_rng": tensors["rng/torch"],
            "cuda_rng": [tensors[f"rng/cuda/{i}"] for i in range(plain["cuda_rng"])]}


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
        tensors, plain = trainer_state(optimizer, scheduler)
        save_file(tensors, str(tmp / "trainer.safetensors"))
        (tmp / "trainer.json").write_text(json.dumps(plain))
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
        if (path / "trainer.pt").is_file() and not (path / "trainer.json").is_file():  # written by an older version
            trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
        else:
            trainer = read_trainer_state(load_file(str(path / "trainer.safetensors")),
                                         read_json(path / "trainer.json", "checkpoint trainer state"))
    except (OSError, SafetensorError, RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as e:
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
