"""Shared fixtures: the real offline encoders, an embedded store in a temp folder, the sample catalogue."""

from __future__ import annotations

import csv
import io
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from bench.evalset import EvalSet, load_set
from bench.prepare import write_text_pairs_set
from bench.quality import ingested
from ingest.pipeline import Ingestor
from retrieval.encoders import ImageEncoder, TextEncoder, load_image_encoder, load_text_encoder
from retrieval.search import SearchEngine
from retrieval.settings import DEFAULT_IMAGE_MODEL, DEFAULT_TEXT_MODEL, Settings
from retrieval.store import ProductStore
from schemas.report import IngestReport
from service.app import create_app
from service.state import AppState

# Reading package text (OCR) costs a fraction of a second a photo: the suite runs without it, and the tests
# of reading (tests/search/test_ocr.py) turn it on in their own settings. Child processes inherit it.
os.environ.setdefault("OCR", "off")

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample" / "grocery" / "catalogue.csv"
SHARED_DATA = ROOT.parent / "shared" / "data"
GROCERY = SHARED_DATA / "grocery" / "dataset"


def sample_rows(n: int) -> list[dict[str, str]]:
    with SAMPLE.open(encoding="utf-8") as f:
        return list(csv.DictReader(f))[:n]


def catalogue_csv(rows: list[dict[str, str]]) -> bytes:
    """Rows as the bytes of a CSV catalogue, the first row's keys as its header (what a client uploads)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode()


def write_catalogue(folder: Path, rows: list[dict[str, str]]) -> Path:
    """A catalogue in `folder` whose relative image refs point at copies of the sample's photos."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    shutil.copytree(SAMPLE.parent / "images", folder / "images", dirs_exist_ok=True)  # both shops' photos
    path = folder / "catalogue.csv"
    columns = sorted({key for row in rows for key in row}, key=lambda c: (c not in ("id", "retailer"), c))
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="session")
def image_encoder(tmp_path_factory: pytest.TempPathFactory) -> ImageEncoder:
    """The image encoder as ingest loads it by default (INFERENCE=auto: torch in bf16 where the CPU computes it,
    else the backbone on ONNX Runtime; the service's own choice is tested in tests/search/test_photo_guard.py)."""
    return load_image_encoder(DEFAULT_IMAGE_MODEL, inference="auto", onnx_cache=tmp_path_factory.mktemp("onnx"))


@pytest.fixture(scope="session")
def text_encoder() -> TextEncoder:
    return load_text_encoder(DEFAULT_TEXT_MODEL)


# The search, matching and store suites run on both embedded engines: the same calls, the same answers
# expected (qdrant-client's congruence tests are the model). Other modules use the default engine.
BOTH_ENGINES = (
    "tests.search.test_search",
    "tests.search.test_lexical",
    "tests.match.test_calibration",
    "tests.match.test_batch",
    "tests.ingest.test_ingest",
    "tests.ingest.test_incremental",
)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.module.__name__ in BOTH_ENGINES and "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", ["local", "edge"], indirect=True, scope="session")


@pytest.fixture(scope="session")
def backend(request: pytest.FixtureRequest) -> str:
    """The embedded engine of the session's sample store (the default engine, edge, unless a module runs on
    both)."""
    return str(getattr(request, "param", "edge"))


@pytest.fixture(scope="session")
def sample_store_path(tmp_path_factory: pytest.TempPathFactory, backend: str) -> Path:
    return tmp_path_factory.mktemp(f"sample-store-{backend}")


@pytest.fixture(scope="session")
def sample_settings(sample_store_path: Path, backend: str) -> Settings:
    return Settings(qdrant_path=sample_store_path, default_catalogue="grocery", store_backend=backend)


@pytest.fixture(scope="session")
def sample_store(sample_settings: Settings) -> Iterator[ProductStore]:
    """One embedded store for the whole session, holding the sample catalogue as `grocery` (read-only use)."""
    store = ProductStore.open(sample_settings)
    yield store
    store.close()


@pytest.fixture(scope="session")
def sample_report(
    sample_settings: Settings, sample_store: ProductStore, image_encoder: ImageEncoder, text_encoder: TextEncoder
) -> IngestReport:
    return Ingestor(sample_settings, sample_store, image_encoder, text_encoder).run(SAMPLE, "grocery", progress=False)


@pytest.fixture(scope="session")
def engine(
    sample_store: ProductStore, sample_report: IngestReport, image_encoder: ImageEncoder, text_encoder: TextEncoder
) -> SearchEngine:
    return SearchEngine(sample_store, image_encoder, text_encoder)


@pytest.fixture
def store(tmp_path: Path, backend: str) -> Iterator[ProductStore]:
    """A fresh embedded store per test, for tests that write."""
    s = ProductStore.open(Settings(qdrant_path=tmp_path / "qdrant", store_backend=backend))
    yield s
    s.close()


@pytest.fixture
def ingestor(
    store: ProductStore, image_encoder: ImageEncoder, text_encoder: TextEncoder, tmp_path: Path, backend: str
) -> Ingestor:
    settings = Settings(qdrant_path=tmp_path / "qdrant", store_backend=backend)
    return Ingestor(settings, store, image_encoder, text_encoder)


