"""`STORE_BACKEND=edge`: the embedded store on qdrant-edge-py (the Qdrant engine in-process), as a
`StoreBackend`. One catalogue is one `EdgeStore` in `<QDRANT_PATH>/<catalogue>/`; the root folder is
locked for the process (a second process gets StoreBusy at once)."""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qdrant_client import models

from retrieval.store.backend import PointId, Selection
from retrieval.store.edge import EdgeStore, FolderLock
from retrieval.store.errors import CatalogueNotFound, StoreError
from retrieval.store.layout import SHARD_DIR, EncoderFingerprint, StorageLayout, rescored


class EdgeBackend:
    """The store port on one EdgeStore per catalogue folder. The engine applies a write before it returns
    and counts exactly."""

    embedded = True  # in-process and not safe for concurrent calls: ProductStore serialises them

    def __init__(self, root: Path, *, layout: StorageLayout | None = None) -> None:
        """`layout`: how a new catalogue's shard keeps its vectors (QDRANT_ON_DISK, QDRANT_QUANTIZATION; the
        server-only parts of it do not apply here)."""
        self.root = root
        self._layout = layout or StorageLayout()
        root.mkdir(parents=True, exist_ok=True)
        self._lock = FolderLock(root)
        self._lock.acquire()  # EdgeStoreBusy (a StoreBusy) when another process serves this folder
        self._stores: dict[str, EdgeStore] = {}

    def close(self) -> None:
        for store in self._stores.values():
            store.close()
        self._stores.clear()
        self._lock.release()

    # -- collections -------------------------------------------------------------------------------------

    def _folder(self, name: str) -> Path:
        return self.root / name

    def collection_exists(self, name: str) -> bool:
        return (self._folder(name) / SHARD_DIR).is_dir()

    def _store(self, name: str) -> EdgeStore:
        if name not in self._stores:
            if not self.collection_exists(name):
                raise CatalogueNotFound(name, self.collection_names())
            self._stores[name] = EdgeStore.open(self._folder(name))
        return self._stores[name]

    def collection_names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if (p / SHARD_DIR).is_dir())

    def collection_metadata(self, name: str) -> dict[str, Any]:
        return self._store(name).metadata()

    def create_collection(
        self, name: str, layout: EncoderFingerprint, *, metadata: Mapping[str, Any], lexical: bool = True
    ) -> None:
        """The layout's vectors (`edge_config`); an edge shard always has the sparse `lexical` vector, which a
        collection that does not use it leaves empty."""
        if self.collection_exists(name):
            raise StoreError(f"catalogue {name!r} already exists")
        store = EdgeStore.open(
            self._folder(name),
            image_dim=layout.image_dim,
            text_dim=layout.text_dim,
            quantization=self._layout.quantization,
            on_disk=self._layout.on_disk,
        )
        self._stores[name] = store
        if metadata:
            store.update_metadata(metadata)

    def delete_collection(self, name: str) -> None:
        """Close the catalogue's shard and remove its folder."""
        store = self._stores.pop(name, None)
        if store is not None:
            store.close()
        if self.collection_exists(name):
            shutil.rmtree(self._folder(name))

    def create_payload_indexes(self, name: str, indexes: Mapping[str, models.PayloadSchemaType]) -> None:
        self._store(name).ensure_payload_indexes(indexes)

    def update_metadata(self, name: str, values: Mapping[str, Any]) -> None:
        if values:
            self._store(name).update_metadata(values)

    # -- points ------------------------------------------------------------------------------------------

    def upsert(self, name: str, points: Sequence[models.PointStruct]) -> None:
        self._store(name).upsert(points)

    def update_vectors(self, name: str, points: Sequence[models.PointVectors]) -> None:
        self._store(name).update_vectors(points)

    def delete_vectors(self, name: str, vectors: Sequence[str], ids: Sequence[PointId]) -> None:
        self._store(name).delete_vectors(vectors, ids)

    def delete(self, name: str, ids: Sequence[PointId]) -> None:
        self._store(name).delete(ids)

    def retrieve(
        self, name: str, ids: Sequence[PointId], *, with_payload: Selection, with_vectors: Selection
    ) -> list[models.Record]:
        return self._store(name).retrieve(ids, with_payload=with_payload, with_vectors=with_vectors)

    def scroll(
        self,
        name: str,
        *,
        scroll_filter: models.Filter | None,
        limit: int,
        offset: PointId | None,
        with_payload: Selection,
        with_vectors: Selection,
    ) -> tuple[list[models.Record], PointId | None]:
        return self._store(name).scroll(
            scroll_filter=scroll_filter,
            limit=limit,
            offset=offset,
            with_payload=with_payload,
            with_vectors=with_vectors,
        )

    def count(self, name: str) -> int:
        return self._store(name).count()

    def facet(self, name: str, key: str, *, limit: int) -> dict[str, int]:
        return self._store(name).facet(key, limit=limit)

    def query_batch(self, name: str, requests: Sequence[models.QueryRequest]) -> list[list[models.ScoredPoint]]:
        store = self._store(name)
        if store.quantized:  # whatever the settings say now: the shard was created quantized
            requests = [rescored(request, self._layout.rescoring()) for request in requests]
        return store.query_batch(requests)

    def compact(self, name: str) -> bool:
        """A quantized shard's new or rewritten points sit in an appendable segment, scored on their original
        vectors, until `optimize()` builds their int8 copies (its cost: `edge_config`). Plain shards are left
        alone: there it would build HNSW (17 minutes at 100k, and slower filtered queries)."""
        store = self._store(name)
        return store.optimize() if store.quantized else False
