"""`python -m ingest calibrate PAIRS.jsonl --catalogue NAME`: fit and store a catalogue's match model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError

from retrieval.encoders import EncoderError
from retrieval.match.model import DEFAULT_DEPTH, DEFAULT_FUSION, fit, labelled_candidates
from retrieval.runtime import open_runtime
from retrieval.settings import Settings
from retrieval.store import ProductStore, StoreError
from schemas.search import LabelledPair


def read_pairs(path: Path) -> list[LabelledPair]:
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                pairs.append(LabelledPair.model_validate_json(line))
            except ValidationError as exc:
                raise ValueError(f"{path} line {number}: {exc.errors()[0]['msg']}") from None
    return pairs


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ingest calibrate",
        description="Fit the match decision of a catalogue from labelled pairs and store it with the catalogue.",
        epilog='PAIRS: JSON Lines, {"product": {"retailer": "a", "id": "1"}, "expect": ["b-7"]} per line; '
        "expect lists the ids of the same product in other retailers ([] if none).",
    )
    parser.add_argument("pairs", type=Path)
    parser.add_argument("--catalogue", required=True)
    parser.add_argument("--target-precision", type=float, default=0.95)
    parser.add_argument(
        "--depth", type=int, default=DEFAULT_DEPTH, help="candidates per product that the model re-ranks"
    )
    parser.add_argument(
        "--fusion", choices=["rrf", "dbsf"], default=DEFAULT_FUSION, help="the fusion that finds the candidates"
    )
    args = parser.parse_args(argv)
    if not 0 < args.target_precision < 1 or not 1 <= args.depth <= 100:
        parser.error("--target-precision must be between 0 and 1, --depth between 1 and 100")
    try:
        settings = Settings()
        pairs = read_pairs(args.pairs)
        store = ProductStore.open(settings)
    except (ValidationError, ValueError, OSError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        engine = open_runtime(settings, store=store).engine
        data = labelled_candidates(engine, args.catalogue, pairs, depth=args.depth, fusion=args.fusion)
        calibration = fit(
            data,
            target_precision=args.target_precision,
            depth=args.depth,
            fusion=args.fusion,
            source=str(args.pairs),
            adapters=store.info(args.catalogue).adapters,
        )
        store.save_calibration(args.catalogue, calibration)
    except (EncoderError, StoreError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
    print(
        f"catalogue {args.catalogue}: calibrated on {len(pairs)} products, {calibration.candidates} candidates; "
        f"match at p >= {calibration.match_threshold:.3f} (out-of-fold precision {calibration.precision:.3f}, "
        f"recall {calibration.recall:.3f}), uncertain at p >= {calibration.uncertain_threshold:.3f}"
    )
    return 0
