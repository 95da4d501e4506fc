"""`POST /catalogues/{c}/ingest`: uploads streamed to the sources folder, ingested as a background job while
the service keeps answering searches; the API key, the size cap and bad files."""

from __future__ import annotations

import io
import os
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from ingest.inputs import UPLOAD_LOCAL
from retrieval.encoders import ImageEncoder, TextEncoder
from retrieval.search import SearchEngine
from retrieval.settings import Settings
from retrieval.store import ProductStore
from schemas.jobs import Job
from service.app import create_app
from service.jobs import JobHandle, Jobs, JobsFull, sweep_extractions
from service.state import AppState
from tests.conftest import SAMPLE, catalogue_csv, sample_rows

KEY = {"X-API-Key": "ingest-key"}
PHOTO = SAMPLE.parent / "images" / "Arla-Standard-Milk_Iconic.jpg"


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    root = tmp_path_factory.mktemp("ingest-endpoint")
    return Settings(
        qdrant_path=root / "qdrant",
        sources_path=root / "sources",
        default_catalogue="shop",
        api_key=SecretStr("ingest-key"),
        max_ingest_upload_bytes=2 * 1024 * 1024,
    )


@pytest.fixture(scope="module")
def state(settings: Settings, image_encoder: ImageEncoder, text_encoder: TextEncoder) -> Iterator[AppState]:
    """A store of its own (these tests write), the session's encoders."""
    store = ProductStore.open(settings)
    app_state = AppState(settings, store, SearchEngine(store, image_encoder, text_encoder))
    yield app_state
    app_state.close()


@pytest.fixture(scope="module")
def client(state: AppState) -> Iterator[TestClient]:
    with TestClient(create_app(state=state), raise_server_exceptions=False, base_url="http://localhost") as test_client:
        yield test_client


