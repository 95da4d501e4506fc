"""`python -m ingest calibrate PAIRS.jsonl --catalogue NAME`: fit and store a catalogue's match model, and say
loudly when its decisions cannot reach the precision asked for."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError

from retrieval.encoders import EncoderError
from retrieval.match.model import (
    DEFAULT_DEPTH,
    DEFAULT_FUSION,
    MIN_HITS,
    check_labels,
    fit_model,
    labelled_candidates,
    unreliable_warning,
)
from retrieval.runtime import open_runtime
from retrieval.settings import Settings
from retrieval.store import ProductStore, StoreError
from schemas.search import Calibration, LabelledPair

UNRELIABLE = 3  # exit code: stored, but its decisions never say 'match' (scripts must notice)


def read_pairs(path: Path) -> list[LabelledPair]:
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                pairs.append(LabelledPair.model_validate_json(line))
            except ValidationError as exc:
                error = exc.errors()[0]
                where = ".".join(str(part) for part in error["loc"])
                message = error["msg"].removeprefix("Value error, ")
                raise ValueError(f"{path} line {number}: {where + ': ' if where else ''}{message}") from None
    return pairs


def curve_table(calibration: Calibration) -> str:
    """The operating points the model offers, as an aligned text table."""
    lines = ["  threshold  precision  recall"]
    lines += [f"  {p.threshold:9.3f}  {p.precision:9.3f}  {p.recall:6.3f}" for p in calibration.curve]
    return "\n".join(lines) if calibration.curve else "  (no threshold finds a true pair)"


def between_0_and_1(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return value


def parse_args(argv: list[str], prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m ingest calibrate",
        description="Fit the match decision of a catalogue from labelled pairs and store it with the catalogue.",
        epilog='PAIRS: JSON Lines, {"product": {"retailer": "a", "id": "1"}, "expect": ["b-7"]} per line; '
        "expect lists the ids of the same product in other retailers ([] if none). "
        "Exit codes: 0 stored, its 'match' decisions at the target (or accepted) precision out-of-fold; "
        f"{UNRELIABLE} stored but unreliable: no threshold reached that precision, so it re-ranks and decides "
        "'uncertain' / 'no_match' only (a WARNING and the precision / recall it can offer are printed: "
        "choose one with --accept-precision); 2 nothing stored (bad input, too few labels, store or encoder error).",
    )
    parser.add_argument("pairs", type=Path)
    parser.add_argument("--catalogue", required=True)
    parser.add_argument("--target-precision", type=between_0_and_1, default=0.95)
    parser.add_argument(
        "--accept-precision",
        type=between_0_and_1,
        help="a lower precision to decide 'match' at when the target is not reached (pick it from the curve "
        "printed by a run that warned)",
    )
    parser.add_argument(
        "--depth", type=int, default=DEFAULT_DEPTH, help="candidates per product that the model re-ranks"
    )
    parser.add_argument(
        "--fusion", choices=["rrf", "dbsf"], default=DEFAULT_FUSION, help="the fusion that finds the candidates"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.depth <= 100:
        parser.error("--depth must be between 1 and 100")
    if args.accept_precision is not None and args.accept_precision >= args.target_precision:
        parser.error("--accept-precision must be below --target-precision")
    return args


def report(catalogue: str, products: int, calibration: Calibration, notes: list[str]) -> int:
    """Say what was stored (stdout) and what it cannot do (stderr); the exit code."""
    for note in notes:
        print(f"WARNING: {note}", file=sys.stderr)
    warning = unreliable_warning(calibration)
    if warning is not None:
        print(f"WARNING: catalogue {catalogue}: {warning}", file=sys.stderr)
        print(
            f"What it can offer (out-of-fold, at least {MIN_HITS} true matches a point):\n{curve_table(calibration)}",
            file=sys.stderr,
        )
    elif calibration.accepted_precision is not None:
        print(
            f"WARNING: catalogue {catalogue}: the target precision {calibration.target_precision:.2f} was not "
            f"reached; 'match' is decided at the accepted precision {calibration.accepted_precision:.2f}",
            file=sys.stderr,
        )
    match = "never decided (unreliable)" if warning else f"at p >= {calibration.match_threshold:.3f}"
    print(
        f"catalogue {catalogue}: calibrated on {products} products, {calibration.candidates} candidates; "
        f"match {match} (out-of-fold precision {calibration.precision:.3f}, recall {calibration.recall:.3f}), "
        f"uncertain at p >= {calibration.uncertain_threshold:.3f}"
    )
    return UNRELIABLE if warning else 0


def main(argv: list[str], *, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    try:
        settings = Settings()
        pairs = read_pairs(args.pairs)
        store = ProductStore.open(settings)
    except (ValidationError, ValueError, OSError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        store.info(args.catalogue)  # an unknown catalogue is said first
        check_labels(store, args.catalogue, pairs)
        engine = open_runtime(settings, store=store).engine
        data = labelled_candidates(engine, args.catalogue, pairs, depth=args.depth, fusion=args.fusion)
        fitted = fit_model(
            data,
            target_precision=args.target_precision,
            accept_precision=args.accept_precision,
            depth=args.depth,
            fusion=args.fusion,
            source=str(args.pairs),
            adapters=store.info(args.catalogue).adapters,
        )
        store.save_calibration(args.catalogue, fitted.calibration)
    except (EncoderError, StoreError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
    return report(args.catalogue, len(pairs), fitted.calibration, fitted.notes)
