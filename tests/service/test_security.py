"""The service and the CLI attacked as a hostile client and a careless operator would: photo references that
reach for files they may not (every spelling of the column, every format, every kind of file), bad JSON and
bad categories, forged log lines, leaked server paths, zips that fill a disk. Each attack either fails with a
clear refusal or never touches what it aimed at. Slow hosts, SIGTERM and kill -9: tests/test_shutdown.py."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from ingest.inputs import UPLOAD_LOCAL, ZIP_OUTSIDE, InputError, archive_cap, extract_zip
from ingest.pipeline import Ingestor
from retrieval.encoders import ImageEncoder, TextEncoder
from retrieval.search import SearchEngine
from retrieval.settings import Settings
from retrieval.store import ProductStore
from schemas.search import SearchFilters
from service.app import create_app
from service.logs import TextFormatter
from service.state import AppState
from tests.conftest import SAMPLE, wait_for_job

PHOTOS = SAMPLE.parent / "images"
PHOTO = (PHOTOS / "Anjou_Iconic.jpg").read_bytes()
SECRET = (PHOTOS / "Oatly-Oat-Milk_Iconic.jpg").read_bytes()  # a real photo: read, it would embed and be served
# Every way the photo column has been spelled to slip past a check on the key `image`.
SPELLINGS = ["image", " image", "image ", "\u00a0image", "\u2003image", "\timage", "\ufeffimage", "IMAGE"]


@pytest.fixture(scope="module")
def private(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of the server's that no catalogue may read: a secret photo, and a FIFO nobody writes to."""
    folder = tmp_path_factory.mktemp("private")
    (folder / "secret.jpg").write_bytes(SECRET)
    os.mkfifo(folder / "pipe.jpg")
    return folder


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    root = tmp_path_factory.mktemp("security")
    return Settings(qdrant_path=root / "qdrant", sources_path=root / "sources", default_catalogue="c")


@pytest.fixture(scope="module")
def client(settings: Settings, image_encoder: ImageEncoder, text_encoder: TextEncoder) -> Iterator[TestClient]:
    store = ProductStore.open(settings)
    state = AppState(settings, store, SearchEngine(store, image_encoder, text_encoder))
    with TestClient(create_app(state=state), raise_server_exceptions=False, base_url="http://localhost") as test_client:
        yield test_client
    state.close()


