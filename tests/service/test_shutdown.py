"""Slow hosts and stopped processes: a host that trickles a photo byte by byte cannot hold a fetch past its
deadline, nor the service past its shutdown bound; a service stopped by SIGTERM or killed with -9 during an
HTTP ingest says so afterwards (`interrupted`), leaves no upload behind, and the same file submitted again
ends with the same points as an ingest that was never interrupted."""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from ingest.sources import FetchCancelled, SourceError, UrlFetcher
from retrieval.settings import Settings
from retrieval.store import ProductStore
from tests.conftest import ROOT, SAMPLE
from tests.service.test_processes import env_for, start_service

PHOTOS = {"/p/1.jpg": "Anjou_Iconic.jpg", "/p/2.jpg": "Oatly-Oat-Milk_Iconic.jpg"}
SHUTDOWN_S = 3
MARGIN_S = 10  # closing the store and the interpreter's own exit, on a loaded 2-core machine


class Trickle:
    """A loopback image host: `stall` on, it sends the headers and then one byte every 0.2 s, for hours."""

    def __init__(self) -> None:
        self.stall = True
        self.active = 0
        self.lock = threading.Lock()
        self.port = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def make_handler(host: Trickle) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            body = (SAMPLE.parent / "images" / PHOTOS.get(self.path, "Anjou_Iconic.jpg")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not host.stall:
                self.wfile.write(body)
                return
            with host.lock:
                host.active += 1
            try:
                for byte in body:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:  # the client went away
                pass
            finally:
                with host.lock:
                    host.active -= 1

    return Handler


@pytest.fixture
def trickle() -> Iterator[Trickle]:
    host = Trickle()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make_handler(host))
    server.daemon_threads = True
    host.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield host
    server.shutdown()
    server.server_close()


def test_a_trickling_host_is_cut_off_at_the_fetch_deadline(trickle: Trickle) -> None:
    with UrlFetcher(allow_private=True, timeout_s=1.0, retries=3, backoff_s=0.01) as http_:
        started = time.monotonic()
        with pytest.raises(SourceError, match=r"ReadTimeout.*no answer within 1 s, URL_TIMEOUT_S"):
            http_.fetch(trickle.url("/p/1.jpg"))
        # the whole photo would take hours at this pace; per-read timeouts alone never fire
        assert time.monotonic() - started < 1.0 + MARGIN_S / 2


def test_a_cancelled_fetch_stops_at_once(trickle: Trickle) -> None:
    cancel = threading.Event()
    with UrlFetcher(allow_private=True, timeout_s=120, cancel=cancel) as http_:
        timer = threading.Timer(0.5, cancel.set)
        timer.start()
        started = time.monotonic()
        with pytest.raises(FetchCancelled):
            http_.fetch(trickle.url("/p/2.jpg"))
        assert time.monotonic() - started < 0.5 + MARGIN_S / 2


