"""The same ingest and search against a Qdrant server: runs only where QDRANT_URL points at one."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from PIL import Image

from ingest.pipeline import Ingestor
from retrieval.encoders import ImageEncoder, TextEncoder
from retrieval.search import SearchEngine
from retrieval.settings import Settings
from retrieval.store import ProductStore
from schemas.search import SearchFilters, SearchOptions
from tests.conftest import SAMPLE

pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(not os.environ.get("QDRANT_URL"), reason="no Qdrant server: set QDRANT_URL to run"),
]


def test_ingest_and_search_on_a_server(image_encoder: ImageEncoder, text_encoder: TextEncoder) -> None:
    settings = Settings(qdrant_url=os.environ["QDRANT_URL"], qdrant_api_key=os.environ.get("QDRANT_API_KEY"))
    store = ProductStore.open(settings)
    name = f"test-{uuid.uuid4().hex[:8]}"
    try:
        report = Ingestor(settings, store, image_encoder, text_encoder).run(SAMPLE, name, progress=False)
        assert report.new == 81 and store.count(name) == 81
        again = Ingestor(settings, store, image_encoder, text_encoder).run(SAMPLE, name, progress=False)
        assert again.unchanged == 81 and store.count(name) == 81
        engine = SearchEngine(store, image_encoder, text_encoder)
        photo = Path(SAMPLE.parent / "images" / "Arla-Standard-Milk_Iconic.jpg")
        with Image.open(photo) as image:
            fused = engine.search(name, image=image.convert("RGB"), text="milk", options=SearchOptions(limit=5))
        assert fused.results[0].product.title == "Arla Standard Milk"
        juice = engine.search(
            name, text="apple", filters=SearchFilters(category="Packages > Juice"), options=SearchOptions(limit=50)
        )
        assert {r.product.category_path for r in juice.results} == {"Packages > Juice"}
    finally:
        store.drop_catalogue(name)
        store.close()
