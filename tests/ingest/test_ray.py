"""`python -m ingest --workers 2`: both encoders on 2 Ray workers of a local cluster give the same catalogue
as a single-process ingest of the same file (the bundled sample: 81 real products and photos), and a second
run embeds nothing again. The workers decode the photos and read their text: a broken photo, one shared by
two listings and the text read off real packages come out as in one process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ingest.__main__ import main as ingest_main
from retrieval.settings import Settings
from retrieval.store import ProductStore
from tests.conftest import SAMPLE, sample_rows, write_catalogue

pytest.importorskip("ray", reason="Ray is the optional extra .[ray]; `make test` installs it")


def _ingest(
    path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    *extra: str,
    catalogue: Path = SAMPLE,
) -> str:
    for key in ("QDRANT_URL", "STORE_BACKEND", "IMAGE_MODEL", "TEXT_MODEL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("QDRANT_PATH", str(path))
    capsys.readouterr()
    code = ingest_main([str(catalogue), "--catalogue", "sample", "--no-progress", *extra])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def _points(path: Path) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    store = ProductStore.open(Settings(qdrant_path=path))
    try:
        return {
            str(p.id): (p.payload or {}, p.vector if isinstance(p.vector, dict) else {})
            for p in store.points("sample", with_vectors=True)
        }
    finally:
        store.close()


def _same_points(single: Path, pooled: Path, count: int) -> None:
    alone, spread = _points(single), _points(pooled)
    assert set(alone) == set(spread) and len(alone) == count
    for point_id, (payload, vectors) in alone.items():
        other_payload, other_vectors = spread[point_id]
        assert other_payload.pop("ingested_at") >= payload.pop("ingested_at")  # the only field that differs
        assert other_payload == payload
        assert set(other_vectors) == set(vectors)
        for name, value in vectors.items():
            if isinstance(value, list):  # dense rows: the same model on the same tensors, batch split or not
                np.testing.assert_allclose(np.asarray(other_vectors[name]), np.asarray(value), atol=2e-3)
            else:
                assert other_vectors[name] == value


def test_ray_workers_ingest_the_same_catalogue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OCR", "off")
    single = _ingest(tmp_path / "single", monkeypatch, capsys)
    pooled = _ingest(tmp_path / "ray", monkeypatch, capsys, "--workers", "2")
    assert "new 81," in single and "new 81," in pooled and "images embedded 81" in pooled
    _same_points(tmp_path / "single", tmp_path / "ray", 81)
    again = _ingest(tmp_path / "ray", monkeypatch, capsys, "--workers", "2")
    assert "unchanged 81" in again and "images embedded 0" in again


def test_ray_workers_decode_and_read_photos_as_one_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [r for r in sample_rows(81) if r["category"].startswith("Packages")][:10]  # printed packages
    rows[1]["image"] = rows[0]["image"]  # two listings, one photo: embedded and read once
    rows[2]["image"] = "images/broken.jpg"  # kept by its title, without a photo
    rows[3] |= {"image": "images/broken.jpg", "title": ""}  # nothing left: rejected
    rows[4]["image"] = f"images/broken.jpg|{rows[4]['image']}"  # keeps its good photo
    catalogue = write_catalogue(tmp_path / "feed", rows)
    (tmp_path / "feed" / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole JPEG")
    monkeypatch.setenv("OCR", "on")
    single = _ingest(tmp_path / "single", monkeypatch, capsys, catalogue=catalogue)
    pooled = _ingest(tmp_path / "ray", monkeypatch, capsys, "--workers", "2", catalogue=catalogue)
    # 10 rows, one without title or photo; broken.jpg skipped three times; 7 distinct good photos
    summary = "new 9, updated 0, unchanged 0, rejected rows 1, skipped images 3, images embedded 7"
    assert summary in single and summary in pooled, (single, pooled)
    _same_points(tmp_path / "single", tmp_path / "ray", 9)
    read = [payload.get("image_text") for payload, _ in _points(tmp_path / "ray").values()]
    assert sum(any(text for text in texts or []) for texts in read) >= 3  # real package text came back