def sample_zip(rows: list[dict[str, str]], top: str = "") -> bytes:
    """The rows as `catalogue.csv` with their photos under `images/`, as a client would zip them."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(f"{top}catalogue.csv", catalogue_csv(rows))
        for row in rows:
            archive.write(SAMPLE.parent / row["image"], f"{top}{row['image']}")
    return buffer.getvalue()


def wait_for(client: TestClient, job_id: str) -> dict[str, Any]:
    for _ in range(1_200):
        job: dict[str, Any] = client.get(f"/jobs/{job_id}").json()
        if job["status"] in ("done", "failed"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish in 60 s: {job}")


def uploads_left(settings: Settings) -> list[Path]:
    folder = settings.sources_root / ".uploads"
    return list(folder.iterdir()) if folder.is_dir() else []


def test_a_zip_with_photos_is_ingested_while_searches_go_on(client: TestClient, settings: Settings) -> None:
    first = sample_rows(12)
    text_only = [{k: v for k, v in row.items() if k != "image"} for row in first]
    seeded = client.post(
        "/catalogues/shop/ingest", files={"file": ("seed.csv", catalogue_csv(text_only), "text/csv")}, headers=KEY
    )
    assert seeded.status_code == 202, seeded.text
    assert wait_for(client, seeded.json()["id"])["ingest"]["new"] == 12

    rows = sample_rows(45)
    submitted = client.post(
        "/catalogues/shop/ingest",
        files={"file": ("grocery photos.zip", sample_zip(rows, top="grocery/"), "application/zip")},
        data={"retailer": "unused-here", "prune": "false"},
        headers=KEY,
    )
    assert submitted.status_code == 202, submitted.text
    body = submitted.json()
    assert (body["kind"], body["catalogue"], body["status"]) in {("ingest", "shop", s) for s in ("queued", "running")}

    # Searches meanwhile: the store's lock keeps them apart from the job's writes; none may fail.
    answers = []
    while client.get(f"/jobs/{body['id']}").json()["status"] in ("queued", "running"):
        response = client.post("/search", data={"text": "milk", "limit": "5"})
        answers.append(response.status_code)
        assert response.status_code == 200, response.text
    job = wait_for(client, body["id"])
    assert job["status"] == "done" and job["error"] is None, job
    report = job["ingest"]
    assert report["file"] == "grocery photos.zip"
    assert (report["read"], report["new"], report["updated"], report["unchanged"]) == (45, 33, 12, 0)
    assert report["images_embedded"] == 45 and report["rejected_rows"] == 0 and job["done"] == 45
    assert answers, "no search ran during the ingest"

    found = client.post(
        "/search", files={"image": (PHOTO.name, PHOTO.read_bytes(), "image/jpeg")}, data={"catalogue": "shop"}
    ).json()["results"][0]
    assert (found["id"], found["product"]["title"]) == ("41", "Arla Standard Milk")
    photo = client.get(found["product"]["image_urls"][0])  # served from the extracted zip, kept in sources
    assert photo.status_code == 200 and photo.content == PHOTO.read_bytes()
    assert not uploads_left(settings)  # the uploaded zip itself is gone once its job is over
    assert client.get("/readyz").status_code == 200


def test_a_csv_upload_may_not_name_files_on_the_server(client: TestClient, tmp_path: Path) -> None:
    secret = tmp_path / "private.jpg"
    secret.write_bytes(PHOTO.read_bytes())
    rows = [
        {"id": "u1", "retailer": "web", "title": "Oat drink barista", "image": ""},
        {"id": "u2", "retailer": "web", "title": "Stolen photo", "image": str(secret)},
        {"id": "u3", "retailer": "web", "title": "Relative photo", "image": "images/Arla-Standard-Milk_Iconic.jpg"},
        {"id": "", "retailer": "web", "title": "No id"},
    ]
    submitted = client.post(
        "/catalogues/uploads/ingest", files={"file": ("feed.csv", catalogue_csv(rows), "text/csv")}, headers=KEY
    )
    job = wait_for(client, submitted.json()["id"])
    assert job["status"] == "done", job
    report = job["ingest"]
    assert (report["new"], report["rejected_rows"]) == (1, 3)
    reasons = {r["line"]: (r["field"], r["reason"]) for r in report["rejections"]}
    assert reasons[3] == ("image", f"{secret}: {UPLOAD_LOCAL}") and reasons[4][1].endswith(UPLOAD_LOCAL)
    assert reasons[5] == ("id", "Field required")
    hits = client.post("/search", data={"text": "oat drink", "catalogue": "uploads"}).json()["results"]
    assert [h["id"] for h in hits] == ["u1"]


def test_bad_files_fail_with_a_message(client: TestClient, settings: Settings) -> None:
    def post(name: str, data: bytes, **fields: str) -> Any:
        return client.post("/catalogues/bad/ingest", files={"file": (name, data, "text/csv")}, data=fields, headers=KEY)

    refused = {
        "notes.txt": (post("notes.txt", b"hello"), 422, "must be a file named"),
        "fake.zip": (post("fake.zip", b"PK not really"), 422, "'fake.zip' is not a zip file"),
        "empty.csv": (post("empty.csv", b""), 422, "is empty"),
        "bad field": (post("a.csv", b"id\n1\n", colour="red"), 422, "unexpected form field 'colour'"),
        "bad bool": (post("a.csv", b"id\n1\n", prune="perhaps"), 422, "prune"),
    }
    for what, (response, status, message) in refused.items():
        assert response.status_code == status and message in response.json()["detail"], (what, response.text)
    not_multipart = client.post(
        "/catalogues/bad/ingest", content=b"id,title\n", headers={**KEY, "content-type": "text/csv"}
    )
    assert not_multipart.status_code == 415 and "multipart/form-data" in not_multipart.json()["detail"]

    # Files that can only be judged by reading them: the job fails, and says why.
    no_rows = wait_for(client, post("nothing.csv", b"id,retailer,title\n,,\n").json()["id"])
    assert no_rows["status"] == "failed" and "no row of 'nothing.csv' could be ingested" in no_rows["error"]
    assert no_rows["ingest"]["rejected_rows"] == 1 and no_rows["ingest"]["rejections"][0]["line"] == 2
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("../escape.csv", "id,retailer,title\n1,x,y\n")
    climbing = wait_for(client, post("climb.zip", buffer.getvalue()).json()["id"])
    assert climbing["status"] == "failed" and "climbs out of the folder" in climbing["error"]
    assert "climb.zip" in climbing["error"] and str(settings.sources_root) not in climbing["error"]
    assert not uploads_left(settings)


def test_oversize_uploads_are_refused_with_413(client: TestClient, settings: Settings) -> None:
    too_big = b"id,retailer,title\n" + b"x" * 2 * settings.max_ingest_upload_bytes  # past the body cap too
    declared = client.post("/catalogues/big/ingest", files={"file": ("big.csv", too_big, "text/csv")}, headers=KEY)
    assert declared.status_code == 413 and "larger than 2097152 bytes" in declared.json()["detail"]

    boundary = "b0undary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.csv"\r\n\r\n'.encode()

    def chunked() -> Iterator[bytes]:  # no Content-Length: the cap is enforced as the bytes arrive
        yield head
        for _ in range(40):
            yield b"y" * 65_536
        yield f"\r\n--{boundary}--\r\n".encode()

    streamed = client.post(
        "/catalogues/big/ingest",
        content=chunked(),
        headers={**KEY, "content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert streamed.status_code == 413 and "MAX_INGEST_UPLOAD_BYTES" in streamed.json()["detail"]
    assert not uploads_left(settings)
    assert "big" not in [c["name"] for c in client.get("/catalogues").json()["catalogues"]]


def test_ingest_needs_the_api_key(client: TestClient) -> None:
    upload = {"file": ("k.csv", b"id,retailer,title\n1,x,y\n", "text/csv")}
    missing = client.post("/catalogues/keyed/ingest", files=upload)
    assert missing.status_code == 401 and "X-API-Key" in missing.json()["detail"]
    wrong = client.post("/catalogues/keyed/ingest", files=upload, headers={"X-API-Key": "ingest-kex"})
    assert wrong.status_code == 403 and wrong.json()["detail"] == "the API key is not valid"
    assert "keyed" not in [c["name"] for c in client.get("/catalogues").json()["catalogues"]]
    right = client.post("/catalogues/keyed/ingest", files=upload, headers=KEY)
    assert right.status_code == 202 and wait_for(client, right.json()["id"])["status"] == "done"


def test_a_new_version_of_a_zip_leaves_only_the_extractions_still_in_use(
    client: TestClient, settings: Settings
) -> None:
    rows = sample_rows(6)
    folder = settings.sources_root / "versions"
    for version in (1, 2, 3):  # each version renames every product, so its photos move to its own folder
        renamed = [{**row, "title": f"{row['title']} v{version}"} for row in rows]
        submitted = client.post(
            "/catalogues/versions/ingest", files={"file": ("feed.zip", sample_zip(renamed))}, headers=KEY
        )
        assert wait_for(client, submitted.json()["id"])["status"] == "done"
        assert len([p for p in folder.iterdir() if p.is_dir()]) == 1, sorted(p.name for p in folder.iterdir())
    only_some = [{**row, "title": f"{row['title']} v4"} for row in rows[:3]]  # three products stay on v3's photos
    submitted = client.post(
        "/catalogues/versions/ingest", files={"file": ("feed.zip", sample_zip(only_some))}, headers=KEY
    )
    assert wait_for(client, submitted.json()["id"])["status"] == "done"
    assert len([p for p in folder.iterdir() if p.is_dir()]) == 2  # v3's is still referred to
    (folder / ".feed-half.abc").mkdir()  # what a killed extraction leaves
    os.utime(folder / ".feed-half.abc", (0, 0))
    assert sweep_extractions(settings.sources_root) == 1 and not (folder / ".feed-half.abc").exists()


def running(jobs: Jobs, job: Job) -> Job:
    """`job` once the worker has taken it."""
    deadline = time.monotonic() + 10
    while (now := jobs.get(job.id)) is not None and now.status == "queued" and time.monotonic() < deadline:
        time.sleep(0.02)
    return job


def test_queued_jobs_are_bounded_and_errors_name_no_server_path(settings: Settings, state: AppState) -> None:
    release = threading.Event()
    jobs = Jobs(max_queued=1, redact=settings.redact_paths)

    def blocked(handle: JobHandle) -> Iterator[list[dict[str, str]]]:
        release.wait(30)
        raise FileExistsError(f"[Errno 17] File exists: '{settings.store_path / 'edge.lock'}'")
        yield []

    first = running(jobs, jobs.submit("ingest", "c", blocked))
    jobs.submit("ingest", "c", blocked)  # waits behind the first
    with pytest.raises(JobsFull):
        jobs.submit("ingest", "c", blocked)
    release.set()
    deadline = time.monotonic() + 20
    while jobs.get(first.id).status != "failed" and time.monotonic() < deadline:  # type: ignore[union-attr]
        time.sleep(0.02)
    error = jobs.get(first.id).error  # type: ignore[union-attr]
    assert error is not None and error.startswith("FileExistsError") and str(settings.store_path) not in error
    assert "<store>/edge.lock" in error
    jobs.close(5)

    full = state.settings.model_copy(update={"max_queued_jobs": 1})
    busy = AppState(full, state.store, state.engine, Jobs(max_queued=1))
    release.clear()
    running(busy.jobs, busy.jobs.submit("ingest", "c", blocked))
    busy.jobs.submit("ingest", "c", blocked)
    with TestClient(create_app(state=busy), base_url="http://localhost") as http:
        refused = http.post(
            "/catalogues/shop/ingest", files={"file": ("f.csv", catalogue_csv(sample_rows(1)))}, headers=KEY
        )
        assert refused.status_code == 429 and refused.headers["Retry-After"] and "MAX_QUEUED_JOBS" in refused.text
    release.set()
    busy.jobs.close(5)
