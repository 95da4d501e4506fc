"""`STORE_BACKEND=edge`: the embedded store on qdrant-edge-py (the Qdrant engine in-process), behind the
part of qdrant-client's interface this project calls, so `ProductStore`, the query code and the ingest
pipeline run on it unchanged. One catalogue is one `EdgeStore` in `<QDRANT_PATH>/<catalogue>/`; the
root folder is locked for the process (a second process gets StoreBusy at once)."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qdrant_client import models
from qdrant_client.http.models import QueryResponse

from retrieval.store.edge import EdgeStore, FolderLock
from retrieval.store.errors import CatalogueNotFound, StoreError
from retrieval.store.layout import IMAGE_VECTOR, SHARD_DIR, TEXT_VECTOR


@dataclass
class _Config:
    metadata: dict[str, Any]


@dataclass
class _CollectionInfo:
    config: _Config


@dataclass
class _Named:
    name: str


@dataclass
class _Collections:
    collections: list[_Named]


@dataclass
class _Count:
    count: int


@dataclass
class _Hit:
    value: str
    count: int


@dataclass
class _Facets:
    hits: list[_Hit] = field(default_factory=list)


class EdgeClient:
    """The qdrant-client calls of this project, on one EdgeStore per catalogue folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._lock = FolderLock(root)
        self._lock.acquire()  # EdgeStoreBusy (a StoreBusy) when another process serves this folder
        self._stores: dict[str, EdgeStore] = {}
        self.init_options = {"path": str(root)}  # read by is_embedded: serialise calls like local mode

    def close(self) -> None:
        for store in self._stores.values():
            store.close()
        self._stores.clear()
        self._lock.release()

    # -- collections -------------------------------------------------------------------------------------

    def _folder(self, name: str) -> Path:
        return self.root / name

    def collection_exists(self, collection_name: str) -> bool:
        return (self._folder(collection_name) / SHARD_DIR).is_dir()

    def _store(self, name: str) -> EdgeStore:
        if name not in self._stores:
            if not self.collection_exists(name):
                raise CatalogueNotFound(name, [c.name for c in self.get_collections().collections])
            self._stores[name] = EdgeStore.open(self._folder(name))
        return self._stores[name]

    def get_collections(self) -> _Collections:
        names = sorted(p.name for p in self.root.iterdir() if (p / SHARD_DIR).is_dir())
        return _Collections([_Named(n) for n in names])

    def get_collection(self, collection_name: str) -> _CollectionInfo:
        return _CollectionInfo(_Config(self._store(collection_name).metadata()))

    def create_collection(
        self,
        collection_name: str,
        vectors_config: dict[str, models.VectorParams],
        sparse_vectors_config: Any = None,
        metadata: dict[str, Any] | None = None,
    ) -> bool:
        """Our layout only: the `image` multivector and `text` sizes are taken from `vectors_config`."""
        if self.collection_exists(collection_name):
            raise StoreError(f"catalogue {collection_name!r} already exists")
        store = EdgeStore.open(
            self._folder(collection_name),
            image_dim=vectors_config[IMAGE_VECTOR].size,
            text_dim=vectors_config[TEXT_VECTOR].size,
        )
        self._stores[collection_name] = store
        if metadata:
            store.update_metadata(metadata)
        return True

    def delete_collection(self, collection_name: str) -> bool:
        """Close the catalogue's shard and remove its folder (False when there was none)."""
        store = self._stores.pop(collection_name, None)
        if store is not None:
            store.close()
        if not self.collection_exists(collection_name):
            return False
        shutil.rmtree(self._folder(collection_name))
        return True

    def create_payload_index(
        self, collection_name: str, field_name: str, field_schema: models.PayloadSchemaType
    ) -> None:
        self._store(collection_name).ensure_payload_indexes({field_name: field_schema})

    def update_collection(self, collection_name: str, metadata: dict[str, Any] | None = None) -> bool:
        if metadata:
            self._store(collection_name).update_metadata(metadata)
        return True

    # -- points ------------------------------------------------------------------------------------------

    # The edge engine applies a write before it returns: every write is a `wait=True` write.

    def upsert(self, collection_name: str, points: Sequence[models.PointStruct], wait: bool = True) -> None:
        self._store(collection_name).upsert(points)

    def update_vectors(self, collection_name: str, points: Sequence[models.PointVectors], wait: bool = True) -> None:
        self._store(collection_name).update_vectors(points)

    def delete(self, collection_name: str, points_selector: models.PointIdsList, wait: bool = True) -> None:
        self._store(collection_name).delete([str(p) if not isinstance(p, int) else p for p in points_selector.points])

    def retrieve(
        self,
        collection_name: str,
        ids: Sequence[Any],
        with_payload: bool | Sequence[str] = True,
        with_vectors: bool | Sequence[str] = False,
    ) -> list[models.Record]:
        return self._store(collection_name).retrieve(ids, with_payload=with_payload, with_vectors=with_vectors)

    def scroll(
        self,
        collection_name: str,
        scroll_filter: models.Filter | None = None,
        limit: int = 10,
        offset: Any = None,
        with_payload: bool | Sequence[str] = True,
        with_vectors: bool | Sequence[str] = False,
    ) -> tuple[list[models.Record], Any]:
        return self._store(collection_name).scroll(
            scroll_filter=scroll_filter,
            limit=limit,
            offset=offset,
            with_payload=with_payload,
            with_vectors=with_vectors,
        )

    def count(self, collection_name: str, count_filter: models.Filter | None = None, exact: bool = True) -> _Count:
        """Always exact on this engine (`exact` is accepted for the client's signature)."""
        return _Count(self._store(collection_name).count(count_filter))

    def facet(self, collection_name: str, key: str, limit: int = 10, exact: bool = True) -> _Facets:
        """Always exact on this engine (`exact` is accepted for the client's signature)."""
        counts = self._store(collection_name).facet(key, limit=limit)
        return _Facets([_Hit(value, n) for value, n in counts.items()])

    def query_points(
        self,
        collection_name: str,
        query: Any = None,
        using: str | None = None,
        prefetch: Any = None,
        query_filter: models.Filter | None = None,
        limit: int = 10,
        offset: int | None = None,
        score_threshold: float | None = None,
        with_payload: bool | Sequence[str] = True,
        with_vectors: bool | Sequence[str] = False,
        search_params: models.SearchParams | None = None,
    ) -> QueryResponse:
        request = models.QueryRequest(
            params=search_params,
            prefetch=prefetch,
            query=query,
            using=using,
            filter=query_filter,
            limit=limit,
            offset=offset,
            score_threshold=score_threshold,
            with_payload=with_payload,
            with_vector=with_vectors,
        )
        return QueryResponse(points=self._store(collection_name).query(request))

    def query_batch_points(self, collection_name: str, requests: Sequence[models.QueryRequest]) -> list[QueryResponse]:
        return [QueryResponse(points=p) for p in self._store(collection_name).query_batch(requests)]
