"""The one holder of a Qdrant backend: `ProductStore` (scroll, query, metadata, head collections) over the
client for a server, qdrant-client's local mode, or the edge engine's adapter (`edge_client.py`)."""

from __future__ import annotations

import functools
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, cast

from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from retrieval.records import point_id
from retrieval.settings import Settings
from retrieval.store.edge_client import EdgeClient
from retrieval.store.errors import CatalogueNotFound, EncoderMismatch, ProductNotFound, StoreBusy, StoreError
from retrieval.store.folders import claim_folder
from retrieval.store.layout import (
    ADAPTED_VECTORS,
    HIDDEN_PREFIX,
    IMAGE_VECTOR,
    LAYOUT_VERSION,
    LEXICAL_VECTOR,
    PAYLOAD_INDEXES,
    READABLE_LAYOUTS,
    CollectionMeta,
    EncoderFingerprint,
    StoredState,
    layout_vectors,
)
from schemas.search import Calibration


def open_client(settings: Settings) -> QdrantClient:
    """A client for the server at QDRANT_URL, else for the embedded store folder (one process at a time)."""
    if settings.qdrant_url:
        return QdrantClient(url=settings.qdrant_url, api_key=settings.qdrant_api_key, timeout=30)
    path = settings.store_path
    path.mkdir(parents=True, exist_ok=True)
    claim_folder(path, settings.store_backend)
    if settings.store_backend == "edge":
        return cast(QdrantClient, EdgeClient(path))  # the part of the client's interface the project calls
    try:
        return QdrantClient(path=str(path))
    except RuntimeError as exc:
        if "already accessed" in str(exc):
            raise StoreBusy(
                f"the embedded store {path} is in use by another process (an ingest or a running service); "
                "stop it and retry, set QDRANT_PATH to another folder, or run a Qdrant server and set QDRANT_URL"
            ) from exc
        raise


# Called after every client call with (client method, seconds waiting for the store lock, seconds running).
StoreObserver = Callable[[str, float, float], None]


def is_embedded(client: QdrantClient) -> bool:
    """True for qdrant-client's local mode (a folder, or ':memory:'), False for a server."""
    options = getattr(client, "init_options", None) or {}
    return options.get("path") is not None or options.get("location") == ":memory:"


class _GuardedClient:
    """The Qdrant client seen through its store: every method call holds the store's lock (when the store
    serialises access) and is reported to the store's observer. Other attributes pass through unchanged."""

    def __init__(self, client: QdrantClient, store: ProductStore) -> None:
        self._wrapped = client
        self._store = store

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._wrapped, name)
        if not callable(attribute):
            return attribute
        store = self._store

        @functools.wraps(attribute)
        def call(*args: Any, **kwargs: Any) -> Any:
            asked = time.perf_counter()
            guard: AbstractContextManager[Any] = store.lock if store.serialised else nullcontext()
            with guard:
                began = time.perf_counter()
                try:
                    return attribute(*args, **kwargs)
                finally:
                    if store.observer is not None:
                        store.observer(name, began - asked, time.perf_counter() - began)

        return call


def _collect(points: Sequence[models.Record], wanted: set[str], out: dict[str, list[float]]) -> None:
    """Each wanted photo hash's vector from points read with `image_hashes` and the image vector."""
    for point in points:
        hashes = (point.payload or {}).get("image_hashes") or []
        rows = point.vector.get(IMAGE_VECTOR) if isinstance(point.vector, dict) else None
        if isinstance(rows, list) and len(rows) == len(hashes):
            for digest, row in zip(hashes, rows, strict=True):
                if digest in wanted and isinstance(row, list):
                    out[str(digest)] = [float(v) for v in row]


