"""Command line: `python -m ingest PATH [--catalogue NAME]`; exit 0 ok, 1 nothing ingested, 2 bad setup."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import TextIO

from pydantic import ValidationError

from ingest.pipeline import Ingestor
from ingest.readers import CatalogueError
from retrieval.encoders import EncoderError, ImageEncoder, TextEncoder
from retrieval.runtime import load_encoders
from retrieval.settings import Settings
from retrieval.store import ProductStore, StoreError
from schemas.report import IngestReport, Rejection, RejectionSink
from schemas.search import CATALOGUE_PATTERN

log = logging.getLogger("ingest")
SHOWN_REJECTIONS = 20


def parse_args(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m ingest",
        description="Load a product catalogue (CSV or JSON Lines, a folder of images by category, or a zip of "
        "either) into a Qdrant collection.",
        epilog="Store: QDRANT_URL (+ QDRANT_API_KEY) for a server, else the embedded store at QDRANT_PATH "
        "(default ./data/qdrant). Models: IMAGE_MODEL, TEXT_MODEL.",
    )
    parser.add_argument("path", type=Path, help="catalogue file (.csv, .jsonl), folder (root/<category>/<image>), .zip")
    parser.add_argument("--catalogue", help="collection name (default: DEFAULT_CATALOGUE, 'products')")
    parser.add_argument("--rejects", type=Path, help="write every rejected row and image here (JSON Lines)")
    parser.add_argument(
        "--retailer", help="retailer of a folder's products (default: the folder's name); fills rows that name none"
    )
    parser.add_argument(
        "--product-folders",
        action="store_true",
        help="in a folder layout, a folder of images with no sub-folder is one product with several photos",
    )
    parser.add_argument(
        "--prune",
        action="store_true",
        help="delete the stored products of the feed's retailers that the feed no longer lists "
        "(rows rejected this time are kept)",
    )
    parser.add_argument(
        "--photo-root",
        type=Path,
        action="append",
        default=[],
        metavar="FOLDER",
        help="a folder outside the catalogue's own that its local photo paths may point into (repeat for more); "
        "a photo path anywhere else refuses its row",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    parser.add_argument(
        "--workers",
        type=int,
        help="run the image and text encoders on N Ray workers (a local Ray cluster unless --ray; pip install .[ray])",
    )
    parser.add_argument("--ray", metavar="ADDRESS", help="an existing Ray cluster's address (e.g. ray://head:10001)")
    args = parser.parse_args(argv)
    if args.ray and args.workers is None:
        args.workers = 2
    if args.workers is not None and not 1 <= args.workers <= 256:
        parser.error("--workers must be between 1 and 256")
    return args


def print_summary(report: IngestReport) -> None:
    rejected, skipped = report.rejected_count, report.skipped_count
    print(
        f"catalogue {report.catalogue}: read {report.read} rows from {report.source}\n"
        f"  new {report.new}, updated {report.updated}, unchanged {report.unchanged}, "
        f"rejected rows {rejected}, skipped images {skipped}, images embedded {report.images_embedded}"
        + (f", pruned {report.pruned}" if report.pruned else "")
        + "\n"
        f"  {report.seconds:.1f} s, {report.products_per_second:.1f} products/s"
    )
    for kind, items, count in (
        ("rejected", report.rejected_rows, rejected),
        ("skipped image", report.skipped_images, skipped),
    ):
        for item in items[:SHOWN_REJECTIONS]:
            where = f"line {item.line}" if item.line else "file"
            ident = f" id {item.id}" if item.id else ""
            field = f"{item.field}: " if item.field else ""
            print(f"  {kind}: {where}{ident}: {field}{item.reason}", file=sys.stderr)
        if count > SHOWN_REJECTIONS:
            print(f"  ... {count - SHOWN_REJECTIONS} more {kind} entries (see --rejects)", file=sys.stderr)


def rejects_writer(out: TextIO) -> RejectionSink:
    """Writes each rejection to `out` as a JSON line the moment it happens (`--rejects`)."""

    def write(kind: str, item: Rejection) -> None:
        out.write(json.dumps({"kind": kind, **item.model_dump(exclude_none=True)}, ensure_ascii=False) + "\n")

    return write


# `python -m ingest calibrate|match|adapt|train`: commands of the layer above (cli/), the spellings the README
# uses. The package registers them under this entry-point group (pyproject.toml), so the pipeline finds them at
# run time without importing the layer that uses it.
COMMAND_GROUP = "product_match.ingest_commands"
SUBCOMMANDS = ("calibrate", "match", "adapt", "train")


def subcommand(name: str) -> Callable[[list[str]], int]:
    """The `main(argv)` registered for `python -m ingest NAME`; a checkout that was never installed has none."""
    found = [entry for entry in entry_points(group=COMMAND_GROUP) if entry.name == name]
    if not found:

        def missing(_: list[str]) -> int:
            print(f"error: `{name}` is not installed here: run `make install` (pip install -e .)", file=sys.stderr)
            return 2

        return missing
    command: Callable[[list[str]], int] = found[0].load()
    return command


def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in SUBCOMMANDS:
        return subcommand(argv[0])(argv[1:])
    args = parse_args(argv, prog)
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"error: bad configuration: {exc}", file=sys.stderr)
        return 2
    catalogue = args.catalogue or settings.default_catalogue
    if not re.fullmatch(CATALOGUE_PATTERN, catalogue):
        print(f"error: catalogue name {catalogue!r} must be letters, digits, '_', '-', '.' (max 63)", file=sys.stderr)
        return 2
    try:
        rejects = args.rejects.open("w", encoding="utf-8") if args.rejects else None
    except OSError as exc:
        print(f"error: cannot write the reject report {args.rejects}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    closing: list[Callable[[], None]] = [rejects.close] if rejects is not None else []
    try:
        store = ProductStore.open(settings)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        for close in closing:
            close()
        return 2
    try:
        log.info("loading encoders %s and %s", settings.image_model, settings.text_model)
        encoders: tuple[ImageEncoder, TextEncoder] = load_encoders(settings)
        image_encoder, text_encoder = encoders
        if args.workers is not None:
            from ingest.distributed import RayEncoders

            pool = RayEncoders(
                settings.image_model,
                settings.text_model,
                image_precision=settings.image_precision,
                text_precision=settings.text_precision,
                workers=args.workers,
                address=args.ray,
                batch=settings.batch_size,
            )
            closing.append(pool.close)
            image_encoder, text_encoder = pool.image, pool.text
        # an active image tail runs here, on this process's copy of the model the workers load
        ingestor = Ingestor(settings, store, image_encoder, text_encoder, tail_encoder=encoders[0])
        log.info("ingesting %s into %s (%s)", args.path, catalogue, settings.describe_store(store.engine))
        report = ingestor.run(
            args.path,
            catalogue,
            progress=False if args.no_progress else None,
            retailer=args.retailer,
            product_folders=args.product_folders,
            prune=args.prune,
            photo_roots=args.photo_root,
            on_rejection=rejects_writer(rejects) if rejects is not None else None,
        )
    except (CatalogueError, EncoderError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        for close in closing:
            close()
        store.close()
    print_summary(report)
    if args.rejects:
        print(f"  reject report: {args.rejects}")
    if report.written == 0 and report.unchanged == 0:
        print("error: nothing could be ingested; fix the rows listed above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
