"""`ProductStore.delete_vectors` on both embedded engines: a point loses the named vector only (what an
image tail's activation does to a product none of whose photos can be read again)."""

from __future__ import annotations

from pathlib import Path

import pytest
from qdrant_client import models

from retrieval.records import point_id
from retrieval.settings import Settings
from retrieval.store import ProductStore
from retrieval.store.layout import EncoderFingerprint


@pytest.mark.parametrize("engine", ["local", "edge"])
def test_delete_vectors_removes_one_named_vector_and_keeps_the_rest(tmp_path: Path, engine: str) -> None:
    store = ProductStore.open(Settings(qdrant_path=tmp_path / "q", store_backend=engine))
    try:
        store.ensure_catalogue("c", EncoderFingerprint("img", 4, "txt", 3))
        ids = [point_id("shop", str(i)) for i in range(3)]
        photo, twin = [[1.0, 0.0, 0.0, 0.0]], [[0.0, 1.0, 0.0, 0.0]]
        store.upsert(
            "c",
            [
                models.PointStruct(id=i, vector={"image": photo, "image_adapted": twin}, payload={"n": n})
                for n, i in enumerate(ids)
            ],
        )
        store.delete_vectors("c", ["image_adapted"], ids[:2])
        store.delete_vectors("c", ["image_adapted"], [])  # nothing asked: nothing done
        points = {str(p.id): p for p in store.retrieve("c", ids, with_vectors=True)}
        for n, i in enumerate(ids):
            stored = points[i].vector
            vectors = stored if isinstance(stored, dict) else {}
            assert vectors.get("image") == photo and (points[i].payload or {}) == {"n": n}
            assert ("image_adapted" in vectors) == (n == 2)
    finally:
        store.close()
