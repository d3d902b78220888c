"""The `longmem` command line: one subcommand per job, each a typed function below.

Errors a user can cause are `LongMemError`s and print as one line (`longmem: error: ...`)
with exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from longmem.errors import LongMemError


# ---- shared helpers -------------------------------------------------------------------------
def pick_device(name: str):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LongMemError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return torch.device(name)


def load_model(path: str, device: str = "auto"):
    """A LongMem checkpoint (or 'default') and its tokenizer, ready for inference."""
    from transformers import AutoTokenizer

    from longmem.checkpoint import backbone_source
    from longmem.model import LongMemForCausalLM

    model = LongMemForCausalLM.from_pretrained(path, device=pick_device(device)).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(backbone_source(path))
    except (OSError, ValueError) as e:
        raise LongMemError(f"no tokenizer found with the backbone of {path}; save one next to the backbone") from e
    return model, tokenizer


def read_text(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise LongMemError(f"input file not found: {p}; check the path")
    data = p.read_bytes()
    if b"\x00" in data:
        raise LongMemError(f"{p} looks binary (it contains NUL bytes); give a UTF-8 text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LongMemError(f"{p} is not UTF-8 text (byte {e.start}); convert it to UTF-8") from e
    if not text.strip():
        raise LongMemError(f"{p} is empty; give a file with text in it")
    return text


def autocast(device):
    import torch
    return torch.autocast(device.type, dtype=torch.bfloat16)


# ---- subcommands -----------------------------------------------------------------------------
def cmd_memorize(args) -> None:
    """Read a long text file into a fresh memory and save it (safetensors)."""
    import torch

    model, tok = load_model(args.model, args.device)
    ids = torch.tensor([tok(read_text(args.input))["input_ids"]], device=model.device)
    memory = model.new_memory(1, memory_size=args.memory_size)
    with torch.no_grad(), autocast(model.device):
        model.memorize(ids, memory, show_progress=True)
    memory.save(args.out)
    print(f"memorized {ids.shape[1]:,} tokens; memory holds {len(memory):,} (capacity {memory.spec.capacity:,}) "
          f"-> {args.out}")


def cmd_generate(args) -> None:
    """Continue a prompt, optionally with a saved memory or a text read into memory first."""
    import torch

    model, tok = load_model(args.model, args.device)
    memory = model.load_memory(args.memory) if args.memory else model.new_memory(1)
    if args.memorize:
        ids = torch.tensor([tok(read_text(args.memorize))["input_ids"]], device=model.device)
        with torch.no_grad(), autocast(model.device):
            model.memorize(ids, memory, show_progress=True)
    prompt = torch.tensor([tok(args.prompt)["input_ids"]], device=model.device)
    if prompt.shape[1] == 0:
        raise LongMemError("--prompt is empty; give some text to continue")
    g = torch.Generator(device=model.device).manual_seed(args.seed)
    with autocast(model.device):
        out = model.generate(prompt, memory=memory, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_k=args.top_k, generator=g)
    print(tok.decode(out[0, prompt.shape[1]:].tolist()))


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="LongMem checkpoint folder, or 'default' (the shipped model)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="longmem", description="Long-term memory for pretrained causal LMs (LongMem).")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("memorize", help=cmd_memorize.__doc__, description=cmd_memorize.__doc__)
    add_model_args(p)
    p.add_argument("--input", required=True, help="UTF-8 text file to read into memory")
    p.add_argument("--out", required=True, help="where to write the memory (.safetensors)")
    p.add_argument("--memory-size", type=int, default=None, help="capacity in tokens (default: the model's)")
    p.set_defaults(func=cmd_memorize)

    p = sub.add_parser("generate", help=cmd_generate.__doc__, description=cmd_generate.__doc__)
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--memory", help="a memory file written by `longmem memorize`")
    p.add_argument("--memorize", help="a text file to read into memory before generating")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)
    return ap


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        args.func(args)
    except LongMemError as e:
        print(f"longmem: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("longmem: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
