"""LongMem checkpoints: SideNet weights (safetensors) + config and backbone identity (JSON).

A checkpoint folder holds `longmem_config.json`, `sidenet.safetensors` and, when the
backbone is saved alongside, `backbone/` (HuggingFace `save_pretrained` format, plus its
tokenizer if one is given). Otherwise the config records the backbone's path. Either way it
records the backbone's fingerprint, so loading with another backbone is a clear error.
The folder is written to a temporary sibling and renamed into place.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from longmem.config import LongMemConfig
from longmem.errors import LongMemError
from longmem.io import atomic_dir, read_json, save_safetensors, write_json

if TYPE_CHECKING:
    from longmem.model import LongMemForCausalLM

FORMAT = "longmem.checkpoint/1"
CONFIG_FILE = "longmem_config.json"
WEIGHTS_FILE = "sidenet.safetensors"
BACKBONE_DIR = "backbone"
DEFAULT_MODEL = Path(__file__).parent / "default_model"


def resolve_model_path(path: str | Path) -> Path:
    """'default' names the model shipped with longmem; anything else is a checkpoint folder."""
    p = DEFAULT_MODEL if str(path) == "default" else Path(path)
    if not (p / CONFIG_FILE).is_file():
        what = "the shipped default model" if str(path) == "default" else f"{p}"
        raise LongMemError(f"{what} is not a LongMem checkpoint (no {CONFIG_FILE}); pass a folder written by "
                           f"save_pretrained or `longmem train`, or 'default'")
    return p


def save_pretrained(model: "LongMemForCausalLM", path: str | Path, backbone: Literal["save", "reference"] = "save",
                    extra: dict | None = None, tokenizer=None, dtype: torch.dtype | None = None) -> None:
    if backbone not in ("save", "reference"):
        raise ValueError(f"backbone must be 'save' or 'reference', not {backbone!r}")
    ref = None
    if backbone == "reference":
        ref = getattr(model.backbone.config, "_name_or_path", None) or None
        if not ref:
            raise LongMemError("the backbone has no path to reference (it was not loaded from disk); "
                               "save it alongside with backbone='save'")
    with atomic_dir(path) as tmp:
        weights = {k: v.detach().to("cpu", dtype or v.dtype) for k, v in model.sidenet.state_dict().items()}
        save_safetensors(tmp / WEIGHTS_FILE, weights)
        if backbone == "save":
            # named_parameters lists a tied weight (embeddings = LM head) once, so it is stored once
            state = None if dtype is None else {k: v.detach().to(dtype) for k, v in model.backbone.named_parameters()}
            model.backbone.save_pretrained(tmp / BACKBONE_DIR, state_dict=state, max_shard_size="15MB")
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / BACKBONE_DIR)
        write_json(tmp / CONFIG_FILE, {
            "format": FORMAT,
            "config": model.config.to_dict(),
            "backbone": {"model_type": model.backbone.config.model_type, "fingerprint": model.backbone_fingerprint,
                         "path": ref, "saved": backbone == "save"},
            "extra": extra or {},
        })


def backbone_source(path: str | Path) -> str:
    """Where a checkpoint's backbone (and tokenizer) lives: its own `backbone/` or the referenced path."""
    path = resolve_model_path(path)
    info = read_json(path / CONFIG_FILE, "LongMem checkpoint config")
    if (path / BACKBONE_DIR).is_dir():
        return str(path / BACKBONE_DIR)
    ref = info.get("backbone", {}).get("path")
    if not ref:
        raise LongMemError(f"checkpoint {path} has no backbone/ folder and references none; pass the backbone explicitly")
    return ref


def from_pretrained(cls, path: str | Path, backbone=None, device=None, dtype=None) -> "LongMemForCausalLM":
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = resolve_model_path(path)
    info = read_json(path / CONFIG_FILE, "LongMem checkpoint config")
    if info.get("format") != FORMAT:
        raise LongMemError(f"{path / CONFIG_FILE} has format {info.get('format')!r}, expected {FORMAT!r}")
    config = LongMemConfig.from_dict(info["config"])
    if backbone is None:
        from transformers import AutoModelForCausalLM
        src = backbone_source(path)
        try:
            backbone = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
        except OSError as e:
            raise LongMemError(f"cannot load the backbone {src} referenced by {path}: {e}") from e
    model = cls(backbone, config)
    expected = info["backbone"]["fingerprint"]
    if model.backbone_fingerprint != expected:
        raise LongMemError(f"checkpoint {path} was built for a different backbone (fingerprint {expected}, this one is "
                           f"{model.backbone_fingerprint}); load it with the backbone it was trained on")
    try:
        weights = load_file(str(path / WEIGHTS_FILE))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise LongMemError(f"{path / WEIGHTS_FILE} is missing, corrupt or truncated ({e}); restore the checkpoint") from e
    missing, unexpected = model.sidenet.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise LongMemError(f"{path / WEIGHTS_FILE} does not match the config (missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}); the checkpoint is corrupt or from another version")
    if dtype is not None:
        model.sidenet.to(dtype)
    return model.to(device) if device is not None else model
