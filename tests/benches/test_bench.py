"""The quality and ingest-speed benches end to end on tiny real sets, so that they cannot rot; and the data
converters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.__main__ import main as bench_main
from bench.evalset import EvalQuery, load_set
from bench.prepare import parse_ditto_record, write_grocery_set, write_text_pairs_set
from bench.speed import run_ingest
from retrieval.encoders import TextEncoder
from retrieval.settings import Settings
from tests.conftest import GROCERY, SHARED_DATA


def test_ditto_records_parse_with_empty_values() -> None:
    record = parse_ditto_record("COL name VAL sony cam dsc-1 COL description VAL small , light COL price VAL  ")
    assert record == {"name": "sony cam dsc-1", "description": "small , light", "price": ""}


def test_text_pair_set_excludes_the_left_retailer_and_expects_matches(tmp_path: Path) -> None:
    count = write_text_pairs_set(SHARED_DATA / "text-pairs" / "abt-buy", tmp_path, left="abt", right="buy")
    evalset = load_set(tmp_path)
    assert count == len(evalset.queries) == 206  # left records with at least one labelled match in test.txt
    assert all(q.exclude_retailer == "abt" and q.text and q.image is None for q in evalset.queries)
    catalogue = evalset.catalogue.read_text()
    assert all(f"\n{expected}," in catalogue for q in evalset.queries for expected in q.expect)


def test_grocery_set_points_at_real_photos(tmp_path: Path) -> None:
    assert write_grocery_set(GROCERY, tmp_path, "val") == 296
    evalset = load_set(tmp_path)
    first = evalset.queries[0]
    assert first.category == "Fruit > Apple" and first.text == "apple" and first.group == "fruit+veg"
    path = evalset.image_path(first)
    assert path is not None and path.is_file()
    assert {q.group for q in evalset.queries} == {"fruit+veg", "packaged"}


def test_a_query_needs_an_input_and_an_expected_product() -> None:
    with pytest.raises(ValueError, match="needs an image or a text"):
        EvalQuery(expect=["1"])
    with pytest.raises(ValueError):
        EvalQuery(text="milk", expect=[])


def test_quality_bench_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = bench_main(
        ["--sets-dir", str(tmp_path / "sets"), "--shared", str(SHARED_DATA), "quality",
         "--sets", "alibaba", "grocery-val", "--max-queries", "12", "--fusion", "rrf", "weighted:1:0:0",
         "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "| alibaba | all | fused rrf | 10 |" in printed
    results = json.loads((out / "results.json").read_text())
    alibaba = {row["mode"]: row for row in results["alibaba"]["rows"]}
    # 20 products, the query's own seller excluded: 10 candidates, so the answer is always in the top 10
    assert alibaba["image"]["R@10"] == 1.0 and alibaba["text"]["R@10"] == 1.0
    grocery = {(row["group"], row["mode"]): row for row in results["grocery-val"]["rows"]}
    assert grocery[("all", "image")]["queries"] == 12
    # the category filter restricts candidates to the expected product's kind: recall cannot drop
    assert grocery[("all", "image +category")]["R@5"] >= grocery[("all", "image")]["R@5"]
    # weighted fusion with the text and lexical weights at 0 ranks exactly as the image alone
    for metric in ("R@1", "R@5", "MRR"):
        assert grocery[("all", "fused weighted 1:0:0")][metric] == grocery[("all", "image")][metric]
    for name in ("alibaba-recall.png", "grocery-val-recall.png", "grocery-val-scores.png", "grocery-val-map.png"):
        assert (out / name).stat().st_size > 5_000
    assert (out / "table.md").read_text().startswith("| set | group | mode |")


def test_ingest_speed_bench_runs_on_both_embedded_stores(text_encoder: TextEncoder) -> None:
    """`bench speed ingest` on a few photos: every row measured, both stores ingest every photo, and the
    re-ingest of the unchanged feed embeds nothing and finds every product unchanged."""
    table = run_ingest(SHARED_DATA, images=12, products=30, rounds=1, text_encoder=text_encoder, settings=Settings())
    for row in ("image model alone, fp32", "naive loop", "12 products, one photo each, local store", "edge store"):
        assert row in table
    assert "image model alone, ONNX Runtime fp32, batch 8 | 12 |" in table
    assert "edge store, ONNX Runtime | 12 |" in table
    assert "ONNX Runtime: model alone / torch" in table
    assert "edge store, encoders on 2 Ray workers | 12 |" in table and "Ray (2 workers) / one process" in table
    assert "only the forwards on the 2 workers) | 12 |" in table and "decoding on the workers / in the ingest" in table
    assert table.count("| again, unchanged | 30 | 0 / 0 / 30 | 0 |") == 2
    assert table.count("| first ingest | 30 | 30 / 0 / 0 |") == 2
