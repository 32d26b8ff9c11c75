"""``python -m benchmarks [name ...]``: run the named benchmark scripts (all by default),
then print one summary table of every figure they reported.

Each ``benchmarks/<name>.py`` with a ``__main__`` block is a standalone script with its own
options (``python benchmarks/<name>.py --help``); this runner starts each in its own process,
one after the other, so that their figures do not disturb each other. A script reports its
headline figures with :func:`benchmarks._harness.report` (see that module: a figure, its
reference measured in the same run, the ratio and the target); they reach this runner through
the file named by ``BENCH_FIGURES`` and end up in the summary, after the machine's load. A
script that reports none still runs and is named in the summary as such.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from benchmarks._harness import FIGURES_ENV, Figure, print_figures, read_figures  # noqa: E402


def available() -> list[str]:
    return sorted(
        p.stem
        for p in HERE.glob("*.py")
        if not p.name.startswith("_") and 'if __name__ == "__main__"' in p.read_text()
    )


def _load() -> str:
    try:
        one, five, fifteen = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        return "unknown"
    return f"{one} {five} {fifteen} (1, 5, 15 min) on {os.cpu_count()} CPUs"


def main(argv: list[str]) -> int:
    names = argv or available()
    unknown = [n for n in names if n not in available()]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; available: {', '.join(available())}")
        return 2
    failed = []
    figures: list[Figure] = []
    silent = []
    loads = [f"before: {_load()}"]
    with tempfile.TemporaryDirectory(prefix="bench-figures-") as tmp:
        for name in names:
            print(f"\n=== {name} ===", flush=True)
            out = Path(tmp, f"{name}.jsonl")
            env = {**os.environ, FIGURES_ENV: str(out)}
            run = subprocess.run([sys.executable, str(HERE / f"{name}.py")], env=env, check=False)
            if run.returncode:
                failed.append(name)
            reported = read_figures(out)
            if not reported:
                silent.append(name)
            figures += reported
            loads.append(f"after {name}: {_load()}")
    print_figures(figures, "summary: every figure, its reference from the same run, the target")
    if silent:
        print(f"\nno figures reported by: {', '.join(silent)}")
    missed = [f"{f.benchmark}: {f.name}" for f in figures if f.met is False]
    if missed:
        print(f"\ntargets not met ({len(missed)}): " + "; ".join(missed))
    print("\nload average " + "; ".join(loads))
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
