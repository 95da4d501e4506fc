"""`python -m ingest match --catalogue C --retailer R --out matches.csv`: match every product of one
retailer against the other retailers of a catalogue, writing (left, right, scores, decision) rows."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from pydantic import ValidationError
from tqdm import tqdm

from retrieval.encoders import EncoderError
from retrieval.match.batch import NO_CANDIDATE, as_csv, done_products, match_retailer
from retrieval.match.model import active_model
from retrieval.runtime import open_runtime
from retrieval.settings import Settings
from retrieval.store import ProductStore, StoreError

SYNC_EVERY = 50  # products between fsyncs of the output file


def parse_args(argv: list[str], prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m ingest match",
        description="Match every product of one retailer against the other retailers of a catalogue.",
        epilog="Each product gets --limit rows (rank 1 first): the candidate, its scores, and the decision of "
        "the catalogue's calibration ('uncalibrated' without one; see `python -m ingest calibrate`; an "
        "unreliable calibration decides 'uncertain' / 'no_match' only, and says so on stderr). "
        "A killed run continues where it stopped with --resume.",
    )
    parser.add_argument("--catalogue", required=True)
    parser.add_argument("--retailer", required=True, help="the retailer whose products are matched")
    parser.add_argument("--against", nargs="+", default=[], help="only these retailers (default: all others)")
    parser.add_argument("--out", type=Path, required=True, help="CSV file to write")
    parser.add_argument("--limit", type=int, default=3, help="candidates per product (1-100, default 3)")
    parser.add_argument("--fusion", choices=["rrf", "dbsf"], help="default: the calibration's, else dbsf")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue an earlier run's --out file")
    group.add_argument("--overwrite", action="store_true", help="start again, replacing --out")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if not 1 <= args.limit <= 100:
        parser.error("--limit must be between 1 and 100")
    if args.retailer in args.against:
        parser.error("--against cannot name the --retailer itself")
    return args


def main(argv: list[str], *, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    if args.out.exists() and not (args.resume or args.overwrite):
        print(f"error: {args.out} exists: add --resume to continue it or --overwrite to start again", file=sys.stderr)
        return 2
    try:
        settings = Settings()
        done = done_products(args.out) if args.resume and args.out.exists() else set()
        store = ProductStore.open(settings)
    except (ValidationError, ValueError, OSError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    started, matched, decided, empty = time.perf_counter(), 0, 0, 0
    try:
        engine = open_runtime(settings, store=store).engine
        store.check_encoders(args.catalogue, engine.fingerprint)
        ids = list(store.product_ids(args.catalogue, args.retailer))
        if not ids:
            print(f"error: catalogue {args.catalogue!r} has no products of retailer {args.retailer!r}", file=sys.stderr)
            return 2
        active = active_model(store, args.catalogue, models_root=engine.models_root)
        if active.warning:
            print(f"WARNING: catalogue {args.catalogue}: {active.warning}", file=sys.stderr)
        fresh = not done
        with args.out.open("w" if fresh else "a", encoding="utf-8", newline="") as out:
            if fresh:
                out.write(as_csv([], header=True))
            progress = tqdm(
                total=len(ids), initial=len(done & set(ids)), unit="product", disable=args.no_progress or None
            )
            batches = match_retailer(
                engine,
                args.catalogue,
                args.retailer,
                against=args.against,
                limit=args.limit,
                fusion=args.fusion,
                product_ids=ids,
                skip=done.__contains__,
            )
            for rows in batches:
                out.write(as_csv(rows, header=False))  # one write per product: a kill cuts at most one
                matched += 1
                decided += sum(row["decision"] == "match" for row in rows)
                empty += rows[0]["decision"] == NO_CANDIDATE
                if matched % SYNC_EVERY == 0:
                    out.flush()
                    os.fsync(out.fileno())
                progress.update(1)
            progress.close()
    except (EncoderError, StoreError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
    seconds = time.perf_counter() - started
    print(
        f"catalogue {args.catalogue}: matched {matched} products of {args.retailer} "
        f"({len(done)} done before, {empty} without candidates) in {seconds:.1f} s; "
        + ("(decided by the default model, not fitted on your labels) " if active.name == "default" else "")
        + (
            f"{decided} decided 'match'"
            if active.reliable
            else "unreliable calibration: no 'match' decisions (see the WARNING above)"
            if active.calibration
            else "uncalibrated: no decisions (see ingest calibrate)"
        )
        + f"; rows in {args.out}"
    )
    return 0
