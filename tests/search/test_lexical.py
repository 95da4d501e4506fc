"""The lexical signal: tokens for words and codes, GTINs as the strongest evidence, the layout guard."""

from __future__ import annotations

from pathlib import Path

import pytest
from qdrant_client import QdrantClient, models

from ingest.pipeline import Ingestor
from retrieval.lexical import document_vector, query_terms, term_index, tokens
from retrieval.search import SearchEngine
from retrieval.settings import Settings
from retrieval.store import EncoderFingerprint, ProductStore, StoreError
from schemas.catalogue import CatalogueRecord
from schemas.search import SearchOptions
from tests.conftest import sample_rows, write_catalogue


def test_tokens_keep_codes_whole_joined_and_split() -> None:
    assert tokens("Sony DSC-W120P, 7.2 MP") == [
        "sony",
        "dsc-w120p",
        "dscw120p",
        "dsc",
        "w120p",
        "7.2",
        "72",
        "7",
        "2",
        "mp",
    ]
    assert tokens("Äpple Juice for the kids") == ["apple", "juice", "kids"]
    assert query_terms("oat milk 7310865004703") == ["oat", "milk", "7310865004703", "gtin:07310865004703"]


def test_document_weights_saturate_and_identifiers_weigh_more() -> None:
    record = CatalogueRecord.from_row(
        {"id": "1", "retailer": "r", "title": "milk milk milk", "mpn": "AB-12", "gtin": "7310865004703"}, line=2
    )
    assert record.gtin == "07310865004703"
    vector = document_vector(record)
    assert vector is not None
    weights = dict(zip(vector.indices, vector.values, strict=True))
    assert weights[term_index("milk")] < 3  # three occurrences, saturated below 3x one occurrence
    assert weights[term_index("gtin:07310865004703")] > weights[term_index("ab-12")] > weights[term_index("milk")] / 3


def test_bad_gtin_is_rejected() -> None:
    with pytest.raises(ValueError, match="gtin must be 8, 12, 13 or 14 digits"):
        CatalogueRecord.from_row({"id": "1", "retailer": "r", "title": "t", "gtin": "12345"}, line=2)


def test_an_identical_gtin_finds_the_product_among_lookalikes(
    tmp_path: Path, ingestor: Ingestor, store: ProductStore, catalogue_name: str
) -> None:
    rows = [r for r in sample_rows(50) if r["brand"] == "Arla"]  # near-identical Arla cartons
    assert len(rows) >= 6
    for i, row in enumerate(rows):
        row["gtin"] = f"731086500{i:04d}"
    ingestor.run(write_catalogue(tmp_path / "feed", rows), catalogue_name, progress=False)
    engine = SearchEngine(store, ingestor.image_encoder, ingestor.text_encoder)
    target = rows[3]
    response = engine.search(catalogue_name, text=f"arla milk {target['gtin']}", options=SearchOptions(limit=3))
    assert response.results[0].id == target["id"]
    assert response.results[0].product.gtin == target["gtin"].zfill(14)
    dense_only = engine.search(
        catalogue_name, text=f"arla milk {target['gtin']}", options=SearchOptions(limit=3, lexical=False)
    )
    assert dense_only.modes == ["text"]


def test_a_collection_of_an_older_layout_is_refused_with_what_to_do(tmp_path: Path) -> None:
    # Layout 1 existed only in qdrant-client's local mode: an old folder written by the client directly.
    old = EncoderFingerprint("timm:x/y", 4, "sentence-transformers:z", 3).as_metadata() | {"layout_version": 1}
    writer = QdrantClient(path=str(tmp_path / "old-store"))
    writer.create_collection(
        "old", vectors_config={"text": models.VectorParams(size=3, distance=models.Distance.COSINE)}, metadata=old
    )
    writer.close()
    store = ProductStore.open(Settings(qdrant_path=tmp_path / "old-store"))
    with pytest.raises(StoreError, match="layout 1, this version needs 3: ingest the catalogue again"):
        store.fingerprint("old")
    store.close()
