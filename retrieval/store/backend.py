"""The store port: `StoreBackend`, the calls `ProductStore` makes of an engine, and `QdrantBackend`, its
adapter over qdrant-client (a Qdrant server, or the client's embedded local mode). The edge engine's
adapter is `edge_backend.EdgeBackend`. Collections are made from the one layout spec (`layout.py`), so both
engines hold the same named vectors whichever wrote them.

A port of our own rather than qdrant-client's `QdrantBase`: that base has some seventy methods, most of
which the project never calls and the edge engine cannot answer; this protocol is what an engine must do
for the product, and mypy checks both adapters against it."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from qdrant_client import QdrantClient, models

from retrieval.store.layout import (
    EncoderFingerprint,
    StorageLayout,
    layout_sparse,
    layout_vectors,
    rescored,
)

PointId = str | int
Selection = bool | Sequence[str]


class StoreBackend(Protocol):
    """One engine's collections and points. Writes are applied before a call returns; counts and facets
    are exact."""

    @property
    def embedded(self) -> bool:
        """True when the engine runs in this process and is not safe for concurrent calls (ProductStore
        then serialises every call)."""
        ...

    def close(self) -> None: ...

    def collection_names(self) -> list[str]: ...

    def collection_exists(self, name: str) -> bool: ...

    def collection_metadata(self, name: str) -> dict[str, Any]: ...

    def create_collection(
        self, name: str, layout: EncoderFingerprint, *, metadata: Mapping[str, Any], lexical: bool = True
    ) -> None:
        """A collection with the layout's dense vectors, and its sparse ones when `lexical`."""
        ...

    def delete_collection(self, name: str) -> None: ...

    def create_payload_indexes(self, name: str, indexes: Mapping[str, models.PayloadSchemaType]) -> None: ...

    def update_metadata(self, name: str, values: Mapping[str, Any]) -> None:
        """Set top-level keys (merged; a key to drop is written as None)."""
        ...

    def upsert(self, name: str, points: Sequence[models.PointStruct]) -> None: ...

    def update_vectors(self, name: str, points: Sequence[models.PointVectors]) -> None: ...

    def delete_vectors(self, name: str, vectors: Sequence[str], ids: Sequence[PointId]) -> None: ...

    def delete(self, name: str, ids: Sequence[PointId]) -> None: ...

    def retrieve(
        self, name: str, ids: Sequence[PointId], *, with_payload: Selection, with_vectors: Selection
    ) -> list[models.Record]: ...

    def scroll(
        self,
        name: str,
        *,
        scroll_filter: models.Filter | None,
        limit: int,
        offset: PointId | None,
        with_payload: Selection,
        with_vectors: Selection,
    ) -> tuple[list[models.Record], PointId | None]: ...

    def count(self, name: str) -> int: ...

    def facet(self, name: str, key: str, *, limit: int) -> dict[str, int]: ...

    def query_batch(self, name: str, requests: Sequence[models.QueryRequest]) -> list[list[models.ScoredPoint]]: ...

    def compact(self, name: str) -> bool:
        """Bring freshly written points into the collection's storage layout where the engine does not do it
        by itself (True when it did something): the edge engine's int8 quantized segments."""
        ...


def _selection(value: Selection) -> bool | list[str]:
    return value if isinstance(value, bool) else list(value)


class QdrantBackend:
    """qdrant-client for a server (`url`) or its embedded local mode (`path`, or ':memory:')."""

    def __init__(self, client: QdrantClient, *, layout: StorageLayout | None = None) -> None:
        self._client = client
        self._layout = layout or StorageLayout()
        self._search_params = self._layout.search_params()
        options = getattr(client, "init_options", None) or {}
        self._embedded = options.get("path") is not None or options.get("location") == ":memory:"

    @property
    def embedded(self) -> bool:
        return self._embedded

    def close(self) -> None:
        self._client.close()

    def collection_names(self) -> list[str]:
        return sorted(c.name for c in self._client.get_collections().collections)

    def collection_exists(self, name: str) -> bool:
        return self._client.collection_exists(name)

    def collection_metadata(self, name: str) -> dict[str, Any]:
        return dict(self._client.get_collection(name).config.metadata or {})

    def create_collection(
        self, name: str, layout: EncoderFingerprint, *, metadata: Mapping[str, Any], lexical: bool = True
    ) -> None:
        self._client.create_collection(
            name,
            vectors_config=layout_vectors(layout, on_disk=True if self._layout.on_disk else None),
            sparse_vectors_config=layout_sparse() if lexical else None,
            metadata=dict(metadata),
            **self._layout.collection_options(),
        )

    def delete_collection(self, name: str) -> None:
        self._client.delete_collection(name)

    def create_payload_indexes(self, name: str, indexes: Mapping[str, models.PayloadSchemaType]) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Payload indexes have no effect in the local Qdrant")
            for field, schema in indexes.items():
                self._client.create_payload_index(name, field, field_schema=schema, wait=True)

    def update_metadata(self, name: str, values: Mapping[str, Any]) -> None:
        self._client.update_collection(name, metadata=dict(values))

    def upsert(self, name: str, points: Sequence[models.PointStruct]) -> None:
        self._client.upsert(name, points=list(points), wait=True)

    def update_vectors(self, name: str, points: Sequence[models.PointVectors]) -> None:
        self._client.update_vectors(name, points=list(points), wait=True)

    def delete_vectors(self, name: str, vectors: Sequence[str], ids: Sequence[PointId]) -> None:
        self._client.delete_vectors(name, vectors=list(vectors), points=list(ids), wait=True)

    def delete(self, name: str, ids: Sequence[PointId]) -> None:
        self._client.delete(name, points_selector=models.PointIdsList(points=list(ids)), wait=True)

    def retrieve(
        self, name: str, ids: Sequence[PointId], *, with_payload: Selection, with_vectors: Selection
    ) -> list[models.Record]:
        return list(
            self._client.retrieve(
                name, ids=list(ids), with_payload=_selection(with_payload), with_vectors=_selection(with_vectors)
            )
        )

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
        points, following = self._client.scroll(
            name,
            scroll_filter=scroll_filter,
            limit=limit,
            offset=offset,
            with_payload=_selection(with_payload),
            with_vectors=_selection(with_vectors),
        )
        if following is not None and not isinstance(following, str | int):
            raise TypeError(f"unexpected scroll offset {following!r}")  # our ids are UUID strings
        return list(points), following

    def count(self, name: str) -> int:
        return self._client.count(name, exact=True).count

    def facet(self, name: str, key: str, *, limit: int) -> dict[str, int]:
        return {str(hit.value): hit.count for hit in self._client.facet(name, key=key, limit=limit, exact=True).hits}

    def compact(self, name: str) -> bool:
        return False  # a server optimizes in the background; local mode has no segments

    def query_batch(self, name: str, requests: Sequence[models.QueryRequest]) -> list[list[models.ScoredPoint]]:
        if self._search_params is not None:
            requests = [rescored(request, self._search_params) for request in requests]
        return [answer.points for answer in self._client.query_batch_points(name, requests=list(requests))]
