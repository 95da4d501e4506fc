"""What reviewers said of pairs of listings, kept beside the store (SQLite): the review loop's labels.

A label is (left, right, same) with who said it and when; `right` missing with `same` false says the left
product has no counterpart in the other shops. Labels are keyed by retailer and id, never by point, so they
outlive re-ingests and a catalogue rebuilt from scratch. The same answer given twice is one label; two
answers that cannot both hold (same and different for one pair, either way round; or same and "no
counterpart" for one product) are both kept and reported as a contradiction, and neither is used until one
of them is deleted. `pairs` turns the rest into the pairs format that `calibrate` and `train` read: one line
per left product, its "same" answers as a partial `expect` (a reviewer judged those pairs, not every other
candidate), its "different" answers as `reject`, and "no counterpart" as `expect: []`."""

from __future__ import annotations

import sqlite3
import threading
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from schemas.search import LabelIn, LabelledPair, ProductRef, StoredLabel

_SCHEMA = """
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    catalogue TEXT NOT NULL,
    left_retailer TEXT NOT NULL,
    left_id TEXT NOT NULL,
    right_retailer TEXT NOT NULL,  -- '' with right_id '': no counterpart
    right_id TEXT NOT NULL,
    same INTEGER NOT NULL,
    who TEXT NOT NULL,
    at TEXT NOT NULL,
    UNIQUE (catalogue, left_retailer, left_id, right_retailer, right_id, same)
);
CREATE INDEX IF NOT EXISTS labels_by_catalogue ON labels (catalogue, id);
"""
SOURCE = "review labels"  # the `source` of a match model trained on them (a later round knows it is its own)
_COLUMNS = "id, left_retailer, left_id, right_retailer, right_id, same, who, at"
Key = tuple[str, str]
Answer = tuple[int, Key, Key | None, bool]  # a label's id, left, right (None: no counterpart), same


class LabelBook:
    """The labels of every catalogue of one store, in one SQLite file (WAL: the service writes while a CLI
    `train --labels` reads). Thread-safe: one connection behind a lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    @contextmanager
    def _cursor(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._db

    def add(self, catalogue: str, label: LabelIn) -> tuple[StoredLabel, bool]:
        """Store `label` (True), or find the same answer given before (False): the stored label either way."""
        right = label.right
        key = (
            catalogue,
            label.left.retailer,
            label.left.id,
            right.retailer if right else "",
            right.id if right else "",
            int(label.same),
        )
        at = datetime.now(UTC).isoformat(timespec="seconds")
        with self._cursor() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO labels (catalogue, left_retailer, left_id, right_retailer, right_id, same, "
                "who, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (*key, label.who, at),
            )
            created = cursor.rowcount == 1
            row = db.execute(
                f"SELECT {_COLUMNS} FROM labels WHERE catalogue = ? AND left_retailer = ? AND left_id = ? "
                "AND right_retailer = ? AND right_id = ? AND same = ?",
                key,
            ).fetchone()
        return _stored(row), created

    def delete(self, catalogue: str, label_id: int) -> bool:
        with self._cursor() as db:
            return db.execute("DELETE FROM labels WHERE catalogue = ? AND id = ?", (catalogue, label_id)).rowcount == 1

    def labels(self, catalogue: str, *, offset: int = 0, limit: int = -1) -> list[StoredLabel]:
        with self._cursor() as db:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM labels WHERE catalogue = ? ORDER BY id LIMIT ? OFFSET ?",
                (catalogue, limit, offset),
            ).fetchall()
        return [_stored(row) for row in rows]

    def count(self, catalogue: str) -> int:
        with self._cursor() as db:
            return int(db.execute("SELECT COUNT(*) FROM labels WHERE catalogue = ?", (catalogue,)).fetchone()[0])

    def _answers(self, catalogue: str) -> list[Answer]:
        """Every label as plain tuples (id, left, right or None, same), in order: what the queue, the checks
        and the export read on every call, without building a model object per label."""
        with self._cursor() as db:
            rows = db.execute(
                "SELECT id, left_retailer, left_id, right_retailer, right_id, same FROM labels WHERE catalogue = ? "
                "ORDER BY id",
                (catalogue,),
            ).fetchall()
        return [(int(i), (lr, li), (rr, ri) if rr else None, bool(same)) for i, lr, li, rr, ri, same in rows]

    def contradictions(self, catalogue: str) -> list[list[int]]:
        """Groups of label ids that cannot all hold, each group sorted, groups in order of their first id."""
        return _contradictions(self._answers(catalogue))

    def asked(self, catalogue: str) -> tuple[set[Key], set[tuple[Key, Key]]]:
        """(left products with an answer, the pairs answered either way round, and left -> none)."""
        lefts: set[Key] = set()
        pairs: set[tuple[Key, Key]] = set()
        for _, left, right, _ in self._answers(catalogue):
            other = right or ("", "")
            lefts.add(left)
            pairs.update({(left, other), (other, left)})
        return lefts, pairs

    def pairs(self, catalogue: str) -> list[LabelledPair]:
        """The labels without contradictions, as pairs-format lines (one per left product, in order of its first
        label)."""
        answers = self._answers(catalogue)
        contradicted = {i for group in _contradictions(answers) for i in group}
        same: dict[Key, list[ProductRef]] = defaultdict(list)
        different: dict[Key, list[ProductRef]] = defaultdict(list)
        alone: set[Key] = set()
        order: dict[Key, None] = {}
        for label_id, left, right, is_same in answers:
            if label_id in contradicted:
                continue
            order[left] = None
            if right is None:
                alone.add(left)
            else:
                (same if is_same else different)[left].append(ProductRef(retailer=right[0], id=right[1]))
        out = []
        for left in order:
            product = ProductRef(retailer=left[0], id=left[1])
            reject = list(different.get(left, []))
            if same.get(left):
                out.append(LabelledPair(product=product, expect=same[left], reject=reject, partial=True))
            elif left in alone:
                out.append(LabelledPair(product=product, expect=[], reject=reject))
            else:
                out.append(LabelledPair(product=product, reject=reject))
        return out

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _stored(row: tuple[object, ...]) -> StoredLabel:
    label_id, left_retailer, left_id, right_retailer, right_id, same, who, at = row
    right = ProductRef(retailer=str(right_retailer), id=str(right_id)) if right_retailer else None
    return StoredLabel(
        id=int(label_id),  # type: ignore[call-overload]
        left=ProductRef(retailer=str(left_retailer), id=str(left_id)),
        right=right,
        same=bool(same),
        who=str(who),
        at=str(at),
    )


def _contradictions(answers: list[Answer]) -> list[list[int]]:
    by_pair: dict[frozenset[Key], dict[bool, list[int]]] = defaultdict(lambda: defaultdict(list))
    same_of: dict[Key, list[int]] = defaultdict(list)  # products said to be the same as some listing
    alone_of: dict[Key, list[int]] = defaultdict(list)  # products said to have no counterpart
    for label_id, left, right, is_same in answers:
        if right is None:
            alone_of[left].append(label_id)
            continue
        by_pair[frozenset((left, right))][is_same].append(label_id)
        if is_same:
            same_of[left].append(label_id)
            same_of[right].append(label_id)
    groups = [sorted(said[True] + said[False]) for said in by_pair.values() if said[True] and said[False]]
    groups += [sorted(alone_of[key] + same_of[key]) for key in alone_of if same_of.get(key)]
    return sorted(groups)