def csv_bytes(header: list[str], rows: list[list[str]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().encode()


def jsonl_bytes(header: list[str], rows: list[list[str]]) -> bytes:
    return "".join(json.dumps(dict(zip(header, row, strict=True))) + "\n" for row in rows).encode()


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def upload(client: TestClient, catalogue: str, name: str, data: bytes) -> dict[str, Any]:
    submitted = client.post(f"/catalogues/{catalogue}/ingest", files={"file": (name, data)})
    assert submitted.status_code == 202, submitted.text
    return wait_for_job(client, submitted.json()["id"])


def hostile_rows(private: Path) -> list[list[str]]:
    """Rows whose photos point out of any upload: absolute, climbing, home, a FIFO, a missing file."""
    return [
        ["abs", "evil", "Absolute", str(private / "secret.jpg")],
        ["up", "evil", "Climbs", "../../../../../../../../" + str(private / "secret.jpg").lstrip("/")],
        ["home", "evil", "Home", "~/secret.jpg"],
        ["fifo", "evil", "Pipe", str(private / "pipe.jpg")],
        ["gone", "evil", "Missing", str(private / "no-such.jpg")],
        ["ok", "evil", "Text only", ""],
    ]


def assert_nothing_served(client: TestClient, catalogue: str, job: dict[str, Any]) -> None:
    """No hostile row got a photo, the photo endpoint hands out nothing, and the reasons give nothing away."""
    assert SECRET.hex()[:64] not in json.dumps(job)
    for product_id in ("abs", "up", "home", "fifo", "gone"):
        photo = client.get(f"/catalogues/{catalogue}/products/evil/{product_id}/images/0")
        assert photo.status_code == 404 and SECRET not in photo.content, (product_id, photo.status_code)


@pytest.mark.parametrize("kind", ["csv", "jsonl", "zip"])
def test_no_spelling_of_the_photo_column_reaches_a_file_outside_the_upload(
    client: TestClient, private: Path, kind: str
) -> None:
    for number, column in enumerate(SPELLINGS):
        header = ["id", "retailer", "title", column]
        catalogue = f"spell-{kind}-{number}"
        rows = hostile_rows(private)
        if kind == "csv":
            job = upload(client, catalogue, "feed.csv", csv_bytes(header, rows))
        elif kind == "jsonl":
            job = upload(client, catalogue, "feed.jsonl", jsonl_bytes(header, rows))
        else:
            job = upload(client, catalogue, "feed.zip", zip_bytes({"catalogue.csv": csv_bytes(header, rows)}))
        assert job["status"] == "done", (column, job)
        assert_nothing_served(client, catalogue, job)
        refused = {r["id"]: r["reason"] for r in job["ingest"]["rejections"]}
        if column.strip() == "image":  # the column is the photo column: every local path refuses its row
            # (in a zip, `~/secret.jpg` is a name inside the zip, where there is no such file)
            outside = {"abs", "up", "fifo", "gone"} | ({"home"} if kind != "zip" else set())
            why = ZIP_OUTSIDE if kind == "zip" else UPLOAD_LOCAL
            assert set(refused) == outside, (column, refused)
            # the same words whether the path exists or not: a refusal tells nothing about the server's disk
            assert {reason.split(": ", 1)[1] for reason in refused.values()} == {why}, refused
            assert job["ingest"]["new"] == 6 - len(outside)
        else:  # another column (an attribute): stored as text, never opened
            assert refused == {} and job["ingest"]["new"] == 6 and job["ingest"]["images_embedded"] == 0


def test_cli_catalogues_read_only_their_folder_and_the_named_ones(
    tmp_path: Path, private: Path, ingestor: Ingestor, store: ProductStore, catalogue_name: str
) -> None:
    feed = tmp_path / "feed"
    (feed / "images").mkdir(parents=True)
    (feed / "images" / "pear.jpg").write_bytes(PHOTO)
    (feed / "images" / "link.jpg").symlink_to(private / "secret.jpg")  # inside by name, outside in fact
    (feed / "images" / "zero.jpg").symlink_to("/dev/zero")
    os.mkfifo(feed / "images" / "pipe.jpg")  # inside, but no photo: read, it would block the run for ever
    rows = [*hostile_rows(private), ["pear", "evil", "Pear", "images/pear.jpg"]]
    rows += [["link", "evil", "Link", "images/link.jpg"], ["zero", "evil", "Zero", "images/zero.jpg"]]
    rows += [["pipe", "evil", "Pipe inside", "images/pipe.jpg"]]
    (feed / "catalogue.csv").write_bytes(csv_bytes(["id", "retailer", "title", " image"], rows))

    report = ingestor.run(feed / "catalogue.csv", catalogue_name, progress=False)
    refused = {r.id: r.reason for r in report.rejected_rows}
    assert set(refused) == {"abs", "up", "home", "fifo", "gone", "link", "zero"}
    assert all("points outside the catalogue's folder" in reason for reason in refused.values())
    skipped = {s.id: s.reason for s in report.skipped_images}
    assert skipped == {"pipe": "images/pipe.jpg: not a regular file (a device, pipe or socket)"}
    assert report.new == 3 and report.images_embedded == 1  # ok (text), pear (photo), pipe inside (text)

    # The operator names the private folder: now its photo may be read, the FIFO still is not.
    again = ingestor.run(feed / "catalogue.csv", catalogue_name, progress=False, photo_roots=[private])
    assert {r.id for r in again.rejected_rows} == {"home", "zero"}  # /root and /dev stay out of reach
    assert {s.id for s in again.skipped_images} == {"fifo", "gone"}  # (`pipe` is unchanged: not read again)
    assert again.new == 5 and again.images_embedded >= 1  # abs, up, link: the secret photo, now allowed


def test_the_photo_endpoint_serves_only_the_bytes_it_ingested(
    tmp_path: Path, private: Path, settings: Settings, client: TestClient
) -> None:
    feed = tmp_path / "feed"
    (feed / "images").mkdir(parents=True)
    (feed / "images" / "pear.jpg").write_bytes(PHOTO)
    (feed / "images" / "apple.jpg").write_bytes(SECRET[::-1] + PHOTO)  # any bytes; replaced below
    (feed / "catalogue.csv").write_bytes(
        csv_bytes(["id", "retailer", "title", "image"], [["1", "shop", "Pear", "images/pear.jpg"]])
    )
    state: AppState = client.app.state.app_state  # type: ignore[attr-defined]
    engine = state.engine
    Ingestor(settings, state.store, engine.image_encoder, engine.text_encoder).run(
        feed / "catalogue.csv", "served", progress=False
    )
    url = "/catalogues/served/products/shop/1/images/0"
    first = client.get(url)
    assert first.status_code == 200 and first.content == PHOTO and first.headers["content-type"] == "image/jpeg"
    (feed / "images" / "pear.jpg").write_bytes(SECRET)  # same path, other bytes
    assert client.get(url).status_code == 404
    (feed / "images" / "pear.jpg").unlink()
    (feed / "images" / "pear.jpg").symlink_to(private / "secret.jpg")
    swapped = client.get(url)
    assert swapped.status_code == 404 and SECRET not in swapped.content
    (feed / "images" / "pear.jpg").unlink()
    os.mkfifo(feed / "images" / "pear.jpg")
    assert client.get(url).status_code == 404  # answered at once, not blocked on the FIFO


BAD_CATEGORIES = ["a > > b", ">", "Fruit >", "> Fruit", "x" * 300]


@pytest.mark.parametrize("category", BAD_CATEGORIES)
def test_a_bad_category_is_a_422_on_every_search(client: TestClient, category: str) -> None:
    upload(client, "c", "feed.csv", csv_bytes(["id", "retailer", "title"], [["1", "s", "Oat milk"]]))
    form = client.post("/search", data={"text": "oat", "category": category})
    body = client.post("/search/json", json={"text": "oat", "filters": {"category": category}})
    matches = client.get("/catalogues/c/products/s/1/matches", params={"category": category})
    for response in (form, body, matches):
        assert response.status_code == 422, response.text
        assert "category" in response.text or "level" in response.text
    assert body.json()["detail"][0]["loc"] == ["body", "filters", "category"]


RAW_BODIES = {
    "NaN": ('{"text": "oat", "options": {"image_weight": NaN}}', "body.options.image_weight"),
    "Infinity": ('{"text": "oat", "filters": {"price_min": -Infinity}}', "body.filters.price_min"),
    "1e400": ('{"text": "oat", "options": {"score_threshold": 1e400}}', "body.options.score_threshold"),
    "surrogate": ('{"text": "\\ud800 oat"}', "body.text"),
    "surrogate key": ('{"text": "oat", "\\udfff": 1}', "body"),
    "huge int": (
        '{"text": "oat", "filters": {"where": [{"key": "price", "any": [9223372036854775808]}]}}',
        "body.filters.where.0.any.0",
    ),
    "huge match": (
        '{"text": "oat", "filters": {"where": [{"key": "price", "match": -99999999999999999999}]}}',
        "body.filters.where.0.match",
    ),
}


@pytest.mark.parametrize("name", sorted(RAW_BODIES))
def test_hostile_json_is_a_422_naming_the_field(client: TestClient, name: str) -> None:
    raw, field = RAW_BODIES[name]
    headers = {"content-type": "application/json"}
    for path in ("/search/json", "/catalogues/c/match-jobs"):
        response = client.post(path, content=raw.encode(), headers=headers)
        assert response.status_code == 422, (path, response.text)
        if path == "/search/json":
            assert response.json()["detail"].startswith(f"{field}: "), response.text


def test_validation_errors_do_not_echo_the_input(client: TestClient) -> None:
    # Valid JSON whose values fail the schema: the answer names the field, never repeats what was sent.
    sent = {"text": "oat", "options": {"limit": "x" * 5_000}, "filters": {"where": [{"key": "../../etc"}]}}
    response = client.post("/search/json", json=sent)
    assert response.status_code == 422
    assert "x" * 100 not in response.text and "input" not in response.json()["detail"][0]
    locs = [error["loc"] for error in response.json()["detail"]]
    assert ["body", "options", "limit"] in locs


def test_forged_log_lines_stay_inside_their_record(client: TestClient) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        forged = "x\nCRITICAL service.auth: admin login OK\n.csv"
        body = (  # by hand: HTTP clients escape a newline in a file name, an attacker does not
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="' + forged.encode() + b'"\r\n\r\n'
            b"id,retailer,title\n\r\n--b--\r\n"
        )
        headers = {"content-type": "multipart/form-data; boundary=b"}
        submitted = client.post("/catalogues/logs/ingest", content=body, headers=headers)
        assert submitted.status_code == 202, submitted.text
        job = wait_for_job(client, submitted.json()["id"])
        terminal = forged + "\x1b[2J"  # an escape sequence that would clear the reader's terminal
        logging.getLogger("service.test").warning("a client said %s", terminal, exc_info=ValueError(terminal))
    finally:
        root.removeHandler(handler)
    assert job["status"] == "failed" and "\n" not in job["error"]
    lines = stream.getvalue().splitlines()
    assert lines and not any(line.startswith("CRITICAL") for line in lines), lines
    levels = ("DEBUG", "INFO", "WARNING", "ERROR")
    assert all(line.split(" ", 1)[0] in levels or line.startswith("    ") for line in lines), lines
    assert "\x1b" not in stream.getvalue()


def test_no_server_path_in_readiness_or_reasons(client: TestClient, settings: Settings, tmp_path: Path) -> None:
    ready = client.get("/readyz")
    assert str(settings.store_path) not in ready.text and "embedded Qdrant" in ready.text
    rows = [["1", "shop", "Pear", "images/pear.jpg"], ["2", "shop", "Ghost", "images/ghost.jpg"]]
    files = {"catalogue.csv": csv_bytes(["id", "retailer", "title", "image"], rows), "images/pear.jpg": PHOTO}
    job = upload(client, "paths", "shop.zip", zip_bytes(files))
    assert job["status"] == "done" and job["ingest"]["skipped"][0]["reason"] == "images/ghost.jpg: file not found"
    assert str(settings.sources_root) not in json.dumps(job) and "/tmp/" not in json.dumps(job)


def test_zips_cannot_fill_the_disk(tmp_path: Path, client: TestClient, settings: Settings) -> None:
    bomb = tmp_path / "zeros.zip"
    bomb.write_bytes(zip_bytes({"catalogue.csv": b"id,retailer,title\n1,s,t\n", "big.bin": bytes(64 * 1024 * 1024)}))
    assert bomb.stat().st_size < 200_000
    with pytest.raises(InputError, match="over 200x.*possible zip bomb"):
        extract_zip(bomb, tmp_path / "sources", max_bytes=10**12)
    assert not (tmp_path / "sources").exists() or not any((tmp_path / "sources").iterdir())

    # By default a zip may unpack to a quarter of the free space at most.
    assert archive_cap(tmp_path, None) <= os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize // 4 + 1
    assert archive_cap(tmp_path, 123) == 123

    # A zip that ingests nothing leaves nothing extracted, nor its upload.
    useless = zip_bytes({"catalogue.csv": b"id,retailer,title\n,,\n", "images/pear.jpg": PHOTO})
    job = upload(client, "useless", "useless.zip", useless)
    assert job["status"] == "failed" and "could be ingested" in job["error"]
    left = [p for p in settings.sources_root.rglob("*") if "useless" in str(p)]
    assert left == [] and not any((settings.sources_root / ".uploads").iterdir())
    names = [c["name"] for c in client.get("/catalogues").json()["catalogues"]]
    assert "useless" not in names  # no empty catalogue left by a refused feed


def test_the_schema_bounds_integers_for_the_engines() -> None:
    # Behind the JSON parser, the schema itself refuses what the engines cannot store (i64).
    for key, value in (("any", [2**63]), ("except", [-(2**63) - 1]), ("match", 2**64)):
        with pytest.raises(ValidationError, match="less than or equal|greater than or equal"):
            SearchFilters.model_validate({"where": [{"key": "price", key: value}]})
    assert SearchFilters.model_validate({"where": [{"key": "price", "any": [2**63 - 1]}]}).where[0].any == [2**63 - 1]
