"""Batch matching: every product of one retailer against the others, as rows of (left, right, scores,
decision). The command line writes them to a CSV it can resume; the service runs small batches as jobs."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from retrieval.match.model import active_calibration, find_matches
from retrieval.search import SearchEngine
from schemas.payload import Product
from schemas.search import Fusion, MatchResult, SearchFilters

COLUMNS = (
    "left_retailer",
    "left_id",
    "left_title",
    "rank",
    "right_retailer",
    "right_id",
    "right_title",
    "score",
    "image",
    "text",
    "lexical",
    "confidence",
    "decision",
)
NO_CANDIDATE = "no_candidate"  # the decision of the one row written for a product nothing was found for

Row = dict[str, str]
# A cell a spreadsheet would run as a formula (`=HYPERLINK(...)`, `+1+1`, `-2+3+cmd|...`, `@SUM(...)`, or one that
# starts with a tab or a carriage return) gets a leading `'`, which spreadsheets show as text; numbers stay as
# they are. Titles and ids come from catalogues, so any of them may be such a cell.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def spreadsheet_safe(cell: str) -> str:
    """`cell` as a spreadsheet will show it and never run it (OWASP's CSV injection advice)."""
    if cell.startswith(_FORMULA_START) and not _NUMBER.fullmatch(cell):
        return "'" + cell
    return cell


def _unescaped(cell: str) -> str:
    """What `spreadsheet_safe` was given (for reading back a file this module wrote; a short row's missing
    cells, None, stay None)."""
    if isinstance(cell, str) and cell.startswith("'") and cell[1:].startswith(_FORMULA_START):
        return cell[1:]
    return cell


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def rows_for(product: Product, matches: Sequence[MatchResult]) -> list[Row]:
    """One row per candidate; a product without candidates still gets one row (so a resume skips it)."""
    left = {"left_retailer": product.retailer, "left_id": product.id, "left_title": product.title or ""}
    if not matches:
        return [{**dict.fromkeys(COLUMNS, ""), **left, "rank": "0", "decision": NO_CANDIDATE}]
    return [
        {
            **left,
            "rank": str(rank),
            "right_retailer": m.retailer,
            "right_id": m.id,
            "right_title": m.product.title or "",
            "score": _number(m.score),
            "image": _number(m.scores.image),
            "text": _number(m.scores.text),
            "lexical": _number(m.scores.lexical),
            "confidence": _number(m.confidence),
            "decision": m.decision,
        }
        for rank, m in enumerate(matches, start=1)
    ]


def match_retailer(
    engine: SearchEngine,
    catalogue: str,
    retailer: str,
    *,
    against: Sequence[str] = (),
    limit: int = 3,
    fusion: Fusion | None = None,
    product_ids: Iterable[str] | None = None,
    skip: Callable[[str], bool] = lambda _: False,
) -> Iterator[list[Row]]:
    """For each product of `retailer` (or of `product_ids`), its best `limit` candidates in the other
    retailers (only those in `against` when given), re-ranked and decided by the catalogue's calibration."""
    calibration = active_calibration(engine.store, catalogue, models_root=engine.models_root)
    filters = SearchFilters(retailer=list(against))
    for product_id in engine.store.product_ids(catalogue, retailer) if product_ids is None else product_ids:
        if skip(product_id):
            continue
        product, matches = find_matches(
            engine,
            catalogue,
            retailer,
            product_id,
            calibration=calibration,
            limit=limit,
            filters=filters,
            fusion=fusion,
        )
        yield rows_for(product, matches)


def as_csv(rows: Iterable[Row], *, header: bool) -> str:
    out = io.StringIO()
    # RFC 4180 line ends: with "\n" alone, a cell holding "\r" would be written unquoted and split its row
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\r\n")
    if header:
        writer.writeheader()
    writer.writerows({key: spreadsheet_safe(value) for key, value in row.items()} for row in rows)
    return out.getvalue()


def done_products(path: Path) -> set[str]:
    """Products already matched in an output file of an earlier (maybe killed) run. When the run was
    killed mid-line, the cut line and the rest of that product's rows are removed, so that product is
    matched again."""
    data = path.read_bytes()
    cut = bool(data) and not data.endswith(b"\n")
    try:
        reader = csv.DictReader(io.StringIO(data[: data.rfind(b"\n") + 1].decode("utf-8"), newline=""))
        rows = [{key: _unescaped(value) for key, value in row.items()} for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{path} cannot be read as a matches file: {exc}") from None
    if reader.fieldnames is not None and list(reader.fieldnames) != list(COLUMNS):
        raise ValueError(f"{path} is not a matches file of this tool (its columns: {', '.join(reader.fieldnames)})")
    if cut:
        last = rows[-1]["left_id"] if rows else None
        rows = [row for row in rows if row["left_id"] != last]
        path.write_text(as_csv(rows, header=True), encoding="utf-8")
    return {row["left_id"] for row in rows}
