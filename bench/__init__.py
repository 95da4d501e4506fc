"""Benchmarks and data preparation; product code never imports this package."""

from pathlib import Path


def emit(table: str, out: Path | None, name: str) -> None:
    """Print a bench's table and, with `out`, also write it there as `name`."""
    print(table)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(table + "\n")
