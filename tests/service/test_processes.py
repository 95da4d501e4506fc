"""The two commands as a user runs them: `python -m ingest`, then `python -m service` on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, SAMPLE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env_for(store: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QDRANT_")}
    return {**env, "QDRANT_PATH": str(store), "DEFAULT_CATALOGUE": "grocery"}


def start_service(env: dict[str, str], *, attempts: int = 3) -> tuple[subprocess.Popen[str], str]:
    """`python -m service` on a free loopback port, answering /healthz; tried again on another port when
    the one picked was taken between choosing it and the child binding it."""
    for _ in range(attempts):
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "--port", str(port)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    return process, base
            except httpx.TransportError:
                time.sleep(0.3)
        if process.poll() is None:
            process.kill()
            pytest.fail("the service did not answer /healthz within 180 s")
        output = process.communicate()[0]
        if "address already in use" not in output:
            pytest.fail(f"the service stopped at start:\n{output}")
    pytest.fail(f"no free port in {attempts} attempts")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    store = tmp_path_factory.mktemp("served") / "qdrant"
    ingest = subprocess.run(
        [sys.executable, "-m", "ingest", str(SAMPLE), "--catalogue", "grocery"],
        cwd=ROOT, env=env_for(store), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ingest.returncode == 0, ingest.stderr
    assert "new 81, updated 0, unchanged 0, rejected rows 0" in ingest.stdout
    process, base = start_service(env_for(store))
    try:
        # a request of the fixture's own, so that what the teardown checks does not hang on another test
        assert httpx.get(f"{base}/healthz", headers={"X-Request-ID": "processes-probe"}, timeout=10).is_success
        yield base, store
    finally:
        process.terminate()  # SIGTERM: a graceful shutdown
        output, _ = process.communicate(timeout=30)
    port = base.rsplit(":", 1)[1]
    assert f"serving at http://localhost:{port}/" in output and process.returncode == 0
    # Logs are JSON lines; uvicorn's access log carries each request's id.
    logged = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    access = {entry.get("request_id"): entry for entry in logged if entry["logger"] == "uvicorn.access"}
    assert access["processes-probe"]["status"] == 200 and access["processes-probe"]["path"] == "/healthz"
    assert any(entry["message"] == "Shutting down" for entry in logged)


def test_service_answers_search_over_real_http(served: tuple[str, Path]) -> None:
    base, _ = served
    photo = SAMPLE.parent / "images" / "Oatly-Natural-Oatghurt_Iconic.jpg"
    response = httpx.post(
        f"{base}/search",
        files={"image": (photo.name, photo.read_bytes(), "image/jpeg")},
        data={"limit": "5"},
        headers={"X-Request-ID": "processes-search"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == "processes-search"
    assert response.json()["results"][0]["product"]["title"] == "Oatly Natural Oatghurt"
    bad = httpx.post(f"{base}/search", files={"image": ("x.jpg", b"GIF89a-not-really", "image/jpeg")}, timeout=60)
    assert bad.status_code == 422 and "cannot be used" in bad.json()["detail"]
    assert httpx.get(f"{base}/", timeout=10).status_code == 200


def test_a_second_process_on_the_same_embedded_store_is_told_what_to_do(served: tuple[str, Path]) -> None:
    _, store = served
    for command in (["ingest", str(SAMPLE)], ["service", "--port", str(free_port())]):
        result = subprocess.run(
            [sys.executable, "-m", *command], cwd=ROOT, env=env_for(store), capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 2, result.stderr
        assert "in use by another process" in result.stderr and "QDRANT_URL" in result.stderr
        assert "Traceback" not in result.stderr
