"""Incremental and resumable ingest: stored photo vectors reused, --prune, and a real ingest killed with
SIGKILL then finished by a re-run that equals an uninterrupted run."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ingest.__main__ import main as ingest_main
from ingest.pipeline import Ingestor
from retrieval.settings import Settings
from retrieval.store import IMAGE_VECTOR, TEXT_VECTOR, ProductStore
from tests.conftest import GROCERY, ROOT, sample_rows, write_catalogue


def grocery_feed(folder: Path, products: int) -> Path:
    """`products` rows, one distinct in-store photo each (absolute paths), retailer `shop`."""
    photos = sorted((GROCERY / "train").rglob("*.jpg"))[::7][:products]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "catalogue.csv"
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["id", "retailer", "title", "category", "price", "image"])
        for i, photo in enumerate(photos):
            writer.writerow([f"p{i}", "shop", f"{photo.parent.name} {i}", "Grocery", 10 + i, photo.resolve()])
    return path


def snapshot(settings: Settings, catalogue: str) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """point id -> (payload without its write time, vectors)."""
    store = ProductStore.open(settings)
    try:
        out = {}
        for point in store.points(catalogue, with_vectors=True):
            payload = {k: v for k, v in (point.payload or {}).items() if k != "ingested_at"}
            out[str(point.id)] = (payload, point.vector if isinstance(point.vector, dict) else {})
        return out
    finally:
        store.close()


def test_changed_fields_reuse_the_stored_photo_vectors(ingestor: Ingestor, catalogue_name: str, tmp_path: Path) -> None:
    rows = sample_rows(8)
    first = ingestor.run(write_catalogue(tmp_path / "a", rows), catalogue_name, progress=False)
    assert (first.new, first.images_embedded) == (8, 8)
    rows[2]["title"] = "Renamed product"
    rows[5]["description"] = "A new description"
    second = ingestor.run(write_catalogue(tmp_path / "b", rows), catalogue_name, progress=False)
    assert (second.updated, second.unchanged, second.images_embedded) == (2, 6, 0)  # fields changed, photos not

    rows[3]["image"] = rows[4]["image"]  # product 3 now shows product 4's photo: its vector is reused
    third = ingestor.run(write_catalogue(tmp_path / "c", rows), catalogue_name, progress=False)
    assert (third.updated, third.images_embedded) == (1, 0)
    stored = list(ingestor.store.points(catalogue_name, with_vectors=[IMAGE_VECTOR]))
    by_id = {p.payload["product_id"]: p for p in stored if p.payload}
    three, four = (by_id[rows[i]["id"]].vector for i in (3, 4))
    assert isinstance(three, dict) and isinstance(four, dict)
    np.testing.assert_allclose(np.asarray(three[IMAGE_VECTOR]), np.asarray(four[IMAGE_VECTOR]))


def test_photo_files_with_their_stored_size_and_time_are_not_read_again(
    ingestor: Ingestor, catalogue_name: str, tmp_path: Path
) -> None:
    """A re-ingest takes the stored hash of a photo file whose size and modification time are unchanged (as
    git and rsync trust a file's stat): a photo overwritten with garbage of the same size and given back its
    times goes unnoticed (had it been read, it would be a changed product with an undecodable photo); a file
    replaced for real is read, and its product updated with the new photo's hash."""
    rows = sample_rows(6)
    feed = write_catalogue(tmp_path / "a", rows)
    assert ingestor.run(feed, catalogue_name, progress=False).new == 6
    photo, replacement = (feed.parent / rows[i]["image"] for i in (0, 1))
    before = photo.stat()
    photo.write_bytes(b"\0" * before.st_size)
    os.utime(photo, ns=(before.st_atime_ns, before.st_mtime_ns))
    again = ingestor.run(feed, catalogue_name, progress=False)
    assert (again.unchanged, again.updated, again.skipped_images) == (6, 0, [])
    rows[2]["title"] = "Renamed"  # a changed row whose photo is not read: its stored vector is reused
    with feed.open("w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    renamed = ingestor.run(feed, catalogue_name, progress=False)
    assert (renamed.unchanged, renamed.updated, renamed.images_embedded, renamed.skipped_images) == (5, 1, 0, [])

    photo.write_bytes(replacement.read_bytes())  # another size and a new modification time
    edited = ingestor.run(feed, catalogue_name, progress=False)
    assert (edited.unchanged, edited.updated, edited.skipped_images) == (5, 1, [])
    stored = {p.payload["product_id"]: p.payload for p in ingestor.store.points(catalogue_name) if p.payload}
    assert stored[rows[0]["id"]]["image_hashes"] == stored[rows[1]["id"]]["image_hashes"]
    assert stored[rows[0]["id"]]["image_files"] == [f"{photo.stat().st_size}:{photo.stat().st_mtime_ns}"]


def test_prune_deletes_what_left_the_feed_and_keeps_rejected_rows(
    ingestor: Ingestor, catalogue_name: str, tmp_path: Path
) -> None:
    rows = sample_rows(10)
    other = [{**r, "retailer": "other-shop"} for r in sample_rows(3)]
    ingestor.run(write_catalogue(tmp_path / "a", rows + other), catalogue_name, progress=False)
    kept = rows[:6]
    broken = {**rows[6], "price": "not a price"}  # rejected this time: must not be pruned for it
    report = ingestor.run(write_catalogue(tmp_path / "b", [*kept, broken]), catalogue_name, progress=False, prune=True)
    assert (report.unchanged, len(report.rejected_rows), report.pruned) == (6, 1, 3)  # rows 7, 8, 9 left
    left = {p.payload["product_id"] for p in ingestor.store.points(catalogue_name) if p.payload}
    assert left == {r["id"] for r in rows[:7]} | {r["id"] for r in other}  # other-shop was not in the feed


def test_killed_ingest_is_finished_by_a_rerun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    feed = grocery_feed(tmp_path / "feed", 96)
    env = {k: v for k, v in os.environ.items() if not k.startswith("QDRANT_")}
    env.update(QDRANT_PATH=str(tmp_path / "killed"), INGEST_CHUNK="16", PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "ingest", str(feed), "--catalogue", "c", "--no-progress", "--photo-root", str(GROCERY)],
        cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert process.stderr is not None
    stored_lines = 0
    deadline = time.monotonic() + 240
    while stored_lines < 2 and time.monotonic() < deadline:
        line = process.stderr.readline()
        assert line or process.poll() is None, "ingest ended before it could be killed"
        stored_lines += "stored chunk" in line
    process.send_signal(signal.SIGKILL)  # no clean-up of any kind: the store folder is as the kill left it
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL

    monkeypatch.setenv("QDRANT_PATH", str(tmp_path / "killed"))
    monkeypatch.setenv("INGEST_CHUNK", "16")
    for key in ("QDRANT_URL", "IMAGE_MODEL", "TEXT_MODEL"):
        monkeypatch.delenv(key, raising=False)
    capsys.readouterr()
    assert ingest_main([str(feed), "--catalogue", "c", "--no-progress", "--photo-root", str(GROCERY)]) == 0
    counts = re.search(r"new (\d+), updated (\d+), unchanged (\d+)", capsys.readouterr().out)
    assert counts is not None
    new, updated, unchanged = map(int, counts.groups())
    assert unchanged >= 32 and new + unchanged == 96 and updated == 0  # what the killed run stored is kept
    monkeypatch.setenv("QDRANT_PATH", str(tmp_path / "whole"))
    assert ingest_main([str(feed), "--catalogue", "c", "--no-progress", "--photo-root", str(GROCERY)]) == 0

    resumed = snapshot(Settings(qdrant_path=tmp_path / "killed"), "c")
    whole = snapshot(Settings(qdrant_path=tmp_path / "whole"), "c")
    assert len(resumed) == len(whole) == 96 and resumed.keys() == whole.keys()
    for point, (payload, vectors) in whole.items():
        assert resumed[point][0] == payload
        for name in (IMAGE_VECTOR, TEXT_VECTOR):
            a, b = np.asarray(resumed[point][1][name]), np.asarray(vectors[name])
            assert float(np.sum(a * b)) / len(a.reshape(-1, a.shape[-1])) > 0.9999
