"""Entry point of the `osb-backup` console script."""

from __future__ import annotations


def main() -> None:
    """Run the command-line tool."""
    from cli.app import run

    run()


if __name__ == "__main__":
    main()
