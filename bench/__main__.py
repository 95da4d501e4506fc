"""`python -m bench prepare sample SRC DEST`: build the bundled sample catalogue from the Grocery data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.prepare import write_grocery_sample


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    sub = parser.add_subparsers(dest="command", required=True)
    prepare = sub.add_parser("prepare", help="convert shared data into the catalogue contract")
    prepare.add_argument("what", choices=["sample"])
    prepare.add_argument("--grocery", type=Path, default=Path("../shared/data/grocery/dataset"))
    prepare.add_argument("--out", type=Path, default=Path("sample/grocery"))
    args = parser.parse_args(argv)
    count = write_grocery_sample(args.grocery, args.out)
    print(f"wrote {count} products to {args.out / 'catalogue.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