@pytest.fixture
def catalogue_name() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


SHELF = SAMPLE.parent / "corner-store.csv"


def other_shop_rows(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """The sample's second shop's own listings of `rows` (a shelf photo, a kind-first title, no description),
    as retailer `other-shop` with ids `o-<id>`: the same products, listed differently, as shops do."""
    with SHELF.open(encoding="utf-8") as f:
        shelf = {row["id"].removeprefix("c-"): row for row in csv.DictReader(f)}
    return [
        {
            **shelf[r["id"]],
            "retailer": "other-shop",
            "id": f"o-{r['id']}",
            **({"price": r["price"]} if "price" in r else {}),
        }
        for r in rows
    ]


@pytest.fixture(scope="session")
def two_shops(engine: SearchEngine, sample_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The first 30 sample products in two shops: the second (`other-shop`) lists them its own way (a shelf
    photo, a kind-first title, no description: `other_shop_rows`), with its own ids (`o-<id>`) and prices."""
    rows = sample_rows(30)
    for i, row in enumerate(rows):
        row["price"] = str(10 + i)
    other = other_shop_rows([{**r, "price": str(float(r["price"]) + 0.5)} for r in rows])
    path = write_catalogue(tmp_path_factory.mktemp("two-shops"), rows + other)
    ingestor = Ingestor(sample_settings, engine.store, engine.image_encoder, engine.text_encoder)
    report = ingestor.run(path, "two-shops", progress=False)
    assert report.new == 60
    return "two-shops"


def two_currency_rows(n: int = 30) -> list[dict[str, str]]:
    """The first `n` sample products priced in EUR by `hemkop`, and the second shop's own listings of them
    (`other-shop`, ids `o-<id>`) priced in SEK: the same products at prices about 11 times higher in number."""
    rows = [{**r, "price": str(10 + i), "currency": "EUR"} for i, r in enumerate(sample_rows(n))]
    other = other_shop_rows(rows)
    for i, row in enumerate(other):
        row.update(price=f"{(10 + i) * 11.2:.0f}", currency="SEK")
    return rows + other


@pytest.fixture(scope="session")
def two_currencies(engine: SearchEngine, sample_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Two shops selling the same 30 sample products in two currencies (`two_currency_rows`): the default match
    model reads the price ratio as a difference and decides none of the true pairs 'match'; a catalogue's own
    model learns from labels that here it is not."""
    path = write_catalogue(tmp_path_factory.mktemp("two-currencies"), two_currency_rows())
    ingestor = Ingestor(sample_settings, engine.store, engine.image_encoder, engine.text_encoder)
    assert ingestor.run(path, "two-currencies", progress=False).new == 60
    return "two-currencies"


@pytest.fixture
def cli_shops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str) -> Path:
    """The CLI's environment pointed at a fresh store holding catalogue `shops`: 12 sample products in
    `hemkop` and the second shop's listings of them (ids `o-<id>`) in `other-shop`. Returns the test's folder."""
    monkeypatch.setenv("QDRANT_PATH", str(tmp_path / "store"))
    monkeypatch.setenv("STORE_BACKEND", backend)
    for key in ("QDRANT_URL", "IMAGE_MODEL", "TEXT_MODEL"):
        monkeypatch.delenv(key, raising=False)
    from ingest.__main__ import main as ingest_main

    rows = sample_rows(12)
    twins = other_shop_rows(rows)
    assert ingest_main([str(write_catalogue(tmp_path / "feed", rows + twins)), "--catalogue", "shops"]) == 0
    return tmp_path


def wait_for_job(client: TestClient, job_id: str, *, seconds: float = 60) -> dict[str, Any]:
    """Poll `GET /jobs/{id}` until the job is done, failed or interrupted."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(f"/jobs/{job_id}").json()
        if job["status"] in ("done", "failed", "interrupted"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish in {seconds:g} s")


@pytest.fixture(scope="module")
def client(engine: SearchEngine, sample_settings: Settings, request: pytest.FixtureRequest) -> Iterator[TestClient]:
    """The app over the session's sample store and encoders, its lifespan run; a module changes the
    service's settings with a `SERVICE_SETTINGS` dict. A 500 comes back as a response, as a client sees it."""
    settings = sample_settings.model_copy(update=getattr(request.module, "SERVICE_SETTINGS", {}))
    state = AppState(settings, engine.store, engine)
    with TestClient(
        create_app(settings, state=state), raise_server_exceptions=False, base_url="http://localhost"
    ) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def abt_buy_valid(
    tmp_path_factory: pytest.TempPathFactory, image_encoder: ImageEncoder, text_encoder: TextEncoder
) -> Iterator[tuple[EvalSet, SearchEngine]]:
    """Abt-Buy's valid split (1,422 listings of two shops) ingested once for the session: the match model's and
    the cross-encoder's tests fit on it; the quality guards judge on the test split."""
    folder = tmp_path_factory.mktemp("abt-valid")
    write_text_pairs_set(SHARED_DATA / "text-pairs" / "abt-buy", folder, left="abt", right="buy", split="valid")
    evalset = load_set(folder)
    with ingested(evalset, image_encoder, text_encoder) as (engine, _):
        yield evalset, engine
