"""``python -m benchmarks [name ...]``: run the named benchmark scripts (all by default).

Each ``benchmarks/<name>.py`` with a ``__main__`` block is a standalone script with its own
options (``python benchmarks/<name>.py --help``); this runner starts each in its own process,
one after the other, so that their figures do not disturb each other.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def available() -> list[str]:
    return sorted(
        p.stem
        for p in HERE.glob("*.py")
        if not p.name.startswith("_") and 'if __name__ == "__main__"' in p.read_text()
    )


def main(argv: list[str]) -> int:
    names = argv or available()
    unknown = [n for n in names if n not in available()]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; available: {', '.join(available())}")
        return 2
    failed = []
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        if subprocess.run([sys.executable, str(HERE / f"{name}.py")], check=False).returncode:
            failed.append(name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
