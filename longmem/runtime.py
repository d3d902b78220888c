"""Where and how longmem runs: device, precision, CPU threads, model loading, allocator.

Everything the CLI, the demo, the evaluation tasks, training and the benchmarks share about
*running* a model lives here, so none of them imports the CLI:

    from longmem.runtime import autocast, load_model, resolve_device, set_threads

    set_threads()                                   # longmem's default thread policy (below)
    model, tok = load_model("default", device="auto")
    with torch.no_grad(), autocast(model.device):   # bf16 autocast: the fast default on CPU and GPU
        model.memorize(ids, memory)

This module imports neither torch nor transformers at import time (`import longmem` stays
light, and the OpenMP settings below must be made before torch loads).

**Threads.** PyTorch starts one compute thread per physical core and OpenMP threads
spin-wait between parallel regions. That is fastest on an idle machine and collapses on a
shared one: every parallel region waits for its slowest thread, and a thread whose core was
taken by another process arrives a scheduler time slice late (memorize was measured 11x
slower per segment, 2.27 s vs 0.20 s, next to another busy process on 2 cores). The default
(`default_threads`) is therefore

    threads = max(1, min(physical cores we may use, cores not busy right now) // local ranks)

where "cores we may use" is the process's CPU affinity (taskset, cpusets) capped by a
cgroup CPU quota, "busy" is the CPU time other processes used on those CPUs during a 0.1 s
sample of /proc/stat, in cores, rounded (1.4 busy cores take 1 core away, 1.6 take 2), and
local ranks is `LOCAL_WORLD_SIZE` under torchrun. On an idle machine this is PyTorch's own
default; next to another busy process it gives up the contended cores instead of fighting
for them. The CLI also sets `OMP_WAIT_POLICY=PASSIVE` (unless set) before torch loads, so
idle OpenMP threads sleep instead of spinning on a core another process needs. An explicit
`--threads N` / `set_threads(N)` or `OMP_NUM_THREADS` always wins.
`benchmarks/threads.py` measures the policy against one thread and all cores, idle and busy.

**Allocator.** glibc's malloc raises its mmap threshold as large blocks are freed, after
which the big per-segment temporaries (retrieval scores, gathered memory tokens, logits)
come from the heap and fragment it: resident memory then creeps up segment after segment
although nothing is leaked (measured: 2.1 GB at 131k tokens -> 7.9 GB over a 1M-token
document). Pinning the threshold at 1 MiB, so that every large temporary is its own mapping,
kept it flat, but every such block then comes back as new pages from the kernel, faulted in
and zeroed on first touch: a GPT-2-small-sized forward of 1,024 tokens measured 1.65x slower
(1,039 ms vs 631 ms). `bound_cpu_allocator` (the CLI applies it at start) keeps glibc's
reuse instead and bounds the creep from outside: a daemon thread returns the heap's free
pages to the system (`malloc_trim(0)`) every 2 s. Library users running long jobs can call
it themselves.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from longmem.errors import LongMemError

if TYPE_CHECKING:
    import torch

    from longmem.model import LongMemForCausalLM

# ---- precision ---------------------------------------------------------------------------------
# The one table of dtype names: every name a user may write (configs, flags, memory files) -> the
# canonical torch name. Training configs say bf16/fp32, checkpoints and memories bfloat16/float32.
DTYPE_NAMES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}
CANONICAL_DTYPES = ("float32", "bfloat16", "float16")


def dtype_name(dtype: "str | torch.dtype") -> str:
    """Canonical name ("float32", "bfloat16", "float16") of a dtype or any of its names in DTYPE_NAMES."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_NAMES:
        raise LongMemError(f'unknown dtype "{dtype}"; use one of {", ".join(DTYPE_NAMES)}')
    return DTYPE_NAMES[name]


def to_dtype(dtype: "str | torch.dtype | None") -> "torch.dtype | None":
    """A torch dtype from a dtype or a name in DTYPE_NAMES; None stays None."""
    import torch

    return None if dtype is None else getattr(torch, dtype_name(dtype))


