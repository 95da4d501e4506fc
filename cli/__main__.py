"""`product-match COMMAND [options]` (also `python -m cli`): ingest, calibrate, match, adapt, train, serve,
bench.

Each command is the module the README documents (`python -m ingest`, `python -m ingest calibrate`, ...,
`python -m service`), given the rest of the command line: its `--help` is that command's own."""

from __future__ import annotations

import importlib
import os
import runpy
import sys
from collections.abc import Callable

# command -> (module with main(argv), what it does)
COMMANDS: dict[str, tuple[str, str]] = {
    "ingest": ("ingest.__main__", "load a catalogue file, folder or zip into a catalogue"),
    "calibrate": ("cli.calibrate", "fit the match model on labelled pairs, store it with the catalogue"),
    "match": ("cli.match", "match a retailer's products against the others, to a resumable CSV"),
    "adapt": ("cli.adapt", "fit, list, switch or roll back a catalogue's adaptation heads"),
    "train": ("cli.train", "train on labels: text encoder, image head, cross-encoder, match model; keep what wins"),
    "serve": ("service.__main__", "serve the HTTP API and the web page"),
    "bench": ("bench", "quality and speed benchmarks (from a checkout of the project)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name.ljust(width)}  {about}" for name, (_, about) in COMMANDS.items()]
    return "usage: product-match COMMAND [options]   (product-match COMMAND --help)\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"product-match: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = COMMANDS[name][0]
    if name == "bench":  # not part of the installed package: it runs from a checkout, as `python -m bench`
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        sys.argv = ["python -m bench", *rest]
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except ImportError:
            print("product-match bench: run it from a checkout of the project (python -m bench)", file=sys.stderr)
            return 2
        except SystemExit as done:
            return int(done.code or 0) if not isinstance(done.code, str) else 1
        return 0
    command: Callable[..., int] = importlib.import_module(module).main
    return command(rest, prog=f"product-match {name}")


if __name__ == "__main__":
    sys.exit(main())
