"""`longmem eval report`: result files -> one markdown report with plots (matplotlib, PNG beside it).

Every task's own table is copied verbatim; plots are drawn from the summaries:
perplexity by document-length bucket, perplexity vs memory size, the passkey heat-map, and what
retrieval reads (how far back the retrieved chunks lie, against a uniform choice; the gate per head).
"""

from __future__ import annotations

from pathlib import Path

from longmem.errors import LongMemError
from longmem.io import read_json, write_bytes

TITLES = {"ppl": "Long-document perplexity", "suffix": "Suffix identification (ChapterBreak-style)",
          "icl": "Memory-augmented in-context learning", "passkey": "Passkey retrieval",
          "retrieval": "What retrieval reads"}


def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise LongMemError("the report's plots need matplotlib: pip install 'longmem[eval]'") from e
    return plt


def _style(ax, xlabel: str, ylabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def _save(plt, fig, ax, path: Path, xlabel: str, ylabel: str) -> bool:
    _style(ax, xlabel, ylabel)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_ppl_buckets(summary: dict, path: Path) -> bool:
    buckets = summary.get("buckets", {})
    if not buckets:
        return False
    plt = _plt()
    from longmem.eval.ppl import BUCKETS
    names = [name for name, _ in BUCKETS if name in buckets]  # short to long (the JSON is key-sorted)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, row in summary["rows"].items():
        ax.plot(names, [buckets[b]["ppl"][key] for b in names], marker="o", label=row["label"])
    return _save(plt, fig, ax, path, "document length (tokens)", "perplexity")


def plot_ppl_memory(summary: dict, path: Path) -> bool:
    mem = {int(k.rsplit("_", 1)[1]): v["ppl"] for k, v in summary["rows"].items() if k.startswith("longmem_memory_")}
    if len(mem) < 2:
        return False
    plt = _plt()
    sizes = sorted(mem)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(sizes, [mem[s] for s in sizes], marker="o", label="LongMem with memory")
    ax.axhline(summary["rows"]["longmem_no_memory"]["ppl"], ls="--", c="gray", label="LongMem, memory disabled")
    ax.axhline(summary["rows"]["backbone"]["ppl"], ls=":", c="black", label="frozen backbone, local segment")
    if "backbone_window" in summary["rows"]:
        ax.axhline(summary["rows"]["backbone_window"]["ppl"], ls="-.", c="tab:orange", label="frozen backbone, sliding window")
    ax.set_xscale("log", base=2)
    return _save(plt, fig, ax, path, "memory size (tokens)", "perplexity")


def plot_passkey(summary: dict, path: Path) -> bool:
    acc = summary.get("accuracy", {}).get("longmem_memory")
    if not acc:
        return False
    plt = _plt()
    lengths = list(acc)
    depths = list(next(iter(acc.values())))
    grid = [[acc[L][d] if acc[L][d] is not None else float("nan") for L in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(lengths)), lengths, rotation=45)
    ax.set_yticks(range(len(depths)), depths)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("key depth")
    ax.set_title("passkey accuracy, LongMem with memory")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_retrieval_distance(summary: dict, path: Path) -> bool:
    dist = summary["distance"]
    shares, uniform = dist["all"]["log2_share"], dist["uniform"]["log2_share"]
    if shares is None:
        return False
    plt = _plt()
    used = [i for i in range(len(shares)) if shares[i] or uniform[i]]  # power-of-two bins [2^i, 2^(i+1))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    x = [2 ** i for i in used] + [2 ** (used[-1] + 1)]  # bin edges: each bin a flat step, the last one too
    for values, style in ((shares, dict(label="retrieved chunks, all heads")),
                          (uniform, dict(ls="--", c="gray", label="uniform over the held chunks"))):
        y = [100 * values[i] for i in used]
        left.step(x, y + y[-1:], where="post", **style)
    left.set_xscale("log", base=2)
    _style(left, "distance back from the reading token (tokens, bins [2^i, 2^(i+1)))", "share of reads (%)")
    names, heads = summary["buckets"], summary["per_head"]
    buckets = [i for i in range(len(names)) if dist["all"]["counts"][i] or dist["uniform"]["share"][i]]
    width = 0.8 / (len(heads) + 1)
    for j, (label, share) in enumerate([*((f"head {h}", p["share"]) for h, p in enumerate(heads)),
                                        ("uniform", dist["uniform"]["share"])]):
        right.bar([b + (j - len(heads) / 2) * width for b in range(len(buckets))], [100 * share[i] for i in buckets],
                  width, label=label, color="gray" if label == "uniform" else None)
    right.set_xticks(range(len(buckets)), [names[i] for i in buckets])
    _style(right, "distance back (tokens)", "share of the head's reads (%)")
    fig.suptitle(f"where the retrieved chunks lie (memory {summary['memory_size']:,} tokens)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_retrieval_gate(summary: dict, path: Path) -> bool:
    gate = summary.get("gate")
    if not gate:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(range(len(gate)), gate, label="σ(g): weight of memory attention")
    ax.axhline(0.5, ls=":", c="gray", label="initial value (g = 0)")
    ax.set_xticks(range(len(gate)))
    ax.set_ylim(0, 1)
    return _save(plt, fig, ax, path, "query head of the memory layer", "gate")


PLOTS = {"ppl": [("buckets", plot_ppl_buckets), ("memory", plot_ppl_memory)], "passkey": [("grid", plot_passkey)],
         "retrieval": [("distance", plot_retrieval_distance), ("gate", plot_retrieval_gate)]}



def write_report(results: list[Path], out: Path) -> Path:
    parts = ["# LongMem evaluation report", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    for path in results:
        data = read_json(path, "result file")
        task = data.get("task")
        if task not in TITLES or data.get("summary") is None:
            raise LongMemError(f"{path} is not a finished longmem eval result; run the task to completion first")
        parts += [f"## {TITLES[task]}", "",
                  f"`{path}` — model `{data['model_fingerprint']}`, data `{data['data_fingerprint']}`, "
                  f"{len(data['examples'])} examples; config: `{data['config']}`", "", data["table"], ""]
        for name, plot in PLOTS.get(task, []):
            png = out.with_name(f"{out.stem}-{task}-{name}.png")
            if plot(data["summary"], png):
                parts += [f"![{task} {name}]({png.name})", ""]
    write_bytes(out, "\n".join(parts).encode())
    return out