def autocast(device: "torch.device | str", precision: "str | torch.dtype" = "bf16"):
    """The compute precision of a block, the one helper for it: "bf16" (default; bf16 autocast, the
    fast choice on CPUs and GPUs, weights stay as they are), "fp16" (fp16 autocast) or "fp32"
    (autocast off, also inside an enclosing autocast block)."""
    import torch

    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    name = dtype_name(precision)
    if name == "float32":
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=getattr(torch, name))


def cast_unless_autocast(x: "torch.Tensor", dtype: "torch.dtype") -> "torch.Tensor":
    """`x` in `dtype` (e.g. a layer's weight dtype) unless autocast is on for its device, which then
    picks the dtype of every op itself. Model code casts hidden states with this, nowhere else."""
    import torch

    return x if torch.is_autocast_enabled(x.device.type) else x.to(dtype)


# ---- device ------------------------------------------------------------------------------------
def resolve_device(name: "str | torch.device | None" = "auto") -> "torch.device":
    """"auto" (or None) -> CUDA when available, else CPU; "cpu"; "cuda" or "cuda:N" (checked to exist)."""
    import torch

    if isinstance(name, torch.device):
        name = str(name)
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(name, str) or (name != "cpu" and not (name == "cuda" or (
            name.startswith("cuda:") and name[5:].isdigit()))):
        raise LongMemError(f'unknown device "{name}"; use auto, cpu, cuda or cuda:N')
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LongMemError(f"device {name}: no CUDA GPU is visible; use auto or cpu instead")
        index = int(name[5:]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise LongMemError(f"device {name}: only {torch.cuda.device_count()} CUDA GPU(s) are visible "
                               f"(cuda:0..cuda:{torch.cuda.device_count() - 1}); pick one of them")
    return torch.device(name)


# ---- threads -----------------------------------------------------------------------------------
def _allowed_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def cgroup_cpu_quota(root: str | os.PathLike = "/sys/fs/cgroup") -> float | None:
    """CPUs' worth of time the cgroup may use (cgroup v2 cpu.max or v1 cfs quota); None when unlimited."""
    root = Path(root)
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def physical_cores(cpus: list[int] | None = None) -> int:
    """Distinct physical cores among logical CPUs `cpus` (default: those this process may use):
    SMT siblings share one core's arithmetic units, so they do not add matmul throughput."""
    cpus = _allowed_cpus() if cpus is None else cpus
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))  # no topology information: count logical CPUs
    return max(1, len(cores))


def usable_cores() -> int:
    """Physical cores this process may use: its CPU affinity, capped by a cgroup CPU quota."""
    n = physical_cores()
    quota = cgroup_cpu_quota()
    return max(1, min(n, int(quota))) if quota else n


def _cpu_times(cpus: set[int]) -> dict[int, tuple[int, int]]:
    """cpu -> (busy jiffies, total jiffies) from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
                continue
            ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
            idle = ticks[3] + ticks[4]
            out[int(name[3:])] = (sum(ticks) - idle, sum(ticks))
    return out


def busy_cpus(sample_s: float = 0.1) -> float:
    """How many of this process's CPUs other processes kept busy during a short sample (0 when unknown).
    The caller sleeps while sampling, so the busy time is somebody else's."""
    cpus = set(_allowed_cpus())
    try:
        before = _cpu_times(cpus)
        time.sleep(sample_s)
        after = _cpu_times(cpus)
    except (OSError, ValueError):  # no /proc/stat (not Linux)
        return 0.0
    busy = 0.0
    for cpu, (b1, t1) in after.items():
        b0, t0 = before.get(cpu, (b1, t1))
        if t1 > t0:
            busy += (b1 - b0) / (t1 - t0)
    return busy


