"""Bad input on the command line: one line that says what to change, exit status 2, no traceback.

The table below is every bad input tried, with what it gets now. Before this table existed,
`--memory-size -8` ended in a traceback, `--memory-size 0` silently meant 16,384, an undecodable
prompt, a truncated backbone shard and a corrupt backbone config.json ended in raw tracebacks /
SafetensorErrors, a folder as --input said "file not found", an unwritable --out failed only
after all the work, and a byte-order mark became tokens. Rows marked `before` must be refused
before the model is loaded (the test makes loading it fail loudly). Everything runs in-process
on a tiny checkpoint.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

import longmem.cli
from longmem.cli import main

B, L = True, False  # refused before loading the model / only while loading it

# id, argv ({ckpt}, {txt}, {tmp}, ... are filled in below), fragment of the one-line message, before the model?
CASES = [
    # memory size
    ("memory-size -8", "memorize --model {ckpt} --input {txt} --out {tmp}/m.st --memory-size -8",
     "--memory-size: '-8' is not a memory capacity; give a whole number of at least 1", B),
    ("memory-size 0", "memorize --model {ckpt} --input {txt} --out {tmp}/m.st --memory-size 0",
     "--memory-size: '0' is not a memory capacity", B),
    ("memory-size abc", "memorize --model {ckpt} --input {txt} --out {tmp}/m.st --memory-size abc",
     "'abc' is not a memory capacity", B),
    ("memory-size not a chunk multiple", "memorize --model {ckpt} --input {txt} --out {tmp}/m.st --memory-size 3",
     "--memory-size 3 must be a multiple of the model's chunk size 2, e.g. --memory-size 4", B),
    # text
    ("prompt with undecodable bytes", ["generate", "--model", "{ckpt}", "--prompt", "caf\udce9"],
     "--prompt: not UTF-8 text (byte 0xe9 at character 4)", B),
    ("blank prompt", ["generate", "--model", "{ckpt}", "--prompt", "   "], "--prompt is empty", B),
    ("folder as --input", "memorize --model {ckpt} --input {tmp} --out {tmp}/m.st",
     "--input {tmp} is a folder; give the path of a UTF-8 text file", B),
    ("missing --input", "memorize --model {ckpt} --input {tmp}/nope.txt --out {tmp}/m.st",
     "--input file not found: {tmp}/nope.txt", B),
    ("binary --memorize file", "generate --model {ckpt} --prompt hi --memorize {binary}",
     "is a binary file (it contains NUL bytes)", B),
    ("no --input at all", "memorize --model {ckpt} --out {tmp}/m.st",
     "the following arguments are required: --input; see `longmem memorize --help`", B),
    # output
    ("existing folder as --out", "memorize --model {ckpt} --input {txt} --out {tmp}",
     "--out {tmp} is an existing folder; give a file path", B),
    ("unwritable --out", "memorize --model {ckpt} --input {txt} --out /proc/longmem-test/m.st",
     "--out /proc/longmem-test/m.st is not writable: cannot create a file in /proc", B),
    ("--out below a file", "memorize --model {ckpt} --input {txt} --out {txt}/m.st",
     "cannot be created: {txt} is a file, not a folder", B),
    ("export into a folder of other files", "export --model {ckpt} --out {tmp}",
     "export replaces the whole folder; give a new or empty folder", B),
    ("export onto itself", "export --model {ckpt} --out {ckpt}", "is the checkpoint being exported", B),
    ("export --dtype int8", "export --model {ckpt} --out {tmp}/x --dtype int8", "argument --dtype: invalid choice", B),
    ("eval result into a folder", "eval ppl --model {ckpt} --data {tmp} --out {tmp}", "--out {tmp} is an existing folder", B),
    ("eval --memory-size -8", "eval suffix --model {ckpt} --data {tmp} --out {tmp}/r.json --memory-size -8",
     "--memory-size -8 is negative; give a capacity in tokens, or 0 for the model's", B),
    ("eval --memory-size not a chunk multiple", "eval icl --model {ckpt} --out {tmp}/r.json --memory-size 7",
     "--memory-size 7 must be a multiple of the model's chunk size 2", B),
    ("eval --limit 0", "eval ppl --model {ckpt} --data {tmp} --out {tmp}/r.json --limit 0",
     "--limit 0: give the number of examples to evaluate, at least 1", B),
    ("report into a folder", "eval report {txt} --out {tmp}", "--out {tmp} is an existing folder", B),
    ("data prepare into a file", "data prepare --out {txt}", "--out {txt} is an existing file; give a folder path", B),
    ("train out_dir is a file", "train out_dir={txt}", "out_dir {txt} is an existing file", B),
    ("train config missing", "train --config {tmp}/missing.json", "config file not found: {tmp}/missing.json", B),
    # generation flags
    ("top-k 0", "generate --model {ckpt} --prompt hi --top-k 0", "--top-k: '0' is not a number of candidate tokens", B),
    ("temperature -1", "generate --model {ckpt} --prompt hi --temperature -1",
     "--temperature: '-1' is not a sampling temperature; give a number >= 0", B),
    ("temperature nan", "generate --model {ckpt} --prompt hi --temperature nan", "'nan' is not a sampling temperature", B),
    ("temperature inf", "generate --model {ckpt} --prompt hi --temperature inf", "'inf' is not a sampling temperature", B),
    ("max-new-tokens -1", "generate --model {ckpt} --prompt hi --max-new-tokens -1",
     "--max-new-tokens: '-1' is not a number of tokens", B),
    ("max-new-tokens 0", "generate --model {ckpt} --prompt hi --max-new-tokens 0", "'0' is not a number of tokens", B),
    ("top-k -5", "generate --model {ckpt} --prompt hi --do-sample --top-k -5", "--top-k: '-5' is not a number of", B),
    ("top-p 0", "generate --model {ckpt} --prompt hi --do-sample --top-p 0",
     "--top-p: '0' is not a probability mass; give a number in (0, 1]", B),
    ("top-p 1.5", "generate --model {ckpt} --prompt hi --do-sample --top-p 1.5", "'1.5' is not a probability mass", B),
    ("top-p nan", "generate --model {ckpt} --prompt hi --do-sample --top-p nan", "'nan' is not a probability mass", B),
    ("repetition-penalty 0", "generate --model {ckpt} --prompt hi --repetition-penalty 0",
     "--repetition-penalty: '0' is not a repetition penalty; give a number > 0", B),
    ("repetition-penalty -1", "generate --model {ckpt} --prompt hi --repetition-penalty -1",
     "'-1' is not a repetition penalty", B),
    ("repetition-penalty inf", "generate --model {ckpt} --prompt hi --repetition-penalty inf",
     "'inf' is not a repetition penalty", B),
    ("seed -1", "generate --model {ckpt} --prompt hi --seed -1", "--seed: '-1' is not a seed; give a whole number >= 0", B),
    ("seed abc", "generate --model {ckpt} --prompt hi --seed abc", "'abc' is not a seed", B),
    ("empty --stop", ["generate", "--model", "{ckpt}", "--prompt", "hi", "--stop", ""],
     "--stop: an empty stop string would stop at once", B),
    ("eos -1", "generate --model {ckpt} --prompt hi --eos -1", "--eos: '-1' is not a token id", B),
    ("eos and ignore-eos", "generate --model {ckpt} --prompt hi --eos 3 --ignore-eos",
     "--eos and --ignore-eos contradict each other", B),
    ("temperature without --do-sample", "generate --model {ckpt} --prompt hi --temperature 0.8",
     "--temperature 0.8 only applies when sampling; add --do-sample (greedy decoding is the default)", B),
    ("top-k without --do-sample", "generate --model {ckpt} --prompt hi --top-k 40", "--top-k 40 only applies when sampling", B),
    ("top-p without --do-sample", "chat --model {ckpt} --memory {tmp}/c.st --top-p 0.9",
     "--top-p 0.9 only applies when sampling", B),
    ("--do-sample with temperature 0", "generate --model {ckpt} --prompt hi --do-sample --temperature 0",
     "--temperature 0 is greedy decoding, which --do-sample contradicts", B),
    ("eos outside the vocabulary", "generate --model {ckpt} --prompt hi --eos 99999",
     "eos_token_id=99999 is outside the vocabulary (0..299)", L),
    # chat
    ("chat without --memory", "chat --model {ckpt}", "the following arguments are required: --memory", B),
    ("folder as chat --memory", "chat --model {ckpt} --memory {tmp}", "--memory {tmp} is a folder", B),
    ("chat --memory below a file", "chat --model {ckpt} --memory {txt}/c.st", "cannot be created: {txt} is a file", B),
    ("chat --memory not a memory", "chat --model {ckpt} --memory {txt}", "is corrupt or truncated", L),
    # threads, device, model, memory
    ("unknown retriever", "generate --model {ckpt} --prompt hi --retriever annoy",
     "--retriever: retriever 'annoy': 'annoy' is not one of exact, faiss-ivf", B),
    ("unknown retriever (eval)", "eval ppl --retriever annoy", "--retriever: retriever 'annoy': 'annoy' is not one of", B),
    ("retriever setting of another backend", "memorize --model {ckpt} --input {txt} --out {tmp}/m.st --retriever "
     "faiss-ivf:ef_search=9", "'ef_search=9' is not a setting of faiss-ivf (it takes nprobe=N, nlist_scale=N, min_chunks=N)", B),
    ("threads 0", "generate --model {ckpt} --prompt hi --threads 0", "--threads: '0' is not a number of threads", B),
    ("threads -2 (train)", "train --threads -2", "--threads: '-2' is not a number of threads", B),
    ("unknown device", "generate --model {ckpt} --prompt hi --device tpu", 'unknown device "tpu"; use auto, cpu, cuda', B),
    ("absent GPU", "generate --model {ckpt} --prompt hi --device cuda:99", "device cuda:99:", B),
    ("not a checkpoint", "generate --model {tmp} --prompt hi", "is not a LongMem checkpoint", B),
    ("missing --memory file", "generate --model {ckpt} --prompt hi --memory {tmp}/nope.st",
     "--memory file not found: {tmp}/nope.st; write one with `longmem memorize`", B),
    ("folder as --memory", "generate --model {ckpt} --prompt hi --memory {tmp}", "--memory {tmp} is a folder", B),
    ("truncated backbone shard", "generate --model {truncated} --prompt hi",
     "it is missing, corrupt or truncated (Error while deserializing header", L),
    ("corrupt backbone config.json", "generate --model {bad_config} --prompt hi",
     "backbone/config.json' is not a valid JSON file", L),
    ("unknown command", "frobnicate", "invalid choice: 'frobnicate'", B),
]


@pytest.fixture(scope="module")
def files(checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "tmp").mkdir()
    (root / "tmp" / "other.txt").write_text("someone's file")
    (root / "a.txt").write_text("The old house stood at the end of the lane. " * 4)
    (root / "binary.txt").write_bytes(b"\x00\x01\x02 not text")
    truncated = shutil.copytree(checkpoint, root / "truncated")
    shard = next((truncated / "backbone").glob("*.safetensors"))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    bad_config = shutil.copytree(checkpoint, root / "bad_config")
    (bad_config / "backbone" / "config.json").write_text('{"model_type": "llama", "hidden_')
    return {"ckpt": checkpoint, "txt": str(root / "a.txt"), "tmp": str(root / "tmp"), "binary": str(root / "binary.txt"),
            "truncated": str(truncated), "bad_config": str(bad_config)}


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("argv, fragment, before", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_one_line_and_status_2(argv, fragment, before, files, capsys, monkeypatch):
    if "/proc/" in str(argv) and not Path("/proc").is_dir():
        pytest.skip("no /proc here")
    if before:  # the check must come before the expensive part
        monkeypatch.setattr(longmem.cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded first"))
    argv = argv.split() if isinstance(argv, str) else argv
    rc, out, err = run([a.format(**files) for a in argv], capsys)
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert "Traceback" not in out + err
    assert len(lines) == 1, err
    assert fragment.format(**files) in lines[0]
    assert "longmem" in lines[0].split(":")[0]


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root may write anywhere")
def test_read_only_folder_as_out_is_refused_before_the_work(files, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    monkeypatch.setattr(longmem.cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded first"))
    try:
        rc, _, err = run(["memorize", "--model", files["ckpt"], "--input", files["txt"], "--out",
                          str(locked / "m.st")], capsys)
    finally:
        locked.chmod(0o755)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "is not writable" in err


def test_a_byte_order_mark_is_not_text(files, tmp_path, capsys):
    """A UTF-8 byte-order mark at the start of --input is stripped: the memory is the one of the same text without it."""
    from safetensors.torch import load_file

    text = Path(files["txt"]).read_bytes()
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + text)
    memories = []
    for name in ("bom.txt", "plain.txt"):
        if name == "plain.txt":
            (tmp_path / name).write_bytes(text)
        rc, out, err = run(["memorize", "--model", files["ckpt"], "--input", str(tmp_path / name), "--out",
                            str(tmp_path / f"{name}.st"), "--threads", "1"], capsys)
        assert rc == 0, err
        memories.append((out.split(" tokens")[0], load_file(str(tmp_path / f"{name}.st"))))
    (n_bom, bom), (n_plain, plain) = memories
    assert n_bom == n_plain
    assert bom.keys() == plain.keys() and all(torch.equal(bom[k], plain[k]) for k in bom)


def test_the_prompt_loses_its_byte_order_mark_too():
    assert longmem.cli.utf8_text("\ufeffOnce upon") == "Once upon"
    assert longmem.cli.utf8_text("caf\u00e9") == "caf\u00e9"  # decodable text is kept as it is


def test_help_is_status_0_and_main_leaves_the_thread_count_as_it_was(capsys):
    before = torch.get_num_threads()
    assert main(["memorize", "--help"]) == 0
    assert "--threads" in capsys.readouterr().out
    torch.set_num_threads(before + 1)
    assert main(["generate", "--prompt", "hi", "--threads", "3", "--device", "tpu"]) == 2
    assert torch.get_num_threads() == before + 1  # restored after the command
    torch.set_num_threads(before)


@pytest.mark.parametrize("argv", [["memorize"], ["generate"], ["chat"], ["demo"], ["export"], ["eval", "ppl"],
                                  ["eval", "suffix"], ["eval", "icl"], ["eval", "passkey"], ["eval", "report"],
                                  ["data", "prepare"], ["data", "tokenizer"], ["pretrain"], ["train"]])
def test_every_command_takes_threads(argv, capsys):
    assert main([*argv, "--help"]) == 0
    assert "--threads THREADS" in capsys.readouterr().out


def test_threads_flag_sets_the_threads_the_command_runs_with(files, tmp_path, capsys, monkeypatch):
    seen = []
    real = longmem.cli.load_model

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        return real(*a, **k)

    monkeypatch.setattr(longmem.cli, "load_model", spy)
    rc, _, err = run(["memorize", "--model", files["ckpt"], "--input", files["txt"], "--out", str(tmp_path / "m.st"),
                      "--threads", "3"], capsys)
    assert rc == 0, err
    assert seen == [3]


def test_train_threads_flag_overrides_the_config(tmp_path):
    import argparse

    from longmem.training.train import TrainConfig

    (tmp_path / "c.json").write_text('{"threads": 2, "out_dir": "%s"}' % (tmp_path / "run"))
    args = argparse.Namespace(config=str(tmp_path / "c.json"), overrides=[], threads=5)
    assert longmem.cli.run_config(TrainConfig, args).threads == 5
    assert longmem.cli.run_config(TrainConfig, argparse.Namespace(**{**vars(args), "threads": None})).threads == 2
