"""Ingest end to end into an embedded store: counts, idempotence, updates, bad rows and bad images."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.__main__ import main as ingest_main
from ingest.pipeline import Ingestor
from retrieval.records import point_id
from retrieval.store import EncoderMismatch, ProductStore
from schemas.report import IngestReport
from tests.conftest import SAMPLE, sample_rows, write_catalogue


def test_sample_catalogue_lands_whole(sample_report: IngestReport, sample_store: ProductStore) -> None:
    assert (sample_report.read, sample_report.new, sample_report.updated) == (81, 81, 0)
    assert sample_report.rejected_rows == [] and sample_report.skipped_images == []
    assert sample_report.images_embedded == 81
    assert sample_store.count("grocery") == 81
    record = sample_store.get("grocery", point_id("hemkop", "44"))
    assert record is not None and record.payload is not None
    payload = record.payload
    assert payload["title"] == "Oatly Natural Oatghurt"
    assert payload["category"] == ["Packages", "Oatghurt"]
    assert payload["category_prefixes"] == ["Packages", "Packages > Oatghurt"]
    assert payload["brand"] == "Oatly" and payload["attributes"] == {"volume": "1kg"}
    assert Path(payload["images"][0]).is_file()


def test_reingest_updates_in_place_and_reembeds_only_changes(
    tmp_path: Path, ingestor: Ingestor, store: ProductStore, catalogue_name: str
) -> None:
    rows = sample_rows(6)
    path = write_catalogue(tmp_path / "feed", rows)
    first = ingestor.run(path, catalogue_name, progress=False)
    assert (first.new, first.updated, first.unchanged) == (6, 0, 0)

    again = ingestor.run(path, catalogue_name, progress=False)
    assert (again.new, again.updated, again.unchanged, again.images_embedded) == (0, 0, 6, 0)

    rows[2]["title"] = "Renamed apple"
    rows.append({**rows[0], "id": "new-1"})
    write_catalogue(tmp_path / "feed", rows)
    changed = ingestor.run(path, catalogue_name, progress=False)
    assert (changed.new, changed.updated, changed.unchanged) == (1, 1, 5)
    assert store.count(catalogue_name) == 7
    renamed = store.get(catalogue_name, point_id(rows[2]["retailer"], rows[2]["id"]))
    assert renamed is not None and renamed.payload is not None and renamed.payload["title"] == "Renamed apple"


def test_bad_rows_and_images_are_reported_and_the_rest_lands(
    tmp_path: Path, ingestor: Ingestor, store: ProductStore, catalogue_name: str
) -> None:
    folder = tmp_path / "feed"
    good = sample_rows(3)
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (folder / "images" / "empty.png").write_bytes(b"")
    (folder / "images" / "notes.jpg").write_text("plain text with an image name")
    rows = good + [
        {"id": "p1", "retailer": "hemkop", "title": "Only a broken photo", "image": "images/broken.jpg"},  # line 5
        {"id": "p2", "retailer": "hemkop", "title": "", "image": "images/empty.png"},  # line 6: no title, bad image
        {"id": "p3", "retailer": "hemkop", "title": "Bad price", "price": "ten"},  # line 7
        {"id": "", "retailer": "hemkop", "title": "No id"},  # line 8
        {"id": "p4", "retailer": "hemkop", "title": "Two photos", "image": "images/notes.jpg|" + good[0]["image"]},
        {"id": "p5", "retailer": "hemkop", "title": "Missing file", "image": "images/nowhere.jpg"},  # line 10
    ]
    path = write_catalogue(folder, rows)
    report = ingestor.run(path, catalogue_name, progress=False)

    assert report.read == 9
    rejected = {r.line: r for r in report.rejected_rows}
    assert set(rejected) == {6, 7, 8}
    assert "no usable image and no title" in rejected[6].reason and "empty file" in rejected[6].reason
    assert rejected[7].field == "price" and rejected[8].field == "id"
    skipped = {(s.line, s.id): s.reason for s in report.skipped_images}
    assert "cannot decode image" in skipped[(5, "p1")] or "not a recognised" in skipped[(5, "p1")]
    assert "not a recognised image format" in skipped[(9, "p4")]
    assert "file not found" in skipped[(10, "p5")]

    assert report.new == 6 and store.count(catalogue_name) == 6
    two = store.retrieve(catalogue_name, [point_id("hemkop", "p4")], with_vectors=True)[0]
    assert isinstance(two.vector, dict) and isinstance(two.vector["image"], list)
    assert len(two.vector["image"]) == 1  # the readable photo only
    broken = store.retrieve(catalogue_name, [point_id("hemkop", "p1")], with_vectors=True)[0]
    assert isinstance(broken.vector, dict) and "image" not in broken.vector and "text" in broken.vector


def test_other_encoders_are_refused_naming_both(
    sample_settings, sample_store: ProductStore, image_encoder, sample_report
) -> None:
    class OtherText:
        name, dim = "sentence-transformers:other-model", 384

        def embed_texts(self, texts):  # never reached: the check comes first
            raise AssertionError

    other = Ingestor(sample_settings, sample_store, image_encoder, OtherText())
    with pytest.raises(EncoderMismatch) as caught:
        other.run(SAMPLE, "grocery", progress=False)
    message = str(caught.value)
    assert "sentence-transformers:all-MiniLM-L6-v2" in message and "sentence-transformers:other-model" in message


def run_cli(
    args: list[str], monkeypatch: pytest.MonkeyPatch, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    for key in ("QDRANT_URL", "QDRANT_PATH", "QDRANT_API_KEY", "IMAGE_MODEL", "TEXT_MODEL"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code = ingest_main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_summary_rejects_file_and_exit_codes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {"QDRANT_PATH": str(tmp_path / "store")}
    rows = sample_rows(2) + [{"id": "x", "retailer": "hemkop", "title": "", "image": ""}]
    path = write_catalogue(tmp_path / "feed", rows)
    rejects = tmp_path / "rejects.jsonl"

    code, out, err = run_cli([str(path), "--catalogue", "cli", "--rejects", str(rejects)], monkeypatch, env, capsys)
    assert code == 0
    assert "read 3 rows" in out and "new 2, updated 0, unchanged 0, rejected rows 1" in out and "products/s" in out
    assert "line 4 id x" in err
    assert '"line": 4' in rejects.read_text() and '"kind": "row"' in rejects.read_text()

    code, out, _ = run_cli([str(path), "--catalogue", "cli"], monkeypatch, env, capsys)
    assert code == 0 and "new 0, updated 0, unchanged 2" in out

    nothing = write_catalogue(tmp_path / "bad", [{"id": "", "retailer": "r", "title": "t"}])
    code, _, err = run_cli([str(nothing), "--catalogue", "cli"], monkeypatch, env, capsys)
    assert code == 1 and "nothing could be ingested" in err

    code, _, err = run_cli([str(path)], monkeypatch, {**env, "QDRANT_URL": "http://localhost:6333"}, capsys)
    assert code == 2 and "both QDRANT_URL and QDRANT_PATH" in err

    code, _, err = run_cli([str(tmp_path / "none.csv")], monkeypatch, env, capsys)
    assert code == 2 and "does not exist" in err

    code, _, err = run_cli([str(path), "--catalogue", "bad/name"], monkeypatch, env, capsys)
    assert code == 2 and "catalogue name" in err

    code, _, err = run_cli(
        [str(path), "--catalogue", "cli"],
        monkeypatch,
        {**env, "IMAGE_MODEL": "timm:tf_efficientnet_lite0/random"},
        capsys,
    )
    assert code == 2 and "was built with image encoder timm:tf_efficientnet_lite0/efficientnet-lite0" in err
    assert "timm:tf_efficientnet_lite0/random" in err


def test_store_held_by_another_process_is_a_clear_error(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    store: ProductStore,
    backend: str,
) -> None:
    # `store` holds tmp_path/qdrant open in this process, as a running service would.
    path = write_catalogue(tmp_path / "feed", sample_rows(1))
    env = {"QDRANT_PATH": str(tmp_path / "qdrant"), "STORE_BACKEND": backend}
    code, _, err = run_cli([str(path)], monkeypatch, env, capsys)
    assert code == 2 and "in use by another process" in err and "QDRANT_URL" in err
