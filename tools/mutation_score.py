"""Mutation score of the core modules (mutmut), with the equivalent mutants explained.

    .venv/bin/pip install mutmut
    .venv/bin/python tools/mutation_score.py          # mutmut run, then the score (about 65 min on 2 cores)
    .venv/bin/python tools/mutation_score.py --no-run # the score of the last run only

Which modules are mutated is `[tool.mutmut] only_mutate` in pyproject.toml. A surviving
mutant is either killed by a new test or listed in `tools/mutation_equivalents.py` with
the reason it cannot change behaviour; this script matches survivors to that list by the
exact line they change, prints the score per file and every survivor that is neither.

    score = killed / (mutants - equivalent)       (a timeout counts as killed, as in mutmut)

An equivalent mutant is either one listed entry (a function and its exact changed line) or
matches one of a few narrow RULES (e.g. a `device=` argument dropped: every tensor of a CPU
run lives on the one device, so only the CUDA tests could tell).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readable(key: str) -> str:
    """mutmut's 'longmem.memory.bank.xǁMemoryBankǁwrite__mutmut_3' -> 'longmem.memory.bank.MemoryBank.write'."""
    name = key.rsplit("__mutmut_", 1)[0]
    module, _, func = name.rpartition(".")
    if func.startswith("xǁ"):
        func = ".".join(p for p in func[2:].split("ǁ") if p)
    elif func.startswith("x_"):
        func = func[2:]
    return f"{module}.{func}"


def changed_lines(diff: str) -> tuple[str, str]:
    """The removed and added lines of a mutant's diff, whitespace-stripped and joined."""
    lines = diff.splitlines()[2:]  # skip the ---/+++ header
    before = "\n".join(l[1:].strip() for l in lines if l.startswith("-"))
    after = "\n".join(l[1:].strip() for l in lines if l.startswith("+"))
    return before, after


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-run", action="store_true", help="report the last run without running mutmut")
    parser.add_argument("--quiet", action="store_true", help="do not print the diffs of unexplained survivors")
    args = parser.parse_args()
    os.chdir(ROOT)
    if not args.no_run:
        subprocess.run([str(Path(sys.executable).with_name("mutmut")), "run"], check=False)

    from mutmut.__main__ import walk_mutatable_files
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.stats import status_by_exit_code

    sys.path.insert(0, str(ROOT / "tools"))
    from mutation_equivalents import EQUIVALENT, RULES

    known = {(f, b, a): why for f, b, a, why in EQUIVALENT}
    used: set[tuple[str, str, str]] = set()
    by_rule: Counter = Counter()
    per_file: dict[str, Counter] = defaultdict(Counter)
    unexplained: list[tuple[str, str, str]] = []
    for path in walk_mutatable_files():
        data = SourceFileMutationData(path=path)
        data.load()
        for key, code in data.exit_code_by_key.items():
            status = status_by_exit_code[code]
            counts = per_file[str(path)]
            counts["mutants"] += 1
            if status in ("killed", "timeout", "segfault"):
                counts["killed"] += 1
                continue
            if status == "not checked":
                counts["not checked"] += 1
                continue
            before, after = changed_lines(get_diff_for_mutant(key, path=path))
            sig = (readable(key), before, after)
            rule = next((name for name, applies, _ in RULES if applies(before, after)), None)
            if sig in known:
                counts["equivalent"] += 1
                used.add(sig)
            elif rule is not None:
                counts["equivalent"] += 1
                by_rule[rule] += 1
            else:
                counts["survived"] += 1
                unexplained.append((key, status, get_diff_for_mutant(key, path=path)))

    if not per_file:
        print("no mutmut results: run without --no-run first", file=sys.stderr)
        return 2
    total = Counter()
    print(f"| file | mutants | killed | equivalent | survived | score |\n|---|---:|---:|---:|---:|---:|")
    for path, c in sorted(per_file.items()):
        total.update(c)
        score = c["killed"] / max(1, c["mutants"] - c["equivalent"] - c["not checked"])
        print(f"| {path} | {c['mutants']} | {c['killed']} | {c['equivalent']} | {c['survived']} | {score:.1%} |")
    score = total["killed"] / max(1, total["mutants"] - total["equivalent"] - total["not checked"])
    print(f"| **all** | {total['mutants']} | {total['killed']} | {total['equivalent']} | {total['survived']} | "
          f"**{score:.1%}** |")
    if by_rule:
        print("\nequivalent by rule (tools/mutation_equivalents.py RULES): "
              + ", ".join(f"{name} {n}" for name, n in by_rule.most_common()))
    if total["not checked"]:
        print(f"\n{total['not checked']} mutants were not checked yet (an interrupted run): run again")
    stale = set(known) - used
    if stale:
        print(f"\n{len(stale)} entries of tools/mutation_equivalents.py matched no surviving mutant (the code or the "
              f"tests changed): review them")
    if unexplained and not args.quiet:
        print(f"\n{len(unexplained)} surviving mutants are neither killed nor explained:")
        for key, status, diff in unexplained:
            print(f"\n# {readable(key)} ({key}, {status})\n" + "\n".join(diff.splitlines()[2:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