class ProductStore:
    """One collection per catalogue: named vectors `image` (multivector, one row per photo) and `text`.

    qdrant-client's local mode is not safe for reads during writes (nor for concurrent writes), and in the
    service an ingest job writes while requests search. So for an embedded store every client call, made
    here or through `store.client` (the query code), holds `store.lock`, a re-entrant lock: hold it
    yourself to make several calls one step. A server serialises nothing (`serialise=True` forces it)."""

    def __init__(self, client: QdrantClient, *, serialise: bool | None = None) -> None:
        self.lock = threading.RLock()
        self.serialised = is_embedded(client) if serialise is None else serialise
        self.observer: StoreObserver | None = None
        # Typed as the client it stands for: it has every attribute of it, its methods guarded.
        self.client = cast(QdrantClient, _GuardedClient(client, self))

    def close(self) -> None:
        self.client.close()

    def catalogues(self) -> list[str]:
        try:
            names = (c.name for c in self.client.get_collections().collections)
            return sorted(name for name in names if not name.startswith(HIDDEN_PREFIX))
        except (UnexpectedResponse, ResponseHandlingException) as exc:
            raise StoreError(f"cannot reach Qdrant: {exc}") from exc

    def info(self, catalogue: str) -> CollectionMeta:
        """A catalogue's encoders, layout and active heads; CatalogueNotFound if it does not exist."""
        if not self.client.collection_exists(catalogue):
            raise CatalogueNotFound(catalogue, self.catalogues())
        metadata = self.client.get_collection(catalogue).config.metadata or {}
        found = EncoderFingerprint.from_metadata(metadata)
        if found is None:
            raise StoreError(f"collection {catalogue!r} was not made by this tool (no encoder metadata)")
        version = metadata.get("layout_version")
        if version not in READABLE_LAYOUTS:
            raise StoreError(
                f"catalogue {catalogue!r} has collection layout {version}, this version needs {LAYOUT_VERSION}: "
                "ingest the catalogue again under a new name (or delete the collection first)"
            )
        adapters = metadata.get("adapters") or {}
        active = {str(k): int(v) for k, v in adapters.items() if isinstance(v, int) and k in ADAPTED_VECTORS}
        return CollectionMeta(found, int(version), active)

    def fingerprint(self, catalogue: str) -> EncoderFingerprint:
        """The encoders a catalogue was built with; CatalogueNotFound if it does not exist."""
        return self.info(catalogue).fingerprint

    def check_encoders(self, catalogue: str, expected: EncoderFingerprint) -> CollectionMeta:
        info = self.info(catalogue)
        found = info.fingerprint
        if found != expected:
            raise EncoderMismatch(
                f"catalogue {catalogue!r} was built with image encoder {found.image} ({found.image_dim}-d) and "
                f"text encoder {found.text} ({found.text_dim}-d), but this process loaded {expected.image} "
                f"({expected.image_dim}-d) and {expected.text} ({expected.text_dim}-d); set IMAGE_MODEL and "
                "TEXT_MODEL to the catalogue's encoders, or ingest into a new catalogue"
            )
        return info

    def ensure_catalogue(self, catalogue: str, encoders: EncoderFingerprint) -> bool:
        """Create the collection if missing (True), else check its encoders; payload indexes either way."""
        created = False
        if self.client.collection_exists(catalogue):
            self.check_encoders(catalogue, encoders)
        else:
            self.client.create_collection(
                catalogue,
                vectors_config=layout_vectors(encoders),
                # Qdrant weighs each term by its inverse document frequency, kept up to date as data changes.
                sparse_vectors_config={LEXICAL_VECTOR: models.SparseVectorParams(modifier=models.Modifier.IDF)},
                metadata=encoders.as_metadata(),
            )
            created = True
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Payload indexes have no effect in the local Qdrant")
            for field, schema in PAYLOAD_INDEXES.items():
                self.client.create_payload_index(catalogue, field, field_schema=schema)
        return created

    def drop_catalogue(self, catalogue: str) -> None:
        """Delete a catalogue's collection and every point in it."""
        self.client.delete_collection(catalogue)

    def calibration(self, catalogue: str) -> Calibration | None:
        """The match model fitted for a catalogue, if any (kept in its collection metadata)."""
        if not self.client.collection_exists(catalogue):
            raise CatalogueNotFound(catalogue, self.catalogues())
        stored = (self.client.get_collection(catalogue).config.metadata or {}).get("calibration")
        return Calibration.model_validate(stored) if stored else None

    def save_calibration(self, catalogue: str, calibration: Calibration | None) -> None:
        """Store (or with None, drop) a catalogue's match model. Metadata updates merge keys, so dropping
        writes null rather than leaving the key out."""
        calibration_data = calibration.model_dump() if calibration else None
        self.client.update_collection(catalogue, metadata={"calibration": calibration_data})

    def metadata(self, catalogue: str) -> dict[str, Any]:
        return dict(self.client.get_collection(catalogue).config.metadata or {})

    def update_metadata(self, catalogue: str, values: dict[str, Any]) -> None:
        """Set top-level metadata keys (a server merges keys: a key to drop is written as null)."""
        self.client.update_collection(catalogue, metadata=values)

    def count(self, catalogue: str) -> int:
        return self.client.count(catalogue, exact=True).count

    def stored_hashes(self, catalogue: str, ids: Sequence[str]) -> dict[str, StoredState]:
        """What incremental ingest compares, per point id, for the ids that exist: the content hash and each
        local photo file's (path, 'size:mtime_ns') -> hash."""
        if not ids:
            return {}
        points = self.client.retrieve(
            catalogue,
            ids=list(ids),
            with_payload=["content_hash", "image_hashes", "images", "image_files"],
            with_vectors=False,
        )
        out = {}
        for point in points:
            payload = point.payload or {}
            hashes = [str(h) for h in payload.get("image_hashes") or []]
            refs, signatures = payload.get("images") or [], payload.get("image_files") or []
            files = {
                (str(ref), str(signature)): digest
                for ref, signature, digest in zip(refs, signatures, hashes, strict=False)
                if signature
            }
            out[str(point.id)] = StoredState(str(payload.get("content_hash", "")), files)
        return out

    def image_vectors_by_hash(
        self, catalogue: str, digests: Sequence[str], *, first_from: Sequence[str] = ()
    ) -> dict[str, list[float]]:
        """Stored photo vectors whose image bytes have these sha256 hashes, from any product that has them
        (a photo's vector depends only on its bytes and the encoder, which the catalogue fixes). The points
        `first_from` (the changed products themselves) are read by id first: a changed product usually
        keeps its photos, and a look-up by id is cheap where a filtered scroll scans the collection."""
        wanted = set(digests)
        out: dict[str, list[float]] = {}
        if not wanted:
            return out
        if first_from:
            points = self.client.retrieve(
                catalogue, ids=list(first_from), with_payload=["image_hashes"], with_vectors=[IMAGE_VECTOR]
            )
            _collect(points, wanted, out)
        having = models.Filter(
            must=[models.FieldCondition(key="image_hashes", match=models.MatchAny(any=sorted(wanted - out.keys())))]
        )
        if wanted - out.keys():
            pages = self.scroll_pages(
                catalogue, scroll_filter=having, with_payload=["image_hashes"], with_vectors=[IMAGE_VECTOR]
            )
            for points in pages:
                _collect(points, wanted, out)
                if not wanted - out.keys():
                    break
        return out

    def scroll_pages(
        self,
        collection: str,
        *,
        scroll_filter: models.Filter | None = None,
        page: int = 256,
        with_payload: bool | Sequence[str] = True,
        with_vectors: bool | Sequence[str] = False,
    ) -> Iterator[list[models.Record]]:
        """Every point of a collection (or those the filter keeps), a page at a time, in a stable order."""
        offset = None
        while True:
            points, offset = self.client.scroll(
                collection,
                scroll_filter=scroll_filter,
                limit=page,
                offset=offset,
                with_payload=with_payload if isinstance(with_payload, bool) else list(with_payload),
                with_vectors=with_vectors if isinstance(with_vectors, bool) else list(with_vectors),
            )
            yield points
            if offset is None:
                return

    def query(self, catalogue: str, request: models.QueryRequest) -> list[models.ScoredPoint]:
        """One Query API request (a nearest query, or prefetches fused)."""
        return self.query_batch(catalogue, [request])[0]

    def query_batch(self, catalogue: str, requests: Sequence[models.QueryRequest]) -> list[list[models.ScoredPoint]]:
        """Several requests in one call (the engines plan them together)."""
        return [answer.points for answer in self.client.query_batch_points(catalogue, requests=list(requests))]

    def has_collection(self, name: str) -> bool:
        """Whether a collection exists: a catalogue, or one of the tool's own (HIDDEN_PREFIX)."""
        return self.client.collection_exists(name)

    def ensure_side_collection(self, name: str, layout: EncoderFingerprint, *, owner: str) -> None:
        """A collection of the tool's own beside catalogue `owner` (its adaptation heads), with its layout."""
        if not self.client.collection_exists(name):
            self.client.create_collection(name, vectors_config=layout_vectors(layout), metadata={"adapters_of": owner})

    def retrieve(self, collection: str, ids: Sequence[str]) -> list[models.Record]:
        """The points with these ids that exist, with their payloads."""
        return list(self.client.retrieve(collection, ids=list(ids), with_payload=True))

    def delete(self, catalogue: str, ids: Sequence[str]) -> None:
        if ids:
            self.client.delete(catalogue, points_selector=models.PointIdsList(points=list(ids)), wait=True)

    def upsert(self, catalogue: str, points: Iterable[models.PointStruct]) -> None:
        batch = list(points)
        if batch:
            self.client.upsert(catalogue, points=batch, wait=True)

    def update_vectors(self, catalogue: str, points: Iterable[models.PointVectors]) -> None:
        """Set some named vectors of existing points, leaving their other vectors and payload alone."""
        batch = list(points)
        if batch:
            self.client.update_vectors(catalogue, points=batch, wait=True)

    def get(self, catalogue: str, point: str, *, with_vectors: bool = False) -> models.Record | None:
        found = self.client.retrieve(catalogue, ids=[point], with_payload=True, with_vectors=with_vectors)
        return found[0] if found else None

    def product(
        self, catalogue: str, retailer: str, product_id: str, *, with_vectors: bool = False, known: bool = False
    ) -> models.Record:
        """A stored product by (retailer, id); ProductNotFound (or CatalogueNotFound) otherwise.
        `known=True`: the caller has already checked the catalogue (no second collection look-up)."""
        if not known:
            self.fingerprint(catalogue)
        record = self.get(catalogue, point_id(retailer, product_id), with_vectors=with_vectors)
        if record is None:
            raise ProductNotFound(catalogue, retailer, product_id)
        return record

    def product_ids(self, catalogue: str, retailer: str) -> Iterator[str]:
        """Every product id of one retailer, in a stable order (by point id), page by page."""
        only = models.Filter(must=[models.FieldCondition(key="retailer", match=models.MatchValue(value=retailer))])
        for points in self.scroll_pages(catalogue, scroll_filter=only, with_payload=["product_id"]):
            yield from (str((p.payload or {})["product_id"]) for p in points)

    def facet_counts(self, catalogue: str, key: str, *, limit: int = 1_000) -> dict[str, int]:
        response = self.client.facet(catalogue, key=key, limit=limit, exact=True)
        return {str(hit.value): hit.count for hit in response.hits}
