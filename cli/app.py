"""The `osb-backup` commands."""

from __future__ import annotations


def run() -> None:
    """Run the command-line tool (commands follow)."""
