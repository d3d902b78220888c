"""Training metrics (metrics.csv, TensorBoard when available), throughput and progress bars."""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path
from typing import Iterable

from tqdm.auto import tqdm


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
