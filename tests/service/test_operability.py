"""Hardening and operations of the HTTP service: the API key, CORS, the JSON 500, request ids in headers and
log lines, readiness, Prometheus metrics, and uvicorn's graceful shutdown with our settings."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from pydantic import SecretStr

import service.__main__ as service_main
from retrieval.search import SearchEngine
from retrieval.settings import Settings
from retrieval.store import EncoderFingerprint
from service.app import create_app
from service.deps import get_state
from service.jobs import JobHandle, Jobs, JobsClosed
from service.logs import JsonFormatter
from service.state import AppState
from tests.conftest import wait_for_job

KEY = "op-key-0123456789"


def client_for(engine: SearchEngine, settings: Settings) -> TestClient:
    return TestClient(
        create_app(state=AppState(settings, engine.store, engine)),
        raise_server_exceptions=True,
        base_url="http://localhost",
    )


@pytest.fixture(scope="module")
def keyed(engine: SearchEngine, sample_settings: Settings) -> Iterator[TestClient]:
    """The service with API_KEY and CORS_ORIGINS set."""
    settings = sample_settings.model_copy(
        update={"api_key": SecretStr(KEY), "cors_origins": "https://shop.example, https://admin.example"}
    )
    with client_for(engine, settings) as client:
        yield client


@pytest.fixture(scope="module")
def plain(engine: SearchEngine, sample_settings: Settings) -> Iterator[TestClient]:
    """The service as configured by default: no API key, no CORS."""
    with client_for(engine, sample_settings) as client:
        yield client


def test_write_endpoints_need_the_key_and_reads_stay_open(keyed: TestClient, two_shops: str) -> None:
    path, body = f"/catalogues/{two_shops}/match-jobs", {"retailer": "hemkop", "product_ids": ["3"], "limit": 1}
    missing = keyed.post(path, json=body)
    assert missing.status_code == 401 and missing.json() == {
        "detail": "this endpoint needs the API key in the X-API-Key header"
    }
    assert keyed.post(path, json={"no": "such field"}).status_code == 401  # the key is checked before the body
    for wrong in ("op-key-012345678", "op-key-0123456789x", "", "x" * 1000):
        response = keyed.post(path, json=body, headers={"X-API-Key": wrong})
        assert response.status_code == (403 if wrong else 401), (wrong, response.text)
    ingest = keyed.post("/catalogues/x/ingest", files={"file": ("a.csv", b"id\n", "text/csv")})
    assert ingest.status_code == 401

    submitted = keyed.post(path, json=body, headers={"X-API-Key": KEY})
    assert submitted.status_code == 202, submitted.text
    job = wait_for_job(keyed, submitted.json()["id"])  # reading a job needs no key
    assert job["status"] == "done" and keyed.get(f"/jobs/{job['id']}/rows").json()[0]["right_id"] == "o-3"
    assert keyed.post("/search", data={"text": "milk"}).status_code == 200
    assert keyed.post("/search/json", json={"text": "milk"}).status_code == 200
    for read in ("/catalogues", f"/catalogues/{two_shops}/products/hemkop/3", "/healthz", "/readyz", "/metrics"):
        assert keyed.get(read).status_code == 200, read
    assert "ApiKey" in keyed.get("/openapi.json").json()["components"]["securitySchemes"]


def test_cors_headers_only_for_configured_origins(keyed: TestClient, plain: TestClient) -> None:
    origin = {"Origin": "https://shop.example"}
    simple = keyed.get("/healthz", headers=origin)
    assert simple.headers["access-control-allow-origin"] == "https://shop.example"
    assert "X-Request-ID" in simple.headers["access-control-expose-headers"]
    preflight = keyed.options(
        "/search",
        headers={**origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "X-API-Key"},
    )
    assert preflight.status_code == 200 and "x-api-key" in preflight.headers["access-control-allow-headers"].lower()
    stranger = keyed.get("/healthz", headers={"Origin": "https://evil.example"})
    assert stranger.status_code == 200 and "access-control-allow-origin" not in stranger.headers
    denied = keyed.options(
        "/search", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert denied.status_code == 400 and "access-control-allow-origin" not in denied.headers

    unconfigured = plain.get("/healthz", headers=origin)
    assert not [h for h in unconfigured.headers if h.lower().startswith("access-control-")]


def test_an_internal_error_is_a_json_500_with_the_request_id(
    engine: SearchEngine, sample_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(state=AppState(sample_settings, engine.store, engine))

    def broken() -> AppState:
        raise RuntimeError("secret detail: /srv/private/path")

    app.dependency_overrides[get_state] = broken  # every route that reads the state now fails inside
    caplog.set_level(logging.INFO)
    with TestClient(app, base_url="http://localhost") as client:  # raise_server_exceptions: nothing may escape the app
        response = client.get("/catalogues", headers={"X-Request-ID": "trace-500"})
    assert response.status_code == 500
    assert response.json() == {"detail": "internal error", "request_id": "trace-500"}
    assert response.headers["x-request-id"] == "trace-500"
    assert "secret" not in response.text and "Traceback" not in response.text

    (record,) = [r for r in caplog.records if r.name == "service.errors"]
    assert record.levelname == "ERROR" and getattr(record, "request_id", None) == "trace-500"
    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == "trace-500" and line["logger"] == "service.errors"
    assert "RuntimeError: secret detail" in line["exception"] and "GET /catalogues" in line["message"]


def test_request_ids_round_trip_and_reach_every_log_line(
    plain: TestClient, two_shops: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert plain.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
    made = plain.get("/healthz").headers["x-request-id"]
    assert len(made) == 32 and int(made, 16) >= 0
    for unsafe in ("has space", "x" * 200, 'quote"d'):
        replaced = plain.get("/healthz", headers={"X-Request-ID": unsafe}).headers["x-request-id"]
        assert replaced != unsafe and len(replaced) == 32
    assert plain.get("/nowhere", headers={"X-Request-ID": "r-404"}).headers["x-request-id"] == "r-404"

    caplog.set_level(logging.INFO)
    submitted = plain.post(
        f"/catalogues/{two_shops}/match-jobs",
        json={"retailer": "hemkop", "product_ids": ["4"], "limit": 1},
        headers={"X-Request-ID": "req-job-1"},
    )
    job = wait_for_job(plain, submitted.json()["id"])
    assert submitted.headers["x-request-id"] == "req-job-1" and job["status"] == "done"
    ours = [r for r in caplog.records if getattr(r, "request_id", None) == "req-job-1"]
    queued = [r for r in ours if "queued" in r.getMessage()]
    in_job = [r for r in ours if getattr(r, "job_id", None) == job["id"]]  # the worker thread's lines too
    assert queued and {"match job started", "match job done"} <= {r.getMessage() for r in in_job}
    line = json.loads(JsonFormatter().format(queued[0]))
    assert line["request_id"] == "req-job-1" and line["level"] == "INFO" and job["id"] in line["message"]
    assert set(line) >= {"time", "level", "logger", "message", "request_id"}


def test_readiness(engine: SearchEngine, sample_settings: Settings, plain: TestClient) -> None:
    ready = plain.get("/readyz")
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["status"] == "ready" and body["reason"] is None and "grocery" in body["catalogues"]
    assert body["image_encoder"].startswith("timm:") and body["store"].startswith("embedded Qdrant")

    with client_for(engine, sample_settings.model_copy(update={"default_catalogue": "nope"})) as client:
        missing = client.get("/readyz")
        assert client.get("/healthz").status_code == 200  # alive, not ready
    assert missing.status_code == 503 and missing.json()["status"] == "not ready"
    assert "default catalogue 'nope' does not exist" in missing.json()["reason"]

    engine.store.ensure_catalogue("other-encoders", EncoderFingerprint("timm:other", 8, "st:other", 8))
    try:
        with client_for(engine, sample_settings.model_copy(update={"default_catalogue": "other-encoders"})) as client:
            mismatch = client.get("/readyz")
    finally:
        engine.store.drop_catalogue("other-encoders")
    assert mismatch.status_code == 503 and "was built with image encoder timm:other" in mismatch.json()["reason"]

    # no lifespan has run: nothing loaded yet
    loading = TestClient(create_app(sample_settings), base_url="http://localhost")
    assert loading.get("/readyz").status_code == 503 and "still loading" in loading.get("/readyz").text
    assert loading.get("/healthz").status_code == 200


def test_request_bodies_are_capped(engine: SearchEngine, sample_settings: Settings) -> None:
    settings = sample_settings.model_copy(update={"max_upload_bytes": 300_000})  # body cap: 4/3 of it + 1 MiB
    cap = 400_000 + 1024 * 1024
    with client_for(engine, settings) as client:
        declared = client.post("/search/json", content=b"{" + b" " * cap + b"}", headers={"X-Request-ID": "big-1"})

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
            yield b'{"text": "'
            for _ in range(30):
                yield b"a" * 65_536
            yield b'"}'

        streamed = client.post("/search/json", content=chunks(), headers={"content-type": "application/json"})
        form = client.post("/search", files={"image": ("p.jpg", b"\xff" * (cap + 1), "image/jpeg")})
        fine = client.post("/search", files={"image": ("p.jpg", b"\xff" * 300_001, "image/jpeg")})
    message = f"the request body is larger than {cap} bytes"
    assert declared.status_code == 413 and declared.json() == {"detail": message}
    assert declared.headers["x-request-id"] == "big-1"
    assert streamed.status_code == 413 and streamed.json() == {"detail": message}
    assert form.status_code == 413 and form.json() == {"detail": message}
    assert fine.status_code == 413 and "the image is larger than 300000 bytes" in fine.text  # the photo's own cap


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_metrics_by_route_template_and_status(plain: TestClient) -> None:
    product = {"method": "GET", "route": "/catalogues/{catalogue}/products/{retailer}/{product_id}"}
    search = {"method": "POST", "route": "/search"}
    before = {
        "ok": sample("http_requests_total", **product, status="200"),
        "missing": sample("http_requests_total", **product, status="404"),
        "search": sample("http_request_duration_seconds_count", **search, status="200"),
        "unmatched": sample("http_requests_total", method="GET", route="unmatched", status="404"),
        "store": sample("store_query_seconds_count", operation="query_batch"),
        "text_batches": sample("encoder_batch_size_count", modality="text"),
    }
    for product_id in ("41", "42", "nope"):
        plain.get(f"/catalogues/grocery/products/hemkop/{product_id}")
    plain.post("/search", data={"text": "juice"})
    plain.get("/no/such/page")

    exposed = plain.get("/metrics")
    assert exposed.status_code == 200 and exposed.headers["content-type"].startswith("text/plain")
    text = exposed.text
    assert sample("http_requests_total", **product, status="200") == before["ok"] + 2
    assert sample("http_requests_total", **product, status="404") == before["missing"] + 1
    assert sample("http_request_duration_seconds_count", **search, status="200") == before["search"] + 1
    assert sample("http_requests_total", method="GET", route="unmatched", status="404") == before["unmatched"] + 1
    assert sample("store_query_seconds_count", operation="query_batch") > before["store"]
    series = 'method="GET",route="/catalogues/{catalogue}/products/{retailer}/{product_id}",status="200"'
    assert f"http_requests_total{{{series}}}" in text
    assert 'http_request_duration_seconds_bucket{le="0.5",method="POST",route="/search",status="200"}' in text
    assert "hemkop/41" not in text and "/no/such/page" not in text  # never a raw path
    for name in ("encoder_batch_size", "encoder_queue_seconds", "store_lock_wait_seconds", "http_requests_in_flight"):
        assert f"# TYPE {name}" in text
    assert sample("encoder_batch_size_count", modality="text") > before["text_batches"]  # the search's text


def test_shutdown_drops_queued_jobs_and_stops_the_running_one() -> None:
    jobs, cleaned = Jobs(), list[str]()

    def running(handle: JobHandle) -> Iterator[list[dict[str, str]]]:
        handle.set_total(3)
        yield [{"n": "1"}]
        handle.stop.wait(10)  # busy until the service stops
        yield [{"n": "2"}]
        yield [{"n": "3"}]

    first = jobs.submit("match", "c", running, cleanup=lambda: cleaned.append("first"))
    second = jobs.submit("ingest", "c", lambda handle: iter([]), cleanup=lambda: cleaned.append("second"))
    for _ in range(200):
        if jobs.rows(first.id):
            break
        time.sleep(0.01)
    jobs.close(timeout=10)
    stopped, dropped = jobs.get(first.id), jobs.get(second.id)
    assert stopped is not None and dropped is not None
    assert (stopped.status, stopped.done) == ("interrupted", 2)
    assert "stopped before the job finished" in str(stopped.error)
    assert dropped.status == "interrupted" and "the service stopped" in str(dropped.error)
    assert sorted(cleaned) == ["first", "second"]  # an ingest's upload is removed either way
    with pytest.raises(JobsClosed):
        jobs.submit("match", "c", running)


def refuses_connections(base: str, seconds: float = 10) -> bool:
    """Whether the server at `base` stops taking connections within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{base}/healthz", timeout=2)
        except httpx.ConnectError:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def serve(engine: SearchEngine, sample_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Start `python -m service`'s uvicorn configuration in a thread (without its process-wide logging
    setup); yields a function of the settings that returns (server, thread, base URL)."""
    monkeypatch.setattr(service_main, "logging_config", lambda *args: None)
    started: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(**changes: Any) -> tuple[uvicorn.Server, threading.Thread, str]:
        settings = sample_settings.model_copy(update=changes)
        app = create_app(state=AppState(settings, engine.store, engine))
        # port 0: the system picks a free port as uvicorn binds it (no window for another process to take it)
        server = uvicorn.Server(service_main.server_config(app, settings, "127.0.0.1", 0))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        started.append((server, thread))
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        return server, thread, f"http://127.0.0.1:{port}"

    yield start
    for server, thread in started:
        server.should_exit = True
        thread.join(30)


def slow_search(
    base: str, pause_s: float, sent: threading.Event, out: dict[str, Any], finished: threading.Event | None = None
) -> None:
    """POST /search/json whose body arrives in two parts, `pause_s` apart (`finished` set after the pause)."""
    body = json.dumps({"catalogue": "grocery", "text": "oat milk", "options": {"limit": 3}}).encode()

    def parts() -> Iterator[bytes]:
        yield body[:12]
        sent.set()
        time.sleep(pause_s)
        if finished is not None:
            finished.set()
        yield body[12:]

    try:
        with httpx.Client(timeout=60) as client:
            out["response"] = client.post(
                f"{base}/search/json", content=parts(), headers={"content-type": "application/json"}
            )
    except httpx.HTTPError as exc:
        out["error"] = exc


def test_sigterm_lets_requests_in_flight_finish(serve: Any) -> None:
    server, thread, base = serve(shutdown_timeout_s=10)
    sent, out = threading.Event(), dict[str, Any]()
    client = threading.Thread(target=slow_search, args=(base, 1.5, sent, out))
    client.start()
    assert sent.wait(10)
    server.should_exit = True  # what uvicorn's SIGTERM (and SIGINT) handler does
    assert refuses_connections(base)  # no new connections while it drains
    client.join(30)
    assert "error" not in out, out
    assert out["response"].status_code == 200 and out["response"].json()["results"]
    thread.join(15)
    assert not thread.is_alive()


def test_shutdown_timeout_bounds_the_wait(serve: Any) -> None:
    server, thread, base = serve(shutdown_timeout_s=1)
    sent, finished, out = threading.Event(), threading.Event(), dict[str, Any]()
    client = threading.Thread(target=slow_search, args=(base, 6, sent, out, finished))
    client.start()
    assert sent.wait(10)
    server.should_exit = True
    thread.join(15)
    assert not thread.is_alive() and not finished.is_set()  # the server gave up on the request before it ended
    client.join(15)
    assert "error" in out or out["response"].status_code >= 500
