"""The review loop over HTTP (issue 29): the queue, labels given, listed, exported in the pairs format, deleted
and kept across a restart, the write routes behind the API key and refused from other sites, and a training
job on the answers that changes the catalogue's decisions."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from cli.calibrate import read_pairs
from retrieval.search import SearchEngine
from retrieval.settings import Settings
from service.app import create_app
from service.state import AppState
from tests.conftest import wait_for_job

LABELS = Path(tempfile.mkdtemp(prefix="review-labels-")) / "labels.sqlite"
KEY = "review-key-0123456789"


@pytest.fixture(scope="module")
def reviewing(engine: SearchEngine, sample_settings: Settings, two_shops: str) -> Iterator[TestClient]:
    settings = sample_settings.model_copy(update={"labels_path": LABELS})
    state = AppState(settings, engine.store, engine)
    with TestClient(create_app(settings, state=state), base_url="http://localhost") as client:
        yield client
    if "two-currencies" in engine.store.catalogues():  # trained by a test of this module: back to no model
        engine.store.save_calibration("two-currencies", None)


def label(left: str, right: str | None, same: bool) -> dict[str, Any]:
    return {
        "left": {"retailer": "hemkop", "id": left},
        "right": {"retailer": "other-shop", "id": right} if right else None,
        "same": same,
        "who": "tester",
    }


def test_labels_are_given_listed_exported_and_deleted(reviewing: TestClient, two_shops: str, tmp_path: Path) -> None:
    base = f"/catalogues/{two_shops}/labels"
    given = reviewing.post(base, json=label("1", "o-1", True))
    assert given.status_code == 201, given.text
    first = given.json()
    assert first["left"] == {"retailer": "hemkop", "id": "1"} and first["who"] == "tester" and first["at"]
    again = reviewing.post(base, json=label("1", "o-1", True))
    assert again.status_code == 200 and again.json()["id"] == first["id"]  # the same answer: one label
    assert reviewing.post(base, json=label("1", "o-2", False)).status_code == 201
    assert reviewing.post(base, json=label("2", None, False)).status_code == 201  # no counterpart
    unknown = reviewing.post(base, json=label("1", "o-999", False))
    assert unknown.status_code == 404 and "o-999" in unknown.text
    same_shop = {"left": {"retailer": "hemkop", "id": "1"}, "right": {"retailer": "hemkop", "id": "2"}, "same": False}
    assert reviewing.post(base, json=same_shop).status_code == 422
    assert reviewing.post(base, json={**label("1", "o-1", True), "extra": 1}).status_code == 422
    assert reviewing.post(base, json=label("3", None, True)).status_code == 422  # "no counterpart" is not same
    contra = reviewing.post(base, json=label("1", "o-1", False)).json()
    listed = reviewing.get(base).json()
    assert listed["total"] == 4 and listed["contradictions"] == [[first["id"], contra["id"]]]
    exported = reviewing.get(f"{base}.jsonl")
    assert exported.status_code == 200 and exported.headers["content-type"].startswith("application/x-ndjson")
    (tmp_path / "pairs.jsonl").write_text(exported.text)
    pairs = {p.product.id: p for p in read_pairs(tmp_path / "pairs.jsonl")}  # the format calibrate / train read
    assert pairs["1"].expect is None and pairs["1"].rejected_ids() == ["o-2"]  # the contradicted answers left out
    assert pairs["2"].expect == []
    assert reviewing.delete(f"{base}/{contra['id']}").status_code == 204
    assert reviewing.delete(f"{base}/{contra['id']}").status_code == 404
    lines = [json.loads(line) for line in reviewing.get(f"{base}.jsonl").text.splitlines()]
    one = next(line for line in lines if line["product"]["id"] == "1")
    assert one["expect"] == [{"retailer": "other-shop", "id": "o-1"}] and one["partial"] is True
    for number in [item["id"] for item in reviewing.get(base).json()["labels"]]:
        assert reviewing.delete(f"{base}/{number}").status_code == 204


def test_labels_survive_a_restart_and_are_capped(
    engine: SearchEngine, sample_settings: Settings, two_shops: str
) -> None:
    settings = sample_settings.model_copy(update={"labels_path": LABELS.parent / "restart.sqlite", "max_labels": 2})
    with TestClient(
        create_app(settings, state=AppState(settings, engine.store, engine)), base_url="http://localhost"
    ) as client:
        assert client.post(f"/catalogues/{two_shops}/labels", json=label("4", "o-4", True)).status_code == 201
    with TestClient(
        create_app(settings, state=AppState(settings, engine.store, engine)), base_url="http://localhost"
    ) as client:
        assert client.get(f"/catalogues/{two_shops}/labels").json()["total"] == 1
        assert client.post(f"/catalogues/{two_shops}/labels", json=label("5", "o-5", True)).status_code == 201
        again = client.post(f"/catalogues/{two_shops}/labels", json=label("6", "o-6", True))
        assert again.status_code == 429 and "MAX_LABELS" in again.json()["detail"]


def test_writes_need_the_key_and_come_from_the_page_itself(
    engine: SearchEngine, sample_settings: Settings, two_shops: str
) -> None:
    settings = sample_settings.model_copy(
        update={"labels_path": LABELS.parent / "keyed.sqlite", "api_key": SecretStr(KEY)}
    )
    with TestClient(
        create_app(settings, state=AppState(settings, engine.store, engine)), base_url="http://localhost"
    ) as client:
        base = f"/catalogues/{two_shops}"
        assert client.post(f"{base}/labels", json=label("5", "o-5", True)).status_code == 401
        assert client.post(f"{base}/train", json={}).status_code == 401
        assert client.delete(f"{base}/labels/1").status_code == 401
        evil = {"X-API-Key": KEY, "Origin": "https://evil.example"}
        assert client.post(f"{base}/labels", json=label("5", "o-5", True), headers=evil).status_code == 403
        keyed = client.post(f"{base}/labels", json=label("5", "o-5", True), headers={"X-API-Key": KEY})
        assert keyed.status_code == 201
        assert client.get(f"{base}/labels").status_code == 200  # reading needs no key
        assert client.get(f"{base}/review", params={"retailer": "hemkop", "limit": 2}).status_code == 200


def test_the_queue_then_training_on_its_answers_changes_the_decisions(
    reviewing: TestClient, two_currencies: str
) -> None:
    """Two shops in two currencies (the default model decides no true pair 'match'): a reviewer who knows the
    truth (product n is o-n) answers the queue round after round; training on the answers stores the
    catalogue's own model, and `/matches` of a product nobody reviewed then decides 'match' and names it."""
    base = f"/catalogues/{two_currencies}"
    assert reviewing.get(f"{base}/review", params={"retailer": "nobody"}).status_code == 404
    assert reviewing.get("/catalogues/no-such/review", params={"retailer": "hemkop"}).status_code == 404
    asked, reviewed = 0, set()
    for _ in range(4):
        queue = reviewing.get(f"{base}/review", params={"retailer": "hemkop", "against": "other-shop", "limit": 6})
        assert queue.status_code == 200, queue.text
        body = queue.json()
        assert body["model"] == "default" and body["labels"] == asked
        for pair in body["pairs"]:
            right = pair["right"]
            assert right is not None and pair["why"]
            answer = label(pair["left"]["id"], right["id"], right["id"] == f"o-{pair['left']['id']}")
            assert reviewing.post(f"{base}/labels", json=answer).status_code == 201
            asked += 1
            reviewed.add(pair["left"]["id"])
    assert asked == 24
    unseen = next(str(i) for i in range(30) if str(i) not in reviewed)
    before = reviewing.get(f"{base}/products/hemkop/{unseen}/matches", params={"limit": 3}).json()
    assert before["model"] == "default" and before["matches"][0]["decision"] != "match"
    assert reviewing.post(f"{base}/train", json={"nonsense": 1}).status_code == 422
    submitted = reviewing.post(f"{base}/train", json={"rerank": False})
    assert submitted.status_code == 202, submitted.text
    job = wait_for_job(reviewing, submitted.json()["id"], seconds=120)
    assert job["status"] == "done", job
    training = job["training"]
    assert training["labels"] >= 18 and training["before"]["label"] == "default model"
    assert [t["label"] for t in training["tried"]] == ["match model"] and training["chosen"] == "match model"
    after = reviewing.get(f"{base}/products/hemkop/{unseen}/matches", params={"limit": 3}).json()
    assert after["model"] == "catalogue" and after["calibrated"]
    assert after["matches"][0]["id"] == f"o-{unseen}" and after["matches"][0]["decision"] == "match"
    engine_labels = reviewing.get(f"{base}/labels").json()
    assert engine_labels["total"] == 24 and engine_labels["contradictions"] == []


def test_hostile_review_inputs_cost_a_4xx(reviewing: TestClient, two_shops: str) -> None:
    """Oversized ids, skip lists and limits are refused before any work; a `who` with control characters (a
    log line of its own) is refused; nothing is stored."""
    base = f"/catalogues/{two_shops}"
    huge = "x" * 20_000
    before = reviewing.get(f"{base}/labels").json()["total"]
    assert reviewing.post(f"{base}/labels", json=label(huge, "o-1", True)).status_code == 422
    assert (
        reviewing.post(f"{base}/labels", json={**label("1", "o-1", True), "who": "ann\nINFO forged"}).status_code == 422
    )
    assert reviewing.get(f"{base}/review", params={"retailer": "hemkop", "limit": 10**9}).status_code == 422
    assert reviewing.get(f"{base}/review", params={"retailer": huge}).status_code == 422
    skips: dict[str, str | list[str]] = {"retailer": "hemkop", "skip": [f"id-{i}" for i in range(1_001)]}
    assert reviewing.get(f"{base}/review", params=skips).status_code == 422
    assert reviewing.delete(f"{base}/labels/{2**70}").status_code == 422
    assert reviewing.get(f"{base}/labels").json()["total"] == before
