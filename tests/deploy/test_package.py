"""What an installed package carries: the wheel built from this tree holds the OSB catalog the
service loads by default, so that ``pip install`` plus ``osb-backup-manager`` starts without a
CATALOG_PATH (the README promises "the packaged catalog.yml")."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from broker.config import DEFAULT_CATALOG

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_carries_the_catalog_the_service_loads_by_default(tmp_path: Path) -> None:
    had_build = (ROOT / "build").exists()
    try:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-build-isolation",
                "-q",
                "-w",
                str(tmp_path),
                str(ROOT),
            ],
            check=True,
            capture_output=True,
        )
    finally:
        if not had_build:  # setuptools builds in the tree's build/ (ignored by git)
            shutil.rmtree(ROOT / "build", ignore_errors=True)
    (wheel,) = tmp_path.glob("*.whl")
    inside = DEFAULT_CATALOG.relative_to(ROOT).as_posix()  # the default lies in a package
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read(inside) == (ROOT / "catalog.yml").read_bytes()
