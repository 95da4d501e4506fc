"""The answers the README promises and nothing else reached: 409 for a catalogue built with other encoders,
503 with Retry-After when the encoders cannot answer in time, and `--prune` through the CLI and the
ingest endpoint."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ingest.__main__ import main as ingest_main
from retrieval.encoders import ImageEncoder, TextEncoder
from retrieval.search import SearchEngine
from retrieval.settings import Settings
from retrieval.store import EncoderFingerprint, ProductStore
from service.app import create_app
from service.state import AppState
from tests.conftest import SAMPLE, sample_rows, wait_for_job, write_catalogue

PHOTO = (SAMPLE.parent / "images" / "Arla-Standard-Milk_Iconic.jpg").read_bytes()


@pytest.fixture
def service(tmp_path: Path, image_encoder: ImageEncoder, text_encoder: TextEncoder) -> Iterator[TestClient]:
    """The service over a store of its own holding `shop`: 8 sample products."""
    settings = Settings(qdrant_path=tmp_path / "qdrant", sources_path=tmp_path / "sources", default_catalogue="shop")
    store = ProductStore.open(settings)
    state = AppState(settings, store, SearchEngine(store, image_encoder, text_encoder))
    with TestClient(create_app(state=state), raise_server_exceptions=False, base_url="http://localhost") as client:
        write_catalogue(tmp_path / "feed", sample_rows(8))
        zipped = io.BytesIO()
        with zipfile.ZipFile(zipped, "w") as archive:
            archive.write(tmp_path / "feed" / "catalogue.csv", "catalogue.csv")
            for image in (tmp_path / "feed" / "images").iterdir():
                archive.write(image, f"images/{image.name}")
        job = client.post("/catalogues/shop/ingest", files={"file": ("shop.zip", zipped.getvalue())})
        assert wait_for_job(client, job.json()["id"])["status"] == "done"
        yield client
    state.close()


def test_a_catalogue_built_with_other_encoders_is_a_409(service: TestClient) -> None:
    state: AppState = service.app.state.app_state  # type: ignore[attr-defined]
    state.store.ensure_catalogue("other", EncoderFingerprint("timm:other", 8, "st:other", 8))
    for response in (
        service.post("/search", data={"text": "milk", "catalogue": "other"}),
        service.post("/search/json", json={"text": "milk", "catalogue": "other"}),
        service.post("/catalogues/other/ingest", files={"file": ("a.csv", b"id,retailer,title\n1,s,t\n")}),
    ):
        assert response.status_code == 409, response.text
        assert "was built with image encoder timm:other" in response.json()["detail"]


def test_encoders_that_cannot_answer_in_time_are_a_503_with_retry_after(
    tmp_path: Path, engine: SearchEngine, sample_settings: Settings
) -> None:
    # No forward of a real model ends within 0.1 ms: every search times out waiting for its encoder.
    settings = sample_settings.model_copy(update={"request_timeout_s": 0.0001})
    with TestClient(create_app(state=AppState(settings, engine.store, engine)), base_url="http://localhost") as client:
        by_text = client.post("/search", data={"text": "milk", "catalogue": "grocery"})
        by_photo = client.post(
            "/search", files={"image": ("m.jpg", PHOTO, "image/jpeg")}, data={"catalogue": "grocery"}
        )
    for response in (by_text, by_photo):
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "1" and "did not answer within" in response.json()["detail"]


def test_prune_through_the_cli_and_the_endpoint(
    tmp_path: Path, service: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Through the endpoint: a feed that lists 5 of the shop's 8 products prunes the other 3.
    rows = sample_rows(8)
    kept = "id,retailer,title\n" + "".join(f"{r['id']},{r['retailer']},{r['title']}\n" for r in rows[:5])
    job = service.post("/catalogues/shop/ingest", files={"file": ("kept.csv", kept.encode())}, data={"prune": "true"})
    report = wait_for_job(service, job.json()["id"])["ingest"]
    assert (report["updated"], report["pruned"]) == (5, 3), report  # the photos are gone from these rows
    ids = {r["id"] for r in service.post("/search", data={"text": "food", "limit": "20"}).json()["results"]}
    assert ids == {r["id"] for r in rows[:5]}

    # Through the CLI, on a store of its own.
    monkeypatch.setenv("QDRANT_PATH", str(tmp_path / "cli-store"))
    for key in ("QDRANT_URL", "STORE_BACKEND"):
        monkeypatch.delenv(key, raising=False)
    whole = write_catalogue(tmp_path / "whole", rows)
    assert ingest_main([str(whole), "--catalogue", "shop", "--no-progress"]) == 0
    part = write_catalogue(tmp_path / "part", rows[2:])
    assert ingest_main([str(part), "--catalogue", "shop", "--no-progress", "--prune"]) == 0
    store = ProductStore.open(Settings(qdrant_path=tmp_path / "cli-store"))
    try:
        assert sorted(store.product_ids("shop", "hemkop")) == sorted(r["id"] for r in rows[2:])
    finally:
        store.close()
