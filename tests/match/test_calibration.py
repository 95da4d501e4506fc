"""Match decisions: fitted on labelled pairs of real products, stored with the catalogue, used by /matches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ingest.__main__ import main as ingest_main
from retrieval.match.model import (
    FEATURES,
    MODEL_VERSION,
    C,
    Candidate,
    Labelled,
    decide,
    decide_all,
    features,
    find_matches,
    fit,
    labelled_candidates,
    lowest_threshold,
    probabilities,
)
from retrieval.search import SearchEngine
from schemas.payload import Product
from schemas.search import Calibration, CurvePoint, LabelledPair, ProductRef
from tests.conftest import sample_rows


def pairs(n: int) -> list[LabelledPair]:
    return [
        LabelledPair(product=ProductRef(retailer="hemkop", id=r["id"]), expect=[f"o-{r['id']}"]) for r in sample_rows(n)
    ]


def point(threshold: float, precision: float, recall: float) -> CurvePoint:
    return CurvePoint(threshold=threshold, precision=precision, recall=recall)


def test_threshold_is_the_lowest_probability_reaching_the_precision() -> None:
    p = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    y = np.array([1, 1, 0, 1, 0])
    assert lowest_threshold(p, y, 0.95) == point(0.8, 1.0, 2 / 3)
    assert lowest_threshold(p, y, 0.95, positives=4) == point(0.8, 1.0, 0.5)  # a true pair the search missed
    assert lowest_threshold(p, y, 0.7) == point(0.6, 0.75, 1.0)  # 3 of 4 above 0.6 are right
    assert lowest_threshold(p, y, 0.95, min_hits=3) is None  # 1.0 on two matches is not enough evidence
    assert lowest_threshold(p, np.zeros(5, dtype=int), 0.5) is None  # nothing reaches it: no threshold
    tied = np.array([0.9, 0.9, 0.9, 0.4])  # equal probabilities are decided together
    assert lowest_threshold(tied, np.array([1, 0, 1, 1]), 0.9) is None


def product(title: str, **fields: object) -> Product:
    return Product.model_validate({"id": title, "retailer": "r", "title": title, **fields})


def test_identifiers_titles_and_prices_become_features() -> None:
    query = product("Panasonic KX-TG6313S DECT 6.0 cordless phone", price=60.0, gtin="00012345678905")
    candidates = [
        Candidate(product("panasonic kxtg6313s cordless phone", price=59.0), {"text": 0.7, "lexical": 0.2}),
        Candidate(product("Panasonic KX-TG9332S DECT 6.0 phone", price=120.0), {"text": 0.8, "lexical": 0.4}),
        Candidate(product("Panasonic KX-TG6313B", gtin="00012345678905"), {"text": 0.6, "lexical": 0.1}),
    ]
    rows = [dict(zip(FEATURES, row, strict=True)) for row in features(query, candidates)]
    same, sibling, black = rows
    assert (same["code_same"], sibling["code_same"], black["code_stem_same"]) == (1.0, 0.0, 1.0)
    assert sibling["code_conflict"] == 1.0 and same["code_conflict"] == 0.0
    assert black["gtin_same"] == 1.0 and same["gtin_same"] == same["gtin_conflict"] == 0.0
    assert same["price_gap"] < 0.05 < sibling["price_gap"] and black["price_known"] == 0.0
    assert same["text_margin"] == pytest.approx(-0.1) and sibling["text_margin"] == pytest.approx(0.1)
    assert (same["has_image"], same["has_text"], same["image"]) == (0.0, 1.0, 0.0)
    assert same["reciprocal_rank"] == 1.0 and black["reciprocal_rank"] == pytest.approx(1 / 3)
    assert (sibling["numbers_kept"], same["numbers_kept"], same["numbers_added"]) == (1.0, 0.0, 0.0)


def test_fit_on_real_candidates_and_rerank(engine: SearchEngine, two_shops: str) -> None:
    data = labelled_candidates(engine, two_shops, pairs(30), depth=5)
    assert len(data.rows) == 150 and sum(data.labels) == 30 == data.positives  # each twin is among its 5
    calibration = fit(data, target_precision=0.95)
    assert calibration.precision >= 0.95 and calibration.recall > 0.5  # out-of-fold, on held-out products
    assert calibration.reliable and calibration.accepted_precision is None and calibration.version == MODEL_VERSION
    assert calibration.curve and all(pt.precision >= 0.5 for pt in calibration.curve)
    p = probabilities(calibration, data.rows)
    labels = np.asarray(data.labels)
    assert p[labels].mean() > p[~labels].mean() + 0.5
    # the stored numbers are the scikit-learn pipeline itself: rebuilt, it predicts what the fitted one does
    x, y = np.asarray(data.rows), np.asarray(data.labels, dtype=int)
    fitted = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1_000)).fit(x, y)
    assert np.abs(fitted.predict_proba(x)[:, 1] - p).max() < 1e-9
    stored = Calibration.model_validate_json(calibration.model_dump_json())  # JSON, as a server keeps it
    assert np.array_equal(probabilities(stored, data.rows), p)
    assert decide(calibration, 0.999) == "match" and decide(calibration, 0.0) == "no_match"
    # one match per shop: of two listings of one shop above the threshold, the less probable is 'uncertain'
    sure = [0.999, 0.998, 0.997, 0.0]
    assert decide_all(calibration, np.array(sure), ["ica", "ica", "coop", "coop"]) == [
        "match",
        "uncertain",
        "match",
        "no_match",
    ]
    assert decide(calibration, 0.999, first=False) == "uncertain"
    _, matches = find_matches(engine, two_shops, "hemkop", "7", calibration=calibration, limit=3)
    assert matches[0].id == "o-7" and matches[0].decision == "match"
    confidences = [m.confidence or 0.0 for m in matches]
    assert confidences == sorted(confidences, reverse=True) and confidences[0] > 0.9
    assert all(m.retailer != "hemkop" for m in matches)


def test_too_few_labels_is_refused() -> None:
    with pytest.raises(ValueError, match="too few labelled candidates: .* at least 5 labelled products"):
        fit(Labelled([[0.5] * len(FEATURES)] * 4, [True, False, True, False], [0, 1, 2, 3], 2))
    rows = [[float(i)] * len(FEATURES) for i in range(40)]  # 10 products, but only 4 true pairs
    with pytest.raises(ValueError, match=r"got 40 candidates of 10 products \(4 true\)"):
        fit(Labelled(rows, [i % 10 == 0 for i in range(40)], [i // 4 for i in range(40)], 4))


def test_matches_endpoint_uses_the_stored_calibration(
    client: TestClient,
    engine: SearchEngine,
    two_shops: str,
) -> None:
    engine.store.save_calibration(two_shops, fit(labelled_candidates(engine, two_shops, pairs(30)), source="test"))
    try:
        body = client.get(f"/catalogues/{two_shops}/products/hemkop/5/matches", params={"limit": 5}).json()
        assert (body["calibrated"], body["reliable"], body["warning"]) == (True, True, None)
        first, *rest = body["matches"]
        assert (first["id"], first["decision"]) == ("o-5", "match") and first["confidence"] > 0.9
        assert all(m["decision"] != "match" for m in rest)
        assert all(0 <= m["confidence"] <= 1 for m in body["matches"])
    finally:
        engine.store.save_calibration(two_shops, None)
    assert engine.store.calibration(two_shops) is None
    assert engine.store.fingerprint(two_shops).image_dim == 1280  # the rest of the metadata is intact


def test_calibrate_cli(cli_shops: Path, capsys: pytest.CaptureFixture[str]) -> None:
    labelled = cli_shops / "pairs.jsonl"
    labelled.write_text("\n".join(p.model_dump_json() for p in pairs(12)) + "\n")
    capsys.readouterr()
    assert ingest_main(["calibrate", str(labelled), "--catalogue", "shops"]) == 0
    out, err = capsys.readouterr()
    assert "catalogue shops: calibrated on 12 products, 144 candidates; match at p >=" in out
    assert "WARNING: only 12 labelled true pairs" in err and "no candidate is decided" not in err

    labelled.write_text(json.dumps({"product": {"retailer": "hemkop"}}) + "\n")
    assert ingest_main(["calibrate", str(labelled), "--catalogue", "shops"]) == 2
    assert "line 1" in capsys.readouterr().err
