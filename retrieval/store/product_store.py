"""The one holder of a store backend: `ProductStore` (scroll, query, metadata, head collections) over the
port (`backend.py`) whose adapters are qdrant-client (a server or its local mode) and the edge engine."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, NamedTuple

from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from retrieval.records import point_id
from retrieval.settings import Settings
from retrieval.store.backend import PointId, QdrantBackend, Selection, StoreBackend
from retrieval.store.edge_backend import EdgeBackend
from retrieval.store.errors import (
    CatalogueNameRefused,
    CatalogueNotFound,
    EncoderMismatch,
    ProductNotFound,
    StoreBusy,
    StoreError,
)
from retrieval.store.folders import DEFAULT_ENGINE, claim_folder, folder_engine
from retrieval.store.layout import (
    ADAPTED_VECTORS,
    HIDDEN_PREFIX,
    IMAGE_VECTOR,
    LAYOUT_VERSION,
    PAYLOAD_INDEXES,
    READABLE_LAYOUTS,
    READS_TEXT_FROM,
    CollectionMeta,
    EncoderFingerprint,
    StorageLayout,
    StoredState,
)
from schemas.search import Calibration, catalogue_name_problem


def open_backend(settings: Settings) -> StoreBackend:
    """The server at QDRANT_URL, else the embedded store folder (one process at a time) on the engine of
    STORE_BACKEND: `auto` (the default) opens a folder with the engine that wrote it and a new one with the
    edge engine; a folder written by the other engine is refused (StoreError)."""
    layout = StorageLayout(
        shards=settings.qdrant_shards,
        replicas=settings.qdrant_replicas,
        write_consistency=settings.qdrant_write_consistency,
        on_disk=settings.qdrant_on_disk,
        quantization=settings.qdrant_quantization,
    )
    if settings.qdrant_url:
        client = QdrantClient(url=settings.qdrant_url, api_key=settings.qdrant_api_key, timeout=30)
        return QdrantBackend(client, layout=layout)
    path = settings.store_path
    path.mkdir(parents=True, exist_ok=True)
    engine: str = settings.store_backend
    if engine == "auto":
        engine = folder_engine(path) or DEFAULT_ENGINE
    if engine == "local" and (layout.on_disk or layout.quantization != "none"):
        raise StoreError(
            f"the embedded store {path} is qdrant-client's local mode, which keeps every vector in memory: "
            "QDRANT_ON_DISK and QDRANT_QUANTIZATION need the edge engine (a new folder) or a server (QDRANT_URL)"
        )
    claim_folder(path, engine)
    if engine == "edge":
        return EdgeBackend(path, layout=layout)
    try:
        return QdrantBackend(QdrantClient(path=str(path)))
    except RuntimeError as exc:
        if "already accessed" in str(exc):
            raise StoreBusy(
                f"the embedded store {path} is in use by another process (an ingest or a running service); "
                "stop it and retry, set QDRANT_PATH to another folder, or run a Qdrant server and set QDRANT_URL"
            ) from exc
        raise


# Called after every backend call with (backend method, seconds waiting for the store lock, seconds running).
StoreObserver = Callable[[str, float, float], None]


class StoredPhoto(NamedTuple):
    """What the store knows of a photo by the hash of its bytes: its vector, and the text read off it (None
    where it was never read)."""

    vector: list[float]
    read: str | None


def _collect(points: Sequence[models.Record], wanted: set[str], out: dict[str, StoredPhoto]) -> None:
    """Each wanted photo hash's vector (and read text) from points read with `image_hashes`, `image_text`
    and the image vector."""
    for point in points:
        payload = point.payload or {}
        hashes = payload.get("image_hashes") or []
        texts = payload.get("image_text") or []
        reads = texts if isinstance(texts, list) and len(texts) == len(hashes) else [None] * len(hashes)
        rows = point.vector.get(IMAGE_VECTOR) if isinstance(point.vector, dict) else None
        if isinstance(rows, list) and len(rows) == len(hashes):
            for digest, row, read in zip(hashes, rows, reads, strict=True):
                if digest in wanted and isinstance(row, list):
                    text = str(read) if isinstance(read, str) else None
                    out[str(digest)] = StoredPhoto([float(v) for v in row], text)


class ProductStore:
    """One collection per catalogue: named vectors `image` (multivector, one row per photo) and `text`.

    The embedded engines are not safe for reads during writes (nor for concurrent writes), and in the
    service an ingest job writes while requests search. So for an embedded backend every call holds
    `store.lock`, a re-entrant lock: hold it yourself to make several calls one step. A server serialises
    nothing (`serialise=True` forces it). Every call is reported to `observer` when one is set."""

    def __init__(self, backend: StoreBackend, *, serialise: bool | None = None) -> None:
        self.lock = threading.RLock()
        self._backend = backend
        self.serialised = backend.embedded if serialise is None else serialise
        self.observer: StoreObserver | None = None

    @classmethod
    def open(cls, settings: Settings) -> ProductStore:
        """The store of the settings; StoreBusy / StoreError with what to do when it cannot be opened."""
        return cls(open_backend(settings))

    @property
    def engine(self) -> str:
        """Which engine holds the data: `server`, `local` (qdrant-client's local mode) or `edge`."""
        if isinstance(self._backend, EdgeBackend):
            return "edge"
        return "local" if self._backend.embedded else "server"

    @contextmanager
    def _call(self, name: str) -> Iterator[StoreBackend]:
        """The backend for one call: under the lock when calls are serialised, reported to the observer."""
        asked = time.perf_counter()
        guard: AbstractContextManager[Any] = self.lock if self.serialised else nullcontext()
        with guard:
            began = time.perf_counter()
            try:
                yield self._backend
            finally:
                if self.observer is not None:
                    self.observer(name, began - asked, time.perf_counter() - began)

    def __enter__(self) -> ProductStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._call("close") as backend:
            backend.close()

    def catalogues(self) -> list[str]:
        try:
            with self._call("collection_names") as backend:
                names = backend.collection_names()
        except (UnexpectedResponse, ResponseHandlingException) as exc:
            raise StoreError(f"cannot reach Qdrant: {exc}") from exc
        return [name for name in names if not name.startswith(HIDDEN_PREFIX)]

    def has_collection(self, name: str) -> bool:
        """Whether a collection exists: a catalogue, or one of the tool's own (HIDDEN_PREFIX)."""
        with self._call("collection_exists") as backend:
            return backend.collection_exists(name)

    def metadata(self, catalogue: str) -> dict[str, Any]:
        """A collection's metadata; CatalogueNotFound if it does not exist."""
        with self._call("collection_metadata") as backend:
            if not backend.collection_exists(catalogue):
                raise CatalogueNotFound(catalogue, self.catalogues())
            return backend.collection_metadata(catalogue)

    def update_metadata(self, catalogue: str, values: dict[str, Any]) -> None:
        """Set top-level metadata keys (keys merge: a key to drop is written as null)."""
        with self._call("update_metadata") as backend:
            backend.update_metadata(catalogue, values)

    def info(self, catalogue: str) -> CollectionMeta:
        """A catalogue's encoders, layout and active heads; CatalogueNotFound if it does not exist."""
        metadata = self.metadata(catalogue)
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
        ocr = metadata.get("ocr")
        reads_text = (bool(ocr.get("on")) if isinstance(ocr, dict) else None) if version >= READS_TEXT_FROM else False
        return CollectionMeta(found, int(version), active, reads_text)

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
        with self._call("create_collection") as backend:
            created = not backend.collection_exists(catalogue)
            if created:
                self.check_new_name(catalogue)
                backend.create_collection(catalogue, encoders, metadata=encoders.as_metadata())
        if not created:
            self.check_encoders(catalogue, encoders)
        with self._call("create_payload_indexes") as backend:
            backend.create_payload_indexes(catalogue, PAYLOAD_INDEXES)
        return created

    def check_new_name(self, catalogue: str) -> None:
        """CatalogueNameRefused when `catalogue` cannot name a new catalogue: one of the store's own file names,
        a trailing dot, or another catalogue's name in another case (one folder on a case-folding disk)."""
        problem = catalogue_name_problem(catalogue)
        twin = next((c for c in self.catalogues() if c != catalogue and c.casefold() == catalogue.casefold()), None)
        if problem is None and twin is not None:
            problem = f"catalogue name {catalogue!r} differs from the existing {twin!r} only by case; use {twin!r}"
        if problem is not None:
            raise CatalogueNameRefused(problem)

    def compact(self, catalogue: str) -> bool:
        """After a bulk write: bring the new points into the catalogue's storage layout where the engine
        does not by itself (an embedded int8-quantized catalogue's segments); True when something was done."""
        with self._call("compact") as backend:
            return backend.compact(catalogue)

    def ensure_side_collection(self, name: str, layout: EncoderFingerprint, *, owner: str) -> None:
        """A collection of the tool's own beside catalogue `owner` (its adaptation heads), with its layout."""
        with self._call("create_collection") as backend:
            if not backend.collection_exists(name):
                backend.create_collection(name, layout, metadata={"adapters_of": owner}, lexical=False)

    def drop_catalogue(self, catalogue: str) -> None:
        """Delete a collection (a catalogue, or one of the tool's own) and every point in it."""
        with self._call("delete_collection") as backend:
            backend.delete_collection(catalogue)

    def calibration(self, catalogue: str) -> Calibration | None:
        """The match model fitted for a catalogue, if any (kept in its collection metadata)."""
        stored = self.metadata(catalogue).get("calibration")
        return Calibration.model_validate(stored) if stored else None

    def save_calibration(self, catalogue: str, calibration: Calibration | None) -> None:
        """Store (or with None, drop) a catalogue's match model."""
        self.update_metadata(catalogue, {"calibration": calibration.model_dump() if calibration else None})

    def count(self, catalogue: str) -> int:
        with self._call("count") as backend:
            return backend.count(catalogue)

    def stored_hashes(self, catalogue: str, ids: Sequence[str]) -> dict[str, StoredState]:
        """What incremental ingest compares, per point id, for the ids that exist: the content hash and each
        local photo file's (path, 'size:mtime_ns') -> hash."""
        if not ids:
            return {}
        points = self.retrieve(catalogue, ids, with_payload=["content_hash", "image_hashes", "images", "image_files"])
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

    def photos_by_hash(
        self, catalogue: str, digests: Sequence[str], *, first_from: Sequence[str] = ()
    ) -> dict[str, StoredPhoto]:
        """Stored photos (vector, read text) whose image bytes have these sha256 hashes, from any product
        that has them (a photo's vector depends only on its bytes and the encoder, which the catalogue fixes;
        its text only on its bytes and the OCR engine). The points
        `first_from` (the changed products themselves) are read by id first: a changed product usually
        keeps its photos, and a look-up by id is cheap where a filtered scroll scans the collection."""
        wanted = set(digests)
        out: dict[str, StoredPhoto] = {}
        if not wanted:
            return out
        fields = ["image_hashes", "image_text"]
        if first_from:
            points = self.retrieve(catalogue, first_from, with_payload=fields, with_vectors=[IMAGE_VECTOR])
            _collect(points, wanted, out)
        having = models.Filter(
            must=[models.FieldCondition(key="image_hashes", match=models.MatchAny(any=sorted(wanted - out.keys())))]
        )
        if wanted - out.keys():
            pages = self.scroll_pages(catalogue, scroll_filter=having, with_payload=fields, with_vectors=[IMAGE_VECTOR])
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
        start: PointId | None = None,
    ) -> Iterator[list[models.Record]]:
        """Every point of a collection (or those the filter keeps), a page at a time, in a stable order (by point
        id; from `start` on, when given)."""
        offset: PointId | None = start
        while True:
            with self._call("scroll") as backend:
                points, offset = backend.scroll(
                    collection,
                    scroll_filter=scroll_filter,
                    limit=page,
                    offset=offset,
                    with_payload=with_payload,
                    with_vectors=with_vectors,
                )
            yield points
            if offset is None:
                return

    def query(self, catalogue: str, request: models.QueryRequest) -> list[models.ScoredPoint]:
        """One Query API request (a nearest query, or prefetches fused)."""
        return self.query_batch(catalogue, [request])[0]

    def query_batch(self, catalogue: str, requests: Sequence[models.QueryRequest]) -> list[list[models.ScoredPoint]]:
        """Several requests in one call (the engines plan them together)."""
        with self._call("query_batch") as backend:
            return backend.query_batch(catalogue, requests)

    def points(
        self, collection: str, *, with_payload: Selection = True, with_vectors: Selection = False
    ) -> Iterator[models.Record]:
        """Every point of a collection, one at a time (`scroll_pages` flattened)."""
        for page in self.scroll_pages(collection, with_payload=with_payload, with_vectors=with_vectors):
            yield from page

    def retrieve(
        self,
        collection: str,
        ids: Sequence[PointId],
        *,
        with_payload: Selection = True,
        with_vectors: Selection = False,
    ) -> list[models.Record]:
        """The points with these ids that exist."""
        with self._call("retrieve") as backend:
            return backend.retrieve(collection, ids, with_payload=with_payload, with_vectors=with_vectors)

    def delete(self, catalogue: str, ids: Sequence[str]) -> None:
        if ids:
            with self._call("delete") as backend:
                backend.delete(catalogue, ids)

    def upsert(self, catalogue: str, points: Iterable[models.PointStruct]) -> None:
        batch = list(points)
        if batch:
            with self._call("upsert") as backend:
                backend.upsert(catalogue, batch)

    def update_vectors(self, catalogue: str, points: Iterable[models.PointVectors]) -> None:
        """Set some named vectors of existing points, leaving their other vectors and payload alone."""
        batch = list(points)
        if batch:
            with self._call("update_vectors") as backend:
                backend.update_vectors(catalogue, batch)

    def delete_vectors(self, catalogue: str, vectors: Sequence[str], ids: Sequence[PointId]) -> None:
        """Remove some named vectors of existing points, leaving their other vectors and payload alone."""
        if ids and vectors:
            with self._call("delete_vectors") as backend:
                backend.delete_vectors(catalogue, vectors, ids)

    def get(self, catalogue: str, point: str, *, with_vectors: bool = False) -> models.Record | None:
        found = self.retrieve(catalogue, [point], with_vectors=with_vectors)
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

    def product_ids(self, catalogue: str, retailer: str, *, start: str | None = None) -> Iterator[str]:
        """Every product id of one retailer, in a stable order (by point id), page by page; with `start` (a point
        id, a UUID), those from it on. Point ids are UUIDs of a hash, so the products after a random UUID are
        a random sample of the retailer's."""
        only = models.Filter(must=[models.FieldCondition(key="retailer", match=models.MatchValue(value=retailer))])
        for points in self.scroll_pages(catalogue, scroll_filter=only, with_payload=["product_id"], start=start):
            yield from (str((p.payload or {})["product_id"]) for p in points)

    def facet_counts(self, catalogue: str, key: str, *, limit: int = 1_000) -> dict[str, int]:
        with self._call("facet") as backend:
            return backend.facet(catalogue, key, limit=limit)
