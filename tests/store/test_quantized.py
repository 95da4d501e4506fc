"""QDRANT_QUANTIZATION=int8 and QDRANT_ON_DISK=true on the embedded edge engine: a new catalogue's shard
keeps int8 copies of its dense vectors in RAM and the originals memory-mapped, ingest builds the quantized
segments at the end of each run, and searches rescore with the originals, so they answer as an unquantized
store does (the million-product figures: docs/BENCHMARKS.md, "A million products")."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from ingest.pipeline import Ingestor
from retrieval.adapt.heads import Adapters, Head
from retrieval.encoders import ImageEncoder, TextEncoder
from retrieval.search import SearchEngine
from retrieval.settings import Settings
from retrieval.store import ProductStore, StoreError
from retrieval.store.edge import EdgeStore
from schemas.adapters import AdapterRecord
from schemas.search import SearchOptions
from tests.conftest import SAMPLE, sample_rows, write_catalogue

QUERIES = SAMPLE.parent / "queries"


@pytest.fixture(scope="module")
def quantized(
    tmp_path_factory: pytest.TempPathFactory, image_encoder: ImageEncoder, text_encoder: TextEncoder
) -> Iterator[tuple[SearchEngine, Ingestor, Path]]:
    root = tmp_path_factory.mktemp("int8") / "store"
    settings = Settings(qdrant_path=root, qdrant_quantization="int8", qdrant_on_disk=True)
    store = ProductStore.open(settings)
    try:
        ingestor = Ingestor(settings, store, image_encoder, text_encoder)
        assert ingestor.run(SAMPLE, "grocery", progress=False).new == 81
        yield SearchEngine(store, image_encoder, text_encoder), ingestor, root
    finally:
        store.close()


def test_a_quantized_catalogue_is_built_and_answers_like_an_unquantized_one(
    quantized: tuple[SearchEngine, Ingestor, Path], engine: SearchEngine
) -> None:
    ours, _, root = quantized
    config = (root / "grocery" / "shard" / "edge_config.json").read_text()
    assert '"int8"' in config and '"cold"' in config  # int8 copies, originals not cached
    options = SearchOptions(limit=10)
    for photo_file, text in [
        ("Arla-Standard-Milk_001.jpg", "Arla standard milk"),
        ("Oatly-Natural-Oatghurt_001.jpg", None),
        ("Granny-Smith_001.jpg", "green apple"),
        (None, "oat milk"),
    ]:
        photo = None
        if photo_file:
            with Image.open(QUERIES / photo_file) as opened:
                photo = opened.convert("RGB")
        got = ours.search("grocery", image=photo, text=text, options=options)
        want = engine.search("grocery", image=photo, text=text, options=options)  # the session's plain store
        assert [r.id for r in got.results[:3]] == [r.id for r in want.results[:3]], (photo_file, text)
        plain = {r.id: r for r in want.results}
        shared = [r for r in got.results if r.id in plain]
        assert len(shared) >= 8
        for result in shared:  # rescored with the original vectors: the scores are the exact ones
            for modality in ("image", "text"):
                a, b = getattr(result.scores, modality), getattr(plain[result.id].scores, modality)
                assert (a is None and b is None) or abs(a - b) < 5e-3, (result.id, modality, a, b)


def test_every_ingest_leaves_its_new_points_in_quantized_segments(
    quantized: tuple[SearchEngine, Ingestor, Path], tmp_path: Path
) -> None:
    ours, ingestor, root = quantized
    rows = [{**r, "retailer": "late-shop", "id": f"late-{r['id']}"} for r in sample_rows(5)]
    assert ingestor.run(write_catalogue(tmp_path, rows), "grocery", progress=False).new == 5
    ours.store.close()  # to read the shard directly; the module's store is not used after this test
    with EdgeStore.open(root / "grocery") as shard:
        assert shard.quantized and shard.count() == 86
        # The run ended by building the quantized segments, so the optimizers find nothing left to do (the
        # 5 new points were written to an appendable, unquantized segment first).
        assert shard.optimize() is False


def test_switching_a_head_leaves_its_rewritten_twins_in_quantized_segments(
    tmp_path: Path, image_encoder: ImageEncoder, text_encoder: TextEncoder
) -> None:
    root = tmp_path / "store"
    settings = Settings(qdrant_path=root, qdrant_quantization="int8", qdrant_on_disk=True)
    with ProductStore.open(settings) as store:
        ingestor = Ingestor(settings, store, image_encoder, text_encoder)
        assert ingestor.run(write_catalogue(tmp_path / "feed", sample_rows(10)), "few", progress=False).new == 10
        dim = text_encoder.dim
        head = Head("linear", {"weight": np.eye(dim, dtype=np.float32) * 2.0, "bias": np.zeros(dim, np.float32)})
        record = AdapterRecord(
            catalogue="few", modality="text", version=1, method="supervised", kind="linear", condition="product",
            encoder=text_encoder.name, dim=dim, created=datetime.now(UTC), examples=0,
        )  # fmt: skip
        adapters = Adapters(store)
        saved = adapters.save(record, head)
        assert adapters.activate("few", "text", saved.version) == 10  # every point's text twin rewritten
    with EdgeStore.open(root / "few") as shard:
        assert shard.optimize() is False  # the switch ended by building the rewritten points' int8 copies


def test_quantization_is_refused_where_no_engine_can_keep_it(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="QDRANT_QUANTIZATION need the edge engine"):
        Settings(qdrant_path=tmp_path, store_backend="local", qdrant_quantization="int8")
    local = tmp_path / "local"
    ProductStore.open(Settings(qdrant_path=local, store_backend="local")).close()
    with pytest.raises(StoreError, match="local mode"):  # an existing local-mode folder, opened by `auto`
        ProductStore.open(Settings(qdrant_path=local, qdrant_on_disk=True))