def default_threads(cores: int | None = None, busy: float | None = None, ranks: int | None = None) -> int:
    """longmem's default number of compute threads (see the module docstring):
    max(1, (cores - round(busy)) // ranks), each measured unless given: `cores` = usable_cores(),
    `busy` = busy_cpus() (cores' worth of CPU time others use now), `ranks` = LOCAL_WORLD_SIZE or 1."""
    cores = usable_cores() if cores is None else cores
    busy = busy_cpus() if busy is None else busy
    if ranks is None:
        try:
            ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        except ValueError:
            ranks = 1
    free = cores - int(busy + 0.5)  # a core counts as taken when it is busy more than half the time
    return max(1, min(cores, free) // max(1, ranks))


def configure_openmp() -> bool:
    """Make idle OpenMP threads sleep instead of spin (OMP_WAIT_POLICY=PASSIVE, unless the user set a
    policy). Effective only before torch is imported; returns whether it was."""
    if "torch" in sys.modules:
        return False
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return True


def set_threads(n: int | None = None) -> int:
    """Use `n` compute threads (None: `OMP_NUM_THREADS` when set, else `default_threads()`); returns
    the number set. Also bounds the tokenizers' thread pool when it has not started yet."""
    if n is None:
        env = os.environ.get("OMP_NUM_THREADS", "")
        n = int(env) if env.isdigit() and int(env) > 0 else default_threads()
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise LongMemError(f"threads must be a positive whole number, not {n!r}; e.g. --threads 2")
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    else:  # torch (its OpenMP and MKL) reads this when it loads; no need to load it here
        os.environ["OMP_NUM_THREADS"] = str(n)
    os.environ.setdefault("RAYON_NUM_THREADS", str(n))  # HF tokenizers' pool, read when it first starts
    return n


# ---- allocator ---------------------------------------------------------------------------------
_trimmer: "threading.Thread | None" = None


def bound_cpu_allocator(interval: float = 2.0) -> bool:
    """Keep a long CPU run's resident memory flat: a daemon thread hands glibc's free heap memory back to the system
    (`malloc_trim(0)`) every `interval` seconds (see the module docstring). Started once per process; a no-op off
    Linux/glibc. Returns whether the trimming thread runs."""
    global _trimmer
    if _trimmer is not None:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int

    def run() -> None:
        while True:
            time.sleep(interval)
            trim(0)  # ctypes releases the GIL for the call

    _trimmer = threading.Thread(target=run, name="longmem-malloc-trim", daemon=True)
    _trimmer.start()
    return True


# ---- loading -----------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Inside: no transformers progress bars ("Loading weights", "Writing model shards"); restored after."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def load_tokenizer(path: str | os.PathLike = "default"):
    """A tokenizer: "default" (the shipped model's), a LongMem checkpoint folder (the tokenizer saved with it), or
    a folder holding a fast tokenizer (tokenizer.json), such as the prepared data/tokenizer."""
    from transformers import PreTrainedTokenizerFast

    from longmem.checkpoint import CONFIG_FILE, load_checkpoint_tokenizer

    if str(path) == "default" or (Path(path) / CONFIG_FILE).is_file():
        tokenizer = load_checkpoint_tokenizer(path)
        if tokenizer is None:
            raise LongMemError(f"checkpoint {path} was saved without a tokenizer; save it again with one "
                               f"(model.save_pretrained(path, tokenizer=...) or `longmem export`)")
        return tokenizer
    if not (Path(path) / "tokenizer.json").is_file():
        raise LongMemError(f"no tokenizer.json in {path}; point to a folder holding a fast tokenizer "
                           f"(the prepared data/tokenizer, or a model folder)")
    try:
        with quiet_transformers():
            return PreTrainedTokenizerFast.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as e:  # a corrupt tokenizer.json / tokenizer_config.json
        raise LongMemError(f"the tokenizer in {path} is unreadable ({_first_line(e)}); restore it or "
                           f"save it again") from e


def load_model(name_or_path: str | os.PathLike = "default", device: "str | torch.device | None" = "auto",
               dtype: "str | torch.dtype | None" = None) -> tuple["LongMemForCausalLM", object]:
    """A LongMem checkpoint ('default' = the model shipped with longmem) and its tokenizer (also
    `model.tokenizer`), in eval mode, on `device` ("auto", "cpu", "cuda", "cuda:N"), in `dtype` (None: as saved;
    a dtype or a name)."""
    from longmem.model import LongMemForCausalLM

    model = LongMemForCausalLM.from_pretrained(name_or_path, device=resolve_device(device), dtype=to_dtype(dtype))
    if model.tokenizer is None:
        raise LongMemError(f"no tokenizer was saved with {name_or_path}; save the checkpoint again with one "
                           f"(model.save_pretrained(path, tokenizer=...) or `longmem export`)")
    return model.eval(), model.tokenizer


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
