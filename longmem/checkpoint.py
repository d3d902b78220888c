"""LongMem checkpoints: SideNet weights (safetensors) + config and backbone identity (JSON).

A checkpoint folder holds `longmem_config.json`, `sidenet.safetensors` and, when the
backbone is saved alongside, `backbone/` (HuggingFace `save_pretrained` format, plus its
tokenizer). Otherwise the config records the backbone's path, and the tokenizer goes in
`tokenizer/`. Either way it records the backbone's fingerprint, so loading with another
backbone is a clear error. The tokenizer saved is the one given to `save_pretrained`, else
the model's own (`model.tokenizer`); `from_pretrained` loads it back into `model.tokenizer`.
The folder is written to a temporary sibling and renamed into place.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from longmem.config import LongMemConfig
from longmem.errors import LongMemError
from longmem.io import atomic_dir, read_json, save_safetensors, write_json
from longmem.runtime import quiet_transformers

if TYPE_CHECKING:
    from longmem.model import LongMemForCausalLM

FORMAT = "longmem.checkpoint/1"
CONFIG_FILE = "longmem_config.json"
WEIGHTS_FILE = "sidenet.safetensors"
BACKBONE_DIR = "backbone"
TOKENIZER_DIR = "tokenizer"  # the tokenizer of a checkpoint that references its backbone
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
DEFAULT_MODEL = Path(__file__).parent / "default_model"


def resolve_model_path(path: str | Path) -> Path:
    """'default' names the model shipped with longmem; anything else is a checkpoint folder."""
    p = DEFAULT_MODEL if str(path) == "default" else Path(path)
    if not (p / CONFIG_FILE).is_file():
        what = "the shipped default model" if str(path) == "default" else f"{p}"
        raise LongMemError(f"{what} is not a LongMem checkpoint (no {CONFIG_FILE}); pass a checkpoint folder "
                           f"(written by `longmem train` or `longmem export`), or 'default'")
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
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    with atomic_dir(path) as tmp:
        if tokenizer is not None:
            with quiet_transformers():
                tokenizer.save_pretrained(tmp / (BACKBONE_DIR if backbone == "save" else TOKENIZER_DIR))
        weights = {k: v.detach().to("cpu", dtype or v.dtype) for k, v in model.sidenet.state_dict().items()}
        save_safetensors(tmp / WEIGHTS_FILE, weights)
        if backbone == "save":
            # named_parameters lists a tied weight (embeddings = LM head) once, so it is stored once
            state = None if dtype is None else {k: v.detach().to(dtype) for k, v in model.backbone.named_parameters()}
            with quiet_transformers():  # no "Writing model shards" bar on every save
                model.backbone.save_pretrained(tmp / BACKBONE_DIR, state_dict=state, max_shard_size="15MB")
        fingerprint = model.backbone_fingerprint
        if backbone == "save" and dtype is not None:  # the weights as saved (rounded to dtype) are what loads
            fingerprint = _saved_fingerprint(tmp / BACKBONE_DIR)
        write_json(tmp / CONFIG_FILE, {
            "format": FORMAT,
            "config": model.config.to_dict(),
            "backbone": {"model_type": model.backbone.config.model_type, "fingerprint": fingerprint,
                         "path": ref, "saved": backbone == "save"},
            "extra": extra or {},
        })


def _saved_fingerprint(folder: Path) -> str:
    """The fingerprint `from_pretrained` will compute for the backbone saved in `folder`."""
    from transformers import AutoModelForCausalLM

    from longmem.backbone import adapter_for

    with quiet_transformers():
        return adapter_for(AutoModelForCausalLM.from_pretrained(folder, dtype=None)).fingerprint()


def backbone_source(path: str | Path) -> str:
    """Where a checkpoint's backbone (and tokenizer) lives: its own `backbone/` or the referenced path."""
    path = resolve_model_path(path)
    info = read_json(path / CONFIG_FILE, "LongMem checkpoint config")
    if (path / BACKBONE_DIR).is_dir():
        return str(path / BACKBONE_DIR)
    ref = info.get("backbone", {}).get("path")
    if not ref:
        raise LongMemError(f"checkpoint {path} has no backbone/ folder and names no backbone path, so it cannot be "
                           f"loaded on its own; save it again with its backbone (`longmem export`)")
    return ref


def load_checkpoint_tokenizer(path: str | Path):
    """The tokenizer saved with a checkpoint (`tokenizer/`, else with its backbone), or None when it has none."""
    from transformers import AutoTokenizer

    path = resolve_model_path(path)
    source = path / TOKENIZER_DIR if (path / TOKENIZER_DIR).is_dir() else backbone_source(path)
    local = Path(source).is_dir()
    if local and not any((Path(source) / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError, TypeError) as e:
        if not local:  # a referenced backbone that comes without a tokenizer
            return None
        raise LongMemError(f"the tokenizer saved with {path} in {source} is unreadable ({_first_line(e)}); restore "
                           f"that folder, or save the checkpoint again with its tokenizer") from e


def from_pretrained(cls, path: str | Path, backbone=None, device=None, dtype=None, *, torch_dtype=None,
                    device_map=None) -> "LongMemForCausalLM":
    """Load a checkpoint, HuggingFace style: the model comes back in eval mode.

    dtype / torch_dtype (the HF name; give one of them): a torch dtype or a name ("bfloat16", "bf16",
    "float32", ...): the whole model (backbone and SideNet) in that dtype; None or "auto": the backbone
    as saved and the SideNet in its dtype. The backbone is always read as saved first, because its
    fingerprint is checked on those weights. device / device_map (the HF name): a device, "cpu",
    "cuda[:N]" or "auto" (CUDA when available); None leaves the model on the CPU.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from longmem.runtime import resolve_device, to_dtype

    dtype = _one_of("dtype", dtype, "torch_dtype", torch_dtype)
    device = _one_of("device", device, "device_map", device_map)
    if isinstance(device, dict):
        raise ValueError("device_map: a LongMem model lives on one device; pass 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if dtype is not None and dtype != "auto":
        dtype = to_dtype(dtype)
    if device is not None:
        device = resolve_device(device)
    path = resolve_model_path(path)
    info = read_json(path / CONFIG_FILE, "LongMem checkpoint config")
    if info.get("format") != FORMAT:
        raise LongMemError(f"{path / CONFIG_FILE} has format {info.get('format')!r}, expected {FORMAT!r}; "
                           f"it is not a LongMem checkpoint of this version")
    config = LongMemConfig.from_dict(info["config"])
    if backbone is None:
        from transformers import AutoModelForCausalLM
        src = backbone_source(path)
        try:
            with quiet_transformers():  # no "Loading weights" bar on every load
                backbone = AutoModelForCausalLM.from_pretrained(src, dtype=None)  # None: the weights' own dtype
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as e:
            raise LongMemError(f"cannot load the backbone {src} of checkpoint {path}: it is missing, corrupt or "
                               f"truncated ({_first_line(e)}); restore that folder from where the checkpoint came from") from e
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
    model.tokenizer = load_checkpoint_tokenizer(path)
    if dtype not in (None, "auto"):
        model.to(dtype)
    if device is not None:
        model.to(device)
    return model.eval()


def _one_of(name: str, value, hf_name: str, hf_value):
    if value is not None and hf_value is not None and value != hf_value:
        raise ValueError(f"pass either {name}= or {hf_name}= (they mean the same), not both")
    return value if value is not None else hf_value


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__