class Service:
    """`python -m service` on loopback over a store folder, as an operator runs it."""

    def __init__(self, store: Path) -> None:
        env = {
            **env_for(store),
            "DEFAULT_CATALOGUE": "shop",
            "ALLOW_PRIVATE_URLS": "true",
            "URL_TIMEOUT_S": "300",  # only the shutdown may stop the trickling fetch
            "URL_RETRIES": "0",
            "SHUTDOWN_TIMEOUT_S": str(SHUTDOWN_S),
        }
        self.process, self.base = start_service(env)

    def output(self) -> str:
        return self.process.communicate(timeout=60)[0] if self.process.stdout else ""

    def submit(self, feed: bytes) -> str:
        response = httpx.post(f"{self.base}/catalogues/shop/ingest", files={"file": ("feed.csv", feed)}, timeout=30)
        assert response.status_code == 202, response.text
        return str(response.json()["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        response = httpx.get(f"{self.base}/jobs/{job_id}", timeout=30)
        assert response.status_code == 200, response.text
        job: dict[str, Any] = response.json()
        return job

    def wait(self, job_id: str, statuses: tuple[str, ...], *, until: Any = None) -> dict[str, Any]:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["status"] in statuses and (until is None or until()):
                return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} never reached {statuses}: {self.job(job_id)}")


def points(store: Path) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Every stored point of catalogue `shop`: payload (less the write time) and vectors."""
    products = ProductStore.open(Settings(qdrant_path=store))
    try:
        found = list(products.points("shop", with_vectors=True))
    finally:
        products.close()
    out = {}
    for point in found:
        payload = {k: v for k, v in (point.payload or {}).items() if k != "ingested_at"}
        assert isinstance(point.vector, dict)
        out[str(point.id)] = (payload, dict(point.vector))
    return out


def test_sigterm_and_kill_during_an_http_ingest(tmp_path: Path, trickle: Trickle) -> None:
    feed = (
        "id,retailer,title,image\n"
        f"1,shop,Anjou pear,{trickle.url('/p/1.jpg')}\n"
        f"2,shop,Oat drink,{trickle.url('/p/2.jpg')}\n"
        "3,shop,Text only,\n"
    ).encode()
    store = tmp_path / "qdrant"
    uploads = tmp_path / "sources" / ".uploads"

    # SIGTERM while a photo trickles in: the process exits within the bound, the job is marked interrupted.
    first = Service(store)
    stopped = first.submit(feed)
    first.wait(stopped, ("running",), until=lambda: trickle.active > 0)
    began = time.monotonic()
    first.process.send_signal(signal.SIGTERM)
    output = first.output()
    assert time.monotonic() - began < SHUTDOWN_S + MARGIN_S, output
    assert first.process.returncode == 0, output
    assert "interrupted" in output and "Traceback" not in output

    # A new process reports that job as interrupted; kill -9 during a second try.
    second = Service(store)
    job = second.job(stopped)
    assert job["status"] == "interrupted" and "submit it again" in job["error"], job
    killed = second.submit(feed)
    second.wait(killed, ("running",), until=lambda: trickle.active > 0)
    assert any(uploads.iterdir())  # the upload waits for its job
    second.process.kill()
    second.output()

    # After the crash: the job says interrupted, the upload is gone, and submitting again finishes the work.
    third = Service(store)
    try:
        job = third.job(killed)
        assert job["status"] == "interrupted" and "was running" in job["error"], job
        assert not any(uploads.iterdir())
        trickle.stall = False
        done = third.wait(third.submit(feed), ("done", "failed"))
        assert done["status"] == "done" and (done["ingest"]["new"], done["ingest"]["images_embedded"]) == (3, 2), done
    finally:
        third.process.send_signal(signal.SIGTERM)
        third.output()
    assert third.process.returncode == 0

    # The same file ingested once, never interrupted, gives the same points (on the service's image runtime:
    # INFERENCE=auto runs ONNX Runtime in a service, torch bf16 in the command line).
    reference = tmp_path / "reference"
    (tmp_path / "feed.csv").write_bytes(feed)
    cli = subprocess.run(
        [sys.executable, "-m", "ingest", str(tmp_path / "feed.csv"), "--catalogue", "shop", "--no-progress"],
        cwd=ROOT, env={**env_for(reference), "ALLOW_PRIVATE_URLS": "true", "INFERENCE": "onnx"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    resumed, uninterrupted = points(store), points(reference)
    assert sorted(resumed) == sorted(uninterrupted) and len(resumed) == 3
    for point_id, (payload, vectors) in uninterrupted.items():
        assert resumed[point_id][0] == payload
        assert sorted(resumed[point_id][1]) == sorted(vectors)
        for name, vector in vectors.items():
            if isinstance(vector, list):
                np.testing.assert_allclose(np.asarray(resumed[point_id][1][name]), np.asarray(vector), atol=1e-6)
            else:  # the lexical sparse vector
                assert resumed[point_id][1][name] == vector
    assert os.listdir(uploads) == []
