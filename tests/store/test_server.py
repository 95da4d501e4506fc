"""The same ingest and search against a Qdrant server: runs only where QDRANT_URL points at one."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from PIL import Image
from qdrant_client import QdrantClient, models

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


def test_a_quantized_sharded_layout_on_a_server(image_encoder: ImageEncoder, text_encoder: TextEncoder) -> None:
    """QDRANT_SHARDS, QDRANT_ON_DISK and QDRANT_QUANTIZATION reach the server's collection, and a fused
    query (rescored on the original vectors) still finds the product."""
    settings = Settings(
        qdrant_url=os.environ["QDRANT_URL"],
        qdrant_api_key=os.environ.get("QDRANT_API_KEY"),
        qdrant_shards=2,
        qdrant_on_disk=True,
        qdrant_quantization="int8",
    )
    store = ProductStore.open(settings)
    name = f"test-{uuid.uuid4().hex[:8]}"
    try:
        Ingestor(settings, store, image_encoder, text_encoder).run(SAMPLE, name, progress=False)
        client = QdrantClient(url=os.environ["QDRANT_URL"], api_key=os.environ.get("QDRANT_API_KEY"))
        config = client.get_collection(name).config
        assert config.params.shard_number == 2 and config.params.on_disk_payload is True
        assert isinstance(config.quantization_config, models.ScalarQuantization)
        engine = SearchEngine(store, image_encoder, text_encoder)
        fused = engine.search(name, text="Arla Standard Milk", options=SearchOptions(limit=5))
        assert fused.results[0].product.title == "Arla Standard Milk"
    finally:
        store.drop_catalogue(name)
        store.close()
