"""longmem.runtime: device, precision, threads, loading; and the HuggingFace habits of from_pretrained."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longmem import LongMemForCausalLM, runtime
from longmem.checkpoint import backbone_source
from longmem.checkpoint import from_pretrained as load_checkpoint
from longmem.errors import LongMemError

ROOT = Path(__file__).resolve().parents[1]
GPU = torch.cuda.is_available()


# ---- device ----------------------------------------------------------------------------------------------
def test_resolve_device():
    auto = torch.device("cuda" if GPU else "cpu")
    assert runtime.resolve_device() == runtime.resolve_device("auto") == runtime.resolve_device(None) == auto
    assert runtime.resolve_device("cpu") == torch.device("cpu")
    assert runtime.resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("name", ["tpu", "CPU", "cuda:", "cuda:x", "cuda:-1", "gpu0", ""])
def test_unknown_device_names_are_one_line_errors(name):
    with pytest.raises(LongMemError, match=r'unknown device "[^"]*"; use auto, cpu, cuda or cuda:N') as e:
        runtime.resolve_device(name)
    assert "\n" not in str(e.value)


def test_cuda_that_is_not_there_is_an_error():
    if GPU:
        n = torch.cuda.device_count()
        assert runtime.resolve_device("cuda:0") == torch.device("cuda:0")
        with pytest.raises(LongMemError, match=f"only {n} CUDA GPU"):
            runtime.resolve_device(f"cuda:{n}")
    else:
        for name in ("cuda", "cuda:0", "cuda:3"):
            with pytest.raises(LongMemError, match=f"device {name}: no CUDA GPU is visible; use auto or cpu"):
                runtime.resolve_device(name)


# ---- precision -------------------------------------------------------------------------------------------
def test_one_table_of_dtype_names():
    for names, canonical in ((("bf16", "bfloat16", torch.bfloat16, "torch.bfloat16"), "bfloat16"),
                             (("fp16", "float16", "half", torch.float16), "float16"),
                             (("fp32", "float32", "float", torch.float32), "float32")):
        for name in names:
            assert runtime.dtype_name(name) == canonical
            assert runtime.to_dtype(name) is getattr(torch, canonical)
    assert runtime.to_dtype(None) is None
    with pytest.raises(LongMemError, match='unknown dtype "int8"; use one of float32, fp32'):
        runtime.to_dtype("int8")


def test_autocast_sets_the_compute_precision():
    a = torch.randn(4, 4)
    with runtime.autocast("cpu"):  # bf16 is the default
        assert (a @ a).dtype == torch.bfloat16
        with runtime.autocast(torch.device("cpu"), "fp32"):  # fp32 switches an enclosing autocast off
            assert (a @ a).dtype == torch.float32
    with runtime.autocast("cpu", "float16"):
        assert (a @ a).dtype == torch.float16
    assert (a @ a).dtype == torch.float32
    with pytest.raises(LongMemError, match="unknown dtype"):
        runtime.autocast("cpu", "fp8")


def test_cast_unless_autocast():
    x = torch.randn(3)
    assert runtime.cast_unless_autocast(x, torch.bfloat16).dtype == torch.bfloat16
    with runtime.autocast("cpu"):
        assert runtime.cast_unless_autocast(x, torch.bfloat16) is x  # autocast decides per op


# ---- threads ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cores, busy, ranks, want", [
    (4, 0.0, 1, 4),    # idle: every core (PyTorch's own default)
    (4, 0.4, 1, 4),    # a little background activity does not count
    (4, 1.4, 1, 3),    # one core taken by another process
    (4, 1.6, 1, 2),    # two cores busy more than half the time
    (2, 2.0, 1, 1),    # all taken: one thread, never zero
    (2, 9.0, 1, 1),
    (8, 0.0, 2, 4),    # two local ranks (torchrun) share the cores
    (8, 2.0, 4, 1),
    (1, 0.0, 1, 1),
])
def test_default_threads_policy(cores, busy, ranks, want):
    assert runtime.default_threads(cores=cores, busy=busy, ranks=ranks) == want


def test_default_threads_divides_by_the_local_ranks_of_torchrun(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert runtime.default_threads(cores=4, busy=0.0) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "junk")
    assert runtime.default_threads(cores=4, busy=0.0) == 4


def test_busy_cpus_is_the_busy_share_of_our_cpus_during_the_sample(monkeypatch):
    samples = iter([{0: (100, 1000), 1: (50, 1000)}, {0: (190, 1100), 1: (50, 1100)}])  # cpu0 90% busy, cpu1 idle
    monkeypatch.setattr(runtime, "_cpu_times", lambda cpus: next(samples))
    monkeypatch.setattr(runtime.time, "sleep", lambda s: None)
    assert runtime.busy_cpus() == pytest.approx(0.9)


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="no /proc/stat")
def test_cpu_times_reads_the_cpus_of_this_process():
    cpus = set(os.sched_getaffinity(0))
    times = runtime._cpu_times(cpus)
    assert set(times) == cpus and all(0 <= busy <= total for busy, total in times.values())
    assert 0.0 <= runtime.busy_cpus(0.02) <= len(cpus) + 1e-9


def test_cgroup_cpu_quota(tmp_path):
    assert runtime.cgroup_cpu_quota(tmp_path) is None  # no cgroup files: unlimited
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert runtime.cgroup_cpu_quota(tmp_path) is None
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert runtime.cgroup_cpu_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert runtime.cgroup_cpu_quota(tmp_path) == 2.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert runtime.cgroup_cpu_quota(tmp_path) is None


def test_usable_cores_respects_affinity_and_quota(monkeypatch):
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert 1 <= runtime.physical_cores() <= runtime.physical_cores(list(range(os.cpu_count()))) <= os.cpu_count()
    assert 1 <= runtime.usable_cores() <= allowed
    monkeypatch.setattr(runtime, "cgroup_cpu_quota", lambda: 1.5)
    assert runtime.usable_cores() == 1
    monkeypatch.setattr(runtime, "physical_cores", lambda: 6)
    monkeypatch.setattr(runtime, "cgroup_cpu_quota", lambda: None)
    assert runtime.usable_cores() == 6


def test_set_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert runtime.set_threads(3) == 3 and torch.get_num_threads() == 3
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's explicit setting wins over the policy
        assert runtime.set_threads() == 2 and torch.get_num_threads() == 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(runtime, "default_threads", lambda: 5)
        assert runtime.set_threads(None) == 5 and torch.get_num_threads() == 5
        for bad in (0, -1, 1.5, True):
            with pytest.raises(LongMemError, match="threads must be a positive whole number"):
                runtime.set_threads(bad)
    finally:
        torch.set_num_threads(before)


def test_settings_made_before_torch_loads_reach_it():
    """In a fresh process: `import longmem` and the CLI module load neither torch nor transformers; thread count
    and the passive OpenMP wait policy set before torch loads are the ones torch runs with."""
    code = ("import os, sys; import longmem, longmem.cli, longmem.runtime as r\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n"
            "assert r.configure_openmp() and r.set_threads(2) == 2\n"
            "import torch\n"
            "print(torch.get_num_threads(), os.environ['OMP_WAIT_POLICY'], r.configure_openmp())")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2", "PASSIVE", "False"]


# ---- loading ---------------------------------------------------------------------------------------------
def test_load_model_gives_an_eval_model_and_its_tokenizer(checkpoint, tok, capsys):
    model, tokenizer = runtime.load_model(checkpoint, device="cpu")
    assert isinstance(model, LongMemForCausalLM)
    assert not model.training and not model.sidenet.training and not model.backbone.training
    assert model.device == torch.device("cpu")
    assert tokenizer("hello world")["input_ids"] == tok("hello world")["input_ids"]
    model, _ = runtime.load_model(checkpoint, device="cpu", dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(LongMemError, match="not a LongMem checkpoint"):
        runtime.load_model(str(Path(checkpoint).parent / "nowhere"))


def test_load_model_default_is_the_shipped_model():
    model, tokenizer = runtime.load_model("default", device="cpu")
    assert model.config.memory_size == 16384 and len(tokenizer) == 8192 and not model.training


def test_loading_and_saving_print_no_transformers_progress_bars(checkpoint, tmp_path, capsys):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()
    backbone = AutoModelForCausalLM.from_pretrained(backbone_source(checkpoint))  # what longmem silences:
    backbone.save_pretrained(tmp_path / "plain")
    err = capsys.readouterr().err
    assert "Loading weights" in err and "Writing model shards" in err
    model, _ = runtime.load_model(checkpoint, device="cpu")
    model.save_pretrained(tmp_path / "again")
    err = capsys.readouterr().err
    assert "Loading weights" not in err and "Writing model shards" not in err
    assert hf_logging.is_progress_bar_enabled()  # scoped: transformers' own bars are back afterwards


def test_from_pretrained_hf_habits(checkpoint):
    """Eval mode, torch_dtype (a dtype, a name, "auto") and device_map ("auto" or a device), as in transformers."""
    model = load_checkpoint(LongMemForCausalLM, checkpoint)
    assert not model.training and not model.sidenet.training
    assert LongMemForCausalLM.from_pretrained(checkpoint).training is False
    model = load_checkpoint(LongMemForCausalLM, checkpoint, torch_dtype=torch.bfloat16, device_map="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model = load_checkpoint(LongMemForCausalLM, checkpoint, torch_dtype="float16")
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    model = load_checkpoint(LongMemForCausalLM, checkpoint, torch_dtype="auto")  # as saved: float32
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    model = load_checkpoint(LongMemForCausalLM, checkpoint, device_map="auto")
    assert model.device == runtime.resolve_device("auto")
    with pytest.raises(ValueError, match="either dtype= or torch_dtype="):
        load_checkpoint(LongMemForCausalLM, checkpoint, dtype=torch.float32, torch_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="one device"):
        load_checkpoint(LongMemForCausalLM, checkpoint, device_map={"": "cpu"})
    with pytest.raises(LongMemError, match="unknown device"):
        load_checkpoint(LongMemForCausalLM, checkpoint, device_map="tpu")


def test_model_dtype_num_parameters_and_hf_kwargs(checkpoint):
    model = LongMemForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.bfloat16, device_map="auto")
    assert model.dtype == torch.bfloat16 and model.device == runtime.resolve_device("auto") and not model.training
    unique = {id(p): p.numel() for p in model.parameters()}
    assert model.num_parameters() == sum(unique.values())
    assert model.num_parameters(only_trainable=True) == sum(p.numel() for p in model.sidenet.parameters()) > 0
    assert model.num_parameters(only_trainable=True) < model.num_parameters()


def test_a_checkpoint_saved_in_bf16_loads_back(checkpoint, tmp_path, capsys):
    """`longmem export` (bf16 by default) of a float32 checkpoint: the backbone's fingerprint is recorded for the
    rounded weights that are saved, so the export loads (it did not: "built for a different backbone")."""
    from longmem.cli import main

    assert main(["export", "--model", checkpoint, "--out", str(tmp_path / "exp"), "--threads", "1"]) == 0
    model = LongMemForCausalLM.from_pretrained(tmp_path / "exp")
    original = LongMemForCausalLM.from_pretrained(checkpoint)
    assert {p.dtype for p in model.backbone.parameters()} == {torch.bfloat16}
    for (name, p), q in zip(model.sidenet.named_parameters(), original.sidenet.parameters()):
        assert torch.equal(p.float(), q.to(torch.bfloat16).float()), name
    assert main(["generate", "--model", str(tmp_path / "exp"), "--prompt", "hi", "--max-new-tokens", "2",
                 "--threads", "1"]) == 0


TRIM_PROBE = """
import time
import torch
from longmem.runtime import bound_cpu_allocator

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

torch.ones(1 << 18)  # a freed 1 MiB mapping raises glibc's mmap threshold: smaller blocks now come from the heap
blocks = [torch.ones(1 << 17) for _ in range(800)]  # 800 x 512 KiB = 400 MiB of heap
keep = blocks[::50]  # survivors spread through the heap: freeing the rest cannot shrink it from its top
del blocks
time.sleep(0.3)
idle = rss()
assert bound_cpu_allocator(0.05) and bound_cpu_allocator(0.05)
time.sleep(0.3)
import threading
print(idle >> 20, rss() >> 20, sum(t.name == "longmem-malloc-trim" for t in threading.enumerate()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_bound_cpu_allocator_hands_free_heap_memory_back():
    """A fragmented heap keeps its free memory resident until the trimming thread (started once) returns it."""
    out = subprocess.run([sys.executable, "-c", TRIM_PROBE], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    idle, trimmed, threads = map(int, out.stdout.split())
    assert idle - trimmed > 300 and threads == 1, (idle, trimmed, threads)
