"""`python -m ingest --workers 2`: both encoders on 2 Ray workers of a local cluster give the same catalogue
as a single-process ingest of the same file (the bundled sample: 81 real products and photos), and a second
run embeds nothing again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ingest.__main__ import main as ingest_main
from retrieval.settings import Settings
from retrieval.store import ProductStore
from tests.conftest import SAMPLE

pytest.importorskip("ray", reason="Ray is the optional extra .[ray]; `make test` installs it")


def _ingest(path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    for key in ("QDRANT_URL", "STORE_BACKEND", "IMAGE_MODEL", "TEXT_MODEL", "OCR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("QDRANT_PATH", str(path))
    capsys.readouterr()
    code = ingest_main([str(SAMPLE), "--catalogue", "sample", "--no-progress", *extra])
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


def test_ray_workers_ingest_the_same_catalogue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    single = _ingest(tmp_path / "single", monkeypatch, capsys)
    pooled = _ingest(tmp_path / "ray", monkeypatch, capsys, "--workers", "2")
    assert "new 81," in single and "new 81," in pooled and "images embedded 81" in pooled
    alone, spread = _points(tmp_path / "single"), _points(tmp_path / "ray")
    assert set(alone) == set(spread) and len(alone) == 81
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
    again = _ingest(tmp_path / "ray", monkeypatch, capsys, "--workers", "2")
    assert "unchanged 81" in again and "images embedded 0" in again
