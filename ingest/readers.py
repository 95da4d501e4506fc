"""Catalogue readers: CSV and JSON Lines rows with their line numbers, or a rejection per bad row."""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from pydantic import ValidationError

from schemas.catalogue import CatalogueRecord
from schemas.report import Rejection

CSV_SUFFIXES = {".csv"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
MAX_FIELD_CHARS = 4_000_000  # the CSV reader's limit on one field; the contract's own limits are far lower
SHOWN_ID_CHARS = 256


class CatalogueError(ValueError):
    """The catalogue file as a whole cannot be read (missing, wrong format, not UTF-8)."""


@dataclass(frozen=True)
class RawRow:
    line: int
    data: dict[str, Any]


def _checked_utf8(path: Path) -> None:
    """A file that is not UTF-8 is refused before any of its rows is used, read block by block (a catalogue
    of any size costs one block of memory, not the whole file and a copy)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        with path.open("rb") as raw:
            while block := raw.read(1 << 20):
                try:
                    decoder.decode(block)
                except UnicodeDecodeError as exc:
                    raise CatalogueError(
                        f"{path} is not UTF-8 (bad byte at offset {offset + exc.start}); re-save the file as UTF-8"
                    ) from None
                offset += len(block)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise CatalogueError(f"{path} is not UTF-8 (it ends inside a character); re-save the file as UTF-8") from None
    except OSError as exc:
        raise CatalogueError(f"cannot read {path}: {exc.strerror or exc}") from exc


@contextmanager
def _lines(path: Path) -> Iterator[TextIO]:
    """The catalogue as text, streamed (UTF-8, a byte order mark dropped), once it is known to be UTF-8."""
    _checked_utf8(path)
    try:
        with path.open(encoding="utf-8-sig", newline="") as text:
            yield text
    except OSError as exc:
        raise CatalogueError(f"cannot read {path}: {exc.strerror or exc}") from exc


def read_csv(path: Path) -> Iterator[RawRow | Rejection]:
    csv.field_size_limit(MAX_FIELD_CHARS)
    with _lines(path) as text:
        yield from _csv_rows(path, csv.DictReader(text))


def _csv_rows(path: Path, reader: csv.DictReader[str]) -> Iterator[RawRow | Rejection]:
    header = reader.fieldnames or []
    if not header:
        raise CatalogueError(f"{path} is empty: the first line must be a header (id,retailer,title,...)")
    blank = [i + 1 for i, name in enumerate(header) if not name.strip()]
    if blank:
        raise CatalogueError(f"{path}: header column(s) {blank} have no name")
    line = reader.line_num + 1  # where the next row starts
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            reason = f"unreadable CSV row: {exc}"
            if "field larger than field limit" in str(exc):
                reason = (
                    f"unreadable CSV row: a field is longer than {MAX_FIELD_CHARS:,} characters, the reader's limit "
                    "(or a quote is not closed)"
                )
            yield Rejection(line=line, reason=reason)
            line = reader.line_num + 1
            continue
        if None in row:
            yield Rejection(
                line=line, reason=f"row has {len(header) + len(row[None])} fields but the header has {len(header)}"
            )
        elif any(v is None for v in row.values()):
            yield Rejection(line=line, reason=f"row has fewer fields than the header's {len(header)}")
        else:
            yield RawRow(line, dict(row))
        line = reader.line_num + 1


def read_jsonl(path: Path) -> Iterator[RawRow | Rejection]:
    with _lines(path) as text:
        yield from _jsonl_rows(text)


def _jsonl_rows(text: TextIO) -> Iterator[RawRow | Rejection]:
    for number, raw in enumerate(text, start=1):
        if not raw.strip():
            continue
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            yield Rejection(line=number, reason=f"invalid JSON: {exc.msg} at column {exc.colno}")
            continue
        if not isinstance(data, dict):
            yield Rejection(line=number, reason=f"expected a JSON object, got {type(data).__name__}")
            continue
        yield RawRow(number, data)


def read_rows(path: Path) -> Iterator[RawRow | Rejection]:
    """Rows of a catalogue file, chosen by its suffix."""
    if path.is_dir():
        raise CatalogueError(f"{path} is a folder; give the catalogue file inside it (.csv or .jsonl)")
    if not path.exists():
        raise CatalogueError(f"{path} does not exist")
    suffix = path.suffix.lower()
    if suffix in CSV_SUFFIXES:
        return read_csv(path)
    if suffix in JSONL_SUFFIXES:
        return read_jsonl(path)
    raise CatalogueError(f"{path}: unknown catalogue format {suffix!r}; use .csv, .jsonl, .ndjson, a folder or .zip")


def _rejection(row: RawRow, error: ValidationError) -> Rejection:
    first = error.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or None
    message = first["msg"].removeprefix("Value error, ")
    raw_id = row.data.get("id")
    ident = str(raw_id) if raw_id not in (None, "") else None
    if ident is not None and len(ident) > SHOWN_ID_CHARS:  # an absurd id is named, not copied whole
        ident = ident[:SHOWN_ID_CHARS] + "..."
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return Rejection(line=row.line, id=ident, field=field, reason=message + more)


def validated_records(path: Path) -> Iterator[CatalogueRecord | Rejection]:
    """Validated records of a catalogue file in file order; duplicates of an earlier (retailer, id) are rejected."""
    yield from validate_rows(read_rows(path))


def validate_rows(rows: Iterable[RawRow | Rejection]) -> Iterator[CatalogueRecord | Rejection]:
    """Validated records in the rows' order; duplicates of an earlier (retailer, id) are rejected."""
    seen: dict[tuple[str, str], int] = {}
    for item in rows:
        if isinstance(item, Rejection):
            yield item
            continue
        try:
            record = CatalogueRecord.from_row(item.data, line=item.line)
        except ValidationError as exc:
            yield _rejection(item, exc)
            continue
        key = (record.retailer, record.id)
        if key in seen:
            yield Rejection(
                line=record.line,
                id=record.id,
                field="id",
                reason=f"duplicate of line {seen[key]} (same retailer and id)",
            )
            continue
        seen[key] = record.line
        yield record
