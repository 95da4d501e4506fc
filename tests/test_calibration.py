"""Match decisions: fitted on labelled pairs of real products, stored with the catalogue, used by /matches."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from ingest.__main__ import main as ingest_main
from retrieval.calibration import decide, features, fit, labelled_candidates, lowest_threshold, probabilities
from retrieval.query import SearchEngine
from retrieval.settings import Settings
from schemas.search import LabelledPair, ModalityScores, ProductRef
from service.app import create_app
from service.state import AppState
from tests.conftest import sample_rows, write_catalogue


def pairs(n: int) -> list[LabelledPair]:
    return [
        LabelledPair(product=ProductRef(retailer="hemkop", id=r["id"]), expect=[f"o-{r['id']}"]) for r in sample_rows(n)
    ]


def test_threshold_is_the_lowest_probability_reaching_the_precision() -> None:
    p = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    y = np.array([1, 1, 0, 1, 0], dtype=float)
    assert lowest_threshold(p, y, 0.95) == (0.8, 1.0, 2 / 3)
    assert lowest_threshold(p, y, 0.7)[0] == 0.6  # 3 of 4 above 0.6 are right
    assert lowest_threshold(p, np.zeros(5), 0.5) == (1.0, 0.0, 0.0)


def test_fit_on_real_candidates_and_decide(engine: SearchEngine, two_shops: str) -> None:
    rows, labels = labelled_candidates(engine, two_shops, pairs(30), depth=5)
    assert len(rows) == 150 and sum(labels) == 30  # every product's twin is among its 5 candidates
    calibration = fit(rows, labels, target_precision=0.95)
    assert calibration.precision >= 0.95 and calibration.recall > 0.5
    p = probabilities(calibration, rows)
    assert p[np.asarray(labels)].mean() > p[~np.asarray(labels)].mean()
    twin = ModalityScores(image=1.0, text=1.0, lexical=1.0)
    stranger = ModalityScores(image=0.2, text=0.1, lexical=0.0)
    (_, first), (_, second) = decide(calibration, [twin, stranger])
    assert (first, second) == ("match", "no_match")
    assert len(features([twin, stranger])[0]) == len(calibration.weights) == 10


def test_too_few_labels_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 10 candidates"):
        fit([[0.5] * 10] * 4, [True, False, True, False])


@pytest.fixture
def client(engine: SearchEngine, sample_settings: Settings) -> Iterator[TestClient]:
    state = AppState(sample_settings, engine.store, engine)
    with TestClient(create_app(sample_settings, state=state)) as test_client:
        yield test_client


def test_matches_endpoint_uses_the_stored_calibration(
    client: TestClient,
    engine: SearchEngine,
    two_shops: str,
) -> None:
    rows, labels = labelled_candidates(engine, two_shops, pairs(30), depth=5)
    engine.store.save_calibration(two_shops, fit(rows, labels, source="test"))
    try:
        body = client.get(f"/catalogues/{two_shops}/products/hemkop/5/matches", params={"limit": 5}).json()
        assert body["calibrated"] is True
        first, *rest = body["matches"]
        assert (first["id"], first["decision"]) == ("o-5", "match") and first["confidence"] > 0.9
        assert all(m["decision"] != "match" for m in rest)
        assert all(0 <= m["confidence"] <= 1 for m in body["matches"])
    finally:
        engine.store.save_calibration(two_shops, None)
    assert engine.store.calibration(two_shops) is None
    assert engine.store.fingerprint(two_shops).image_dim == 1280  # the rest of the metadata is intact


def test_calibrate_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("QDRANT_PATH", str(tmp_path / "store"))
    for key in ("QDRANT_URL", "IMAGE_MODEL", "TEXT_MODEL"):
        monkeypatch.delenv(key, raising=False)
    rows = sample_rows(12)
    twins = [{**r, "retailer": "other-shop", "id": f"o-{r['id']}"} for r in rows]
    assert ingest_main([str(write_catalogue(tmp_path / "feed", rows + twins)), "--catalogue", "shops"]) == 0
    labelled = tmp_path / "pairs.jsonl"
    labelled.write_text("\n".join(p.model_dump_json() for p in pairs(12)) + "\n")
    capsys.readouterr()
    assert ingest_main(["calibrate", str(labelled), "--catalogue", "shops"]) == 0
    assert "catalogue shops: calibrated on 12 products, 60 candidates; match at p >=" in capsys.readouterr().out

    labelled.write_text(json.dumps({"product": {"retailer": "hemkop"}}) + "\n")
    assert ingest_main(["calibrate", str(labelled), "--catalogue", "shops"]) == 2
    assert "line 1" in capsys.readouterr().err
