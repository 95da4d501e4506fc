"""The real Qdrant engine in-process (qdrant-edge-py) behind a small adapter with this project's layout.

qdrant-client's local mode is numpy brute force with filters evaluated in Python, too slow for a filtered
fused query beyond some tens of thousands of products. `EdgeStore` keeps one catalogue in one folder with
qdrant-edge-py (segments, WAL, payload indexes, optional HNSW) and speaks qdrant-client's models at its
boundary (`PointStruct`, `Filter`, `QueryRequest` in; `ScoredPoint`, `Record` out), so the code that builds
points, filters and queries for `ProductStore` can be pointed at it unchanged. Edge's own types stay here.

A folder holds:

    edge.lock       exclusive `flock` taken before the shard is touched (one EdgeStore per folder)
    metadata.json   the collection metadata a Qdrant collection would carry (edge shards have none)
    shard/          the EdgeShard (segments/, wal/, edge_config.json)

The lock matters: `EdgeShard.load` (0.9.0) opens every segment's payload storage and indexes read-write,
and truncates some of their files, *before* it tries its own lock on `wal/`; so a second load on an open
folder touches the open shard's files even though it then fails, and has been seen to damage its payload
journal. The folder lock refuses the second opener before the engine is called.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar, cast

import qdrant_edge as edge
from qdrant_client import models

from retrieval.store.errors import StoreBusy, StoreError
from retrieval.store.layout import (
    PAYLOAD_INDEXES,
    RRF_K,
    SHARD_DIR,
    EncoderFingerprint,
    layout_sparse,
    layout_vectors,
    plain_vector,
)

LOCK_FILE = "edge.lock"
METADATA_FILE = "metadata.json"

PointId = str | int
P = ParamSpec("P")
T = TypeVar("T")

_DISTANCES = {models.Distance.COSINE: edge.Distance.Cosine, models.Distance.DOT: edge.Distance.Dot}
_MODIFIERS = {models.Modifier.IDF: edge.Modifier.Idf, models.Modifier.NONE: getattr(edge.Modifier, "None")}

_SCHEMA_TYPES: dict[models.PayloadSchemaType, edge.PayloadSchemaType] = {
    models.PayloadSchemaType.KEYWORD: edge.PayloadSchemaType.Keyword,
    models.PayloadSchemaType.INTEGER: edge.PayloadSchemaType.Integer,
    models.PayloadSchemaType.FLOAT: edge.PayloadSchemaType.Float,
    models.PayloadSchemaType.BOOL: edge.PayloadSchemaType.Bool,
    models.PayloadSchemaType.GEO: edge.PayloadSchemaType.Geo,
    models.PayloadSchemaType.TEXT: edge.PayloadSchemaType.Text,
    models.PayloadSchemaType.DATETIME: edge.PayloadSchemaType.Datetime,
    models.PayloadSchemaType.UUID: edge.PayloadSchemaType.Uuid,
}


class EdgeStoreBusy(StoreBusy):
    """The folder is held by another EdgeStore, in this process or another."""


class EdgeUnsupported(StoreError):
    """A qdrant-client model (filter condition, query kind, selector) the adapter does not translate."""


def edge_config(image_dim: int, text_dim: int, *, quantization: str = "none", on_disk: bool = False) -> edge.EdgeConfig:
    """Our collection layout (`layout_vectors`, `layout_sparse`: the one spec both engines are configured
    from) as an edge shard config. By default everything else keeps edge's defaults (vectors cached in RAM,
    payload on disk, no HNSW until `optimize()`).

    `quantization="int8"`: `optimize()` turns the segments into ones holding int8 scalar-quantized copies
    of the dense vectors, kept in RAM, which queries score first and rescore with the originals; edge
    builds quantized data only for optimized segments, so the HNSW graph is switched off (m = 0) and any
    segment over 1 KB is "indexed": optimizing then costs 27-60 s per 100k points here (136 s at 500k, 602 s
    at 1M) instead of the graph's 17 minutes, and a filtered query still scores only the points its payload
    index selects.
    `on_disk`: the original vectors are memory-mapped without being cached (read when rescoring)."""
    dense = layout_vectors(EncoderFingerprint("", image_dim, "", text_dim))
    options: dict[str, Any] = {}
    if quantization == "int8":
        options["quantization_config"] = edge.ScalarQuantizationConfig(
            edge.ScalarType.Int8, quantile=0.99, memory=edge.Memory.Cached
        )
        options["hnsw_config"] = edge.HnswIndexConfig(m=0, ef_construct=100, full_scan_threshold=10_000, payload_m=0)
        options["optimizers"] = edge.EdgeOptimizersConfig(indexing_threshold=1)
    elif quantization != "none":
        raise EdgeUnsupported(f"quantization {quantization!r} is not translated for the edge engine")
    return edge.EdgeConfig(
        vectors={name: _edge_params(params, on_disk=on_disk) for name, params in dense.items()},
        sparse_vectors={
            name: edge.EdgeSparseVectorParams(modifier=_MODIFIERS[params.modifier or models.Modifier.NONE])
            for name, params in layout_sparse().items()
        },
        **options,
    )


def _edge_params(params: models.VectorParams, *, on_disk: bool = False) -> edge.EdgeVectorParams:
    if params.distance not in _DISTANCES:
        raise EdgeUnsupported(f"distance {params.distance} is not translated for the edge engine")
    multi = params.multivector_config
    if multi is not None and multi.comparator != models.MultiVectorComparator.MAX_SIM:
        raise EdgeUnsupported(f"multivector comparator {multi.comparator} is not translated for the edge engine")
    return edge.EdgeVectorParams(
        size=params.size,
        distance=_DISTANCES[params.distance],
        multivector_config=edge.MultiVectorConfig(edge.MultiVectorComparator.MaxSim) if multi else None,
        memory=edge.Memory.Cold if on_disk else None,
    )


class FolderLock:
    """An exclusive, non-blocking `flock` on `<folder>/edge.lock`. flock locks belong to an open file, so a
    second lock on the same folder is refused in the same process too; the OS drops it if the process dies."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise EdgeStoreBusy(
                f"the embedded store {self.path.parent} is already open, in use by another process (lock "
                f"{self.path} held by process {holder}): stop it and retry, set QDRANT_PATH to another folder, or "
                "run a Qdrant server and set QDRANT_URL"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class EdgeStore:
    """One catalogue in one folder on qdrant-edge-py. Open with `EdgeStore.open`; one instance per folder."""

    def __init__(self, folder: Path, shard: edge.EdgeShard, lock: FolderLock) -> None:
        self.folder = folder
        self._shard: edge.EdgeShard | None = shard
        self._lock = lock
        self._quantized: bool | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        folder: str | Path,
        *,
        image_dim: int | None = None,
        text_dim: int | None = None,
        quantization: str = "none",
        on_disk: bool = False,
    ) -> EdgeStore:
        """Open the store in `folder`, creating it with the layout when it holds no shard yet (then both
        dimensions are needed; given for an existing shard, they are checked against it). `quantization` and
        `on_disk` (see `edge_config`) apply to a new shard; an existing one keeps what it was created with.
        Takes the folder lock first: EdgeStoreBusy if another EdgeStore has it."""
        root = Path(folder)
        root.mkdir(parents=True, exist_ok=True)
        lock = FolderLock(root)
        lock.acquire()
        try:
            shard_path = root / SHARD_DIR
            exists = _holds_shard(shard_path)
            config = None
            if image_dim is not None and text_dim is not None:  # an existing shard's storage choices are kept
                storage: dict[str, Any] = {} if exists else {"quantization": quantization, "on_disk": on_disk}
                config = edge_config(image_dim, text_dim, **storage)
            if exists:
                shard = _call(edge.EdgeShard.load, str(shard_path), config)
            elif config is None:
                raise StoreError(f"{root} holds no edge shard yet: give image_dim and text_dim to create one")
            else:
                shard = _call(edge.EdgeShard.create, str(shard_path), config)
            store = cls(root, shard, lock)
            store.ensure_payload_indexes()
        except BaseException:
            lock.release()
            raise
        return store

    def close(self) -> None:
        """Flush and close the shard, then release the folder lock. Safe to call twice."""
        if self._shard is not None:
            shard, self._shard = self._shard, None
            try:
                _call(shard.close)
            finally:
                self._lock.release()

    def __enter__(self) -> EdgeStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def shard(self) -> edge.EdgeShard:
        if self._shard is None:
            raise StoreError(f"the embedded store {self.folder} is closed")
        return self._shard

    def flush(self) -> None:
        _call(self.shard.flush)

    @property
    def quantized(self) -> bool:
        """Whether the shard was created with int8 quantization (`edge_config`), as the engine recorded it in
        `shard/edge_config.json` (the package has no call that returns a shard's config)."""
        if self._quantized is None:
            try:
                config = json.loads((self.folder / SHARD_DIR / "edge_config.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                config = {}
            self._quantized = bool(isinstance(config, dict) and config.get("quantization_config"))
        return self._quantized

    def optimize(self) -> bool:
        """Merge segments and build HNSW indexes (a quantized shard: the int8 copies, no graph) for segments
        over the indexing threshold. Blocks until done (minutes at 100k+ points); edge has no background
        optimizer, so nothing is indexed until this runs."""
        return bool(_call(self.shard.optimize))

    def info(self) -> dict[str, int]:
        info = _call(self.shard.info)
        return {
            "segments": info.segments_count,
            "points": info.points_count,  # approximate: summed over segments
            "indexed_vectors": info.indexed_vectors_count,
        }

    def ensure_payload_indexes(self, indexes: Mapping[str, models.PayloadSchemaType] = PAYLOAD_INDEXES) -> None:
        """Create the payload indexes that are missing (edge uses them for filtering, counts and facets)."""
        existing = set(_call(self.shard.info).payload_schema)
        for field, schema in indexes.items():
            if field not in existing:
                _call(self.shard.update, edge.UpdateOperation.create_field_index(field, _SCHEMA_TYPES[schema]))

    # -- collection metadata (kept beside the shard: edge shards have none) -------------------------------

    def metadata(self) -> dict[str, Any]:
        path = self.folder / METADATA_FILE
        if not path.is_file():
            return {}
        loaded = json.loads(path.read_text(encoding="utf-8"))
        return loaded if isinstance(loaded, dict) else {}

    def update_metadata(self, values: Mapping[str, Any]) -> None:
        """Merge keys into the metadata, as Qdrant's collection metadata updates do; written atomically."""
        if self._shard is None:  # the lock no longer guards the file
            raise StoreError(f"the embedded store {self.folder} is closed")
        merged = {**self.metadata(), **values}
        path = self.folder / METADATA_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(merged, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)

    # -- writes ------------------------------------------------------------------------------------------

    def upsert(self, points: Iterable[models.PointStruct], *, batch_size: int = 512) -> int:
        """Insert or replace points (ids: uuid strings or ints; named vectors and payload). Returns how many."""
        done = 0
        batch: list[edge.Point] = []
        for point in points:
            batch.append(edge.Point(_edge_id(point.id), _edge_vectors(point.vector), point.payload or {}))
            if len(batch) >= batch_size:
                done += self._upsert(batch)
                batch = []
        return done + self._upsert(batch)

    def update_vectors(self, points: Sequence[models.PointVectors]) -> None:
        """Set some named vectors of existing points; their other vectors and payload stay."""
        if points:
            batch = [edge.PointVectors(_edge_id(p.id), _edge_vectors(p.vector)) for p in points]
            _call(self.shard.update, edge.UpdateOperation.update_vectors(batch))

    def delete_vectors(self, names: Sequence[str], ids: Sequence[PointId]) -> None:
        """Remove some named vectors of existing points; the rest of each point stays."""
        if ids and names:
            _call(self.shard.update, edge.UpdateOperation.delete_vectors([_edge_id(i) for i in ids], list(names)))

    def _upsert(self, batch: list[edge.Point]) -> int:
        if batch:
            _call(self.shard.update, edge.UpdateOperation.upsert_points(batch))
        return len(batch)

    def delete(self, ids: Sequence[PointId]) -> None:
        if ids:
            _call(self.shard.update, edge.UpdateOperation.delete_points([_edge_id(i) for i in ids]))

    # -- reads -------------------------------------------------------------------------------------------

    def retrieve(
        self,
        ids: Sequence[PointId],
        *,
        with_payload: bool | Sequence[str] = True,
        with_vectors: bool | Sequence[str] = False,
    ) -> list[models.Record]:
        """The points that exist among `ids` (missing ones are left out, as in Qdrant)."""
        records = _call(
            self.shard.retrieve, [_edge_id(i) for i in ids], _with_payload(with_payload), _with_vectors(with_vectors)
        )
        return [_record(r) for r in records]

    def scroll(
        self,
        *,
        scroll_filter: models.Filter | None = None,
        limit: int = 256,
        offset: PointId | None = None,
        with_payload: bool | Sequence[str] = True,
        with_vectors: bool | Sequence[str] = False,
    ) -> tuple[list[models.Record], PointId | None]:
        """One page of points in point-id order, and the offset of the next page (None after the last)."""
        request = edge.ScrollRequest(
            offset=None if offset is None else _edge_id(offset),
            limit=limit,
            filter=to_edge_filter(scroll_filter),
            with_payload=_with_payload(with_payload),
            with_vector=_with_vectors(with_vectors),
        )
        records, next_offset = _call(self.shard.scroll, request)
        return [_record(r) for r in records], None if next_offset is None else _our_id(next_offset)

    def scroll_all(self, scroll_filter: models.Filter | None = None, **options: Any) -> Iterator[models.Record]:
        offset: PointId | None = None
        while True:
            records, offset = self.scroll(scroll_filter=scroll_filter, offset=offset, **options)
            yield from records
            if offset is None:
                return

    def count(self, count_filter: models.Filter | None = None) -> int:
        return int(_call(self.shard.count, edge.CountRequest(exact=True, filter=to_edge_filter(count_filter))))

    def facet(self, key: str, *, limit: int = 1_000, facet_filter: models.Filter | None = None) -> dict[str, int]:
        """Exact counts of a payload field's values. Edge refuses a field without a payload index (as a server
        does; local mode facets any field)."""
        request = edge.FacetRequest(key=key, limit=limit, exact=True, filter=to_edge_filter(facet_filter))
        return {str(hit.value): hit.count for hit in _call(self.shard.facet, request).hits}

    def query(self, request: models.QueryRequest) -> list[models.ScoredPoint]:
        """Run a qdrant-client QueryRequest (nearest / fusion over prefetches, filter, limit, offset, score
        threshold, payload and vector selection) on the shard."""
        return [_scored(p) for p in _call(self.shard.query, to_edge_request(request))]

    def query_batch(self, requests: Sequence[models.QueryRequest]) -> list[list[models.ScoredPoint]]:
        """Several requests planned together (what `query_batch_points` is for a client)."""
        batch = edge.QueryBatchRequest([to_edge_request(r) for r in requests])
        return [[_scored(p) for p in points] for points in _call(self.shard.query_batch, batch)]


# -- translation: qdrant-client models -> edge -------------------------------------------------------------


def to_edge_filter(f: models.Filter | None) -> edge.Filter | None:
    """qdrant-client Filter -> edge Filter: must / should / must_not / min_should of field conditions (match
    value / any / except, numeric range, is_empty, is_null), has_id, is_empty, is_null and nested filters."""
    if f is None:
        return None
    min_should = None
    if f.min_should is not None:
        min_should = edge.MinShould([_condition(c) for c in f.min_should.conditions], f.min_should.min_count)
    return edge.Filter(
        must=_conditions(f.must), should=_conditions(f.should), must_not=_conditions(f.must_not), min_should=min_should
    )


def _conditions(given: Any) -> list[edge.ConditionType] | None:
    if given is None:
        return None
    return [_condition(c) for c in (given if isinstance(given, list) else [given])]


def _condition(c: models.Condition) -> edge.ConditionType:
    if isinstance(c, models.FieldCondition):
        return _field_condition(c)
    if isinstance(c, models.HasIdCondition):
        return edge.HasIdCondition({_edge_id(i) for i in c.has_id})
    if isinstance(c, models.Filter):
        translated = to_edge_filter(c)
        assert translated is not None
        return translated
    if isinstance(c, models.IsEmptyCondition):
        return edge.IsEmptyCondition(c.is_empty.key)
    if isinstance(c, models.IsNullCondition):
        return edge.IsNullCondition(c.is_null.key)
    if isinstance(c, models.NestedCondition):
        nested = to_edge_filter(c.nested.filter)
        assert nested is not None
        return edge.NestedCondition(c.nested.key, nested)
    raise EdgeUnsupported(f"filter condition {type(c).__name__} is not translated for the edge store")


def _field_condition(c: models.FieldCondition) -> edge.FieldCondition:
    if c.geo_bounding_box or c.geo_radius or c.geo_polygon or c.values_count:
        raise EdgeUnsupported(f"geo and values_count conditions on {c.key!r} are not translated for the edge store")
    match: edge.MatchType | None = None
    if isinstance(c.match, models.MatchValue):
        match = edge.MatchValue(c.match.value)
    elif isinstance(c.match, models.MatchAny):
        match = edge.MatchAny(c.match.any)
    elif isinstance(c.match, models.MatchExcept):
        match = edge.MatchExcept(c.match.except_)
    elif c.match is not None:
        raise EdgeUnsupported(f"match {type(c.match).__name__} on {c.key!r} is not translated for the edge store")
    range_: edge.RangeFloat | None = None
    if isinstance(c.range, models.Range):
        range_ = edge.RangeFloat(gte=c.range.gte, gt=c.range.gt, lte=c.range.lte, lt=c.range.lt)
    elif c.range is not None:
        raise EdgeUnsupported(f"range {type(c.range).__name__} on {c.key!r} is not translated for the edge store")
    return edge.FieldCondition(key=c.key, match=match, range=range_, is_empty=c.is_empty, is_null=c.is_null)


def to_edge_request(r: models.QueryRequest) -> edge.QueryRequest:
    """qdrant-client QueryRequest -> edge QueryRequest (nearest queries on named dense, multi and sparse vectors;
    RRF, weighted RRF and DBSF fusion; nested prefetches; exact / hnsw_ef search params)."""
    if r.lookup_from is not None or r.shard_key is not None:
        raise EdgeUnsupported("lookup_from and shard_key are not available on the edge store")
    return edge.QueryRequest(
        limit=r.limit if r.limit is not None else 10,
        offset=r.offset,
        query=None if r.query is None else _edge_query(r.query, r.using),
        prefetches=_prefetches(r.prefetch),
        with_vector=_with_vectors(r.with_vector if r.with_vector is not None else False),
        with_payload=_with_payload(r.with_payload if r.with_payload is not None else False),
        filter=to_edge_filter(r.filter),
        score_threshold=r.score_threshold,
        params=_params(r.params),
    )


def _prefetches(given: models.Prefetch | list[models.Prefetch] | None) -> list[edge.Prefetch] | None:
    if given is None:
        return None
    out = []
    for p in given if isinstance(given, list) else [given]:
        if p.lookup_from is not None:
            raise EdgeUnsupported("lookup_from is not available on the edge store")
        out.append(
            edge.Prefetch(
                limit=p.limit if p.limit is not None else 10,
                query=None if p.query is None else _edge_query(p.query, p.using),
                prefetches=_prefetches(p.prefetch),
                params=_params(p.params),
                filter=to_edge_filter(p.filter),
                score_threshold=p.score_threshold,
            )
        )
    return out


def _edge_query(q: Any, using: str | None) -> edge.ScoringQueryType:
    if isinstance(q, models.NearestQuery):
        if q.mmr is not None:
            raise EdgeUnsupported("MMR nearest queries are not translated for the edge store")
        return _edge_query(q.nearest, using)
    if isinstance(q, models.SparseVector):
        return edge.Query.Nearest(edge.SparseVector(list(q.indices), list(q.values)), using=using)
    if isinstance(q, list | tuple) or hasattr(q, "tolist"):  # a dense vector or a multivector (rows)
        return edge.Query.Nearest(plain_vector(q), using=using)
    # The stub's ScoringQueryType names `Fusion`, but fusions are its nested classes Rrf / Dbsf (no subclasses).
    if isinstance(q, models.FusionQuery):
        if q.fusion == models.Fusion.DBSF:
            return cast("edge.ScoringQueryType", edge.Fusion.Dbsf())
        return cast("edge.ScoringQueryType", edge.Fusion.Rrf(k=RRF_K))
    if isinstance(q, models.RrfQuery):
        k = q.rrf.k if q.rrf.k is not None else RRF_K
        weights = None if q.rrf.weights is None else [float(w) for w in q.rrf.weights]
        return cast("edge.ScoringQueryType", edge.Fusion.Rrf(k=k, weights=weights))
    raise EdgeUnsupported(f"query {type(q).__name__} is not translated for the edge store")


def _params(p: models.SearchParams | None) -> edge.SearchParams | None:
    if p is None:
        return None
    quantization = None
    if p.quantization is not None:
        q = p.quantization
        quantization = edge.QuantizationSearchParams(
            ignore=bool(q.ignore), rescore=q.rescore, oversampling=q.oversampling
        )
    return edge.SearchParams(
        hnsw_ef=p.hnsw_ef, exact=bool(p.exact), quantization=quantization, indexed_only=bool(p.indexed_only)
    )


def _with_payload(value: Any) -> edge.WithPayloadType:
    if isinstance(value, bool):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    if isinstance(value, tuple) and all(isinstance(v, str) for v in value):
        return list(value)
    if isinstance(value, models.PayloadSelectorInclude):
        return edge.PayloadSelector.Include(list(value.include))
    if isinstance(value, models.PayloadSelectorExclude):
        return edge.PayloadSelector.Exclude(list(value.exclude))
    raise EdgeUnsupported(f"payload selector {value!r} is not translated for the edge store")


def _with_vectors(value: Any) -> edge.WithVectorType:
    if isinstance(value, bool):
        return value
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return list(value)
    raise EdgeUnsupported(f"vector selector {value!r} is not translated for the edge store")


def _edge_id(point_id: Any) -> edge.PointId:
    if isinstance(point_id, int):
        return point_id
    return str(point_id)


def _our_id(point_id: edge.PointId) -> PointId:
    return point_id if isinstance(point_id, int) else str(point_id)


def _edge_vectors(vector: Any) -> edge.Vector:
    if not isinstance(vector, dict):
        raise EdgeUnsupported("the edge store takes named vectors only (image, text, lexical)")
    out: dict[str, edge.NamedVector] = {}
    for name, value in vector.items():
        if isinstance(value, models.SparseVector):
            out[name] = edge.SparseVector(list(value.indices), list(value.values))
        elif isinstance(value, list):
            out[name] = value
        else:
            raise EdgeUnsupported(f"vector {name!r} of type {type(value).__name__} (inference objects need a server)")
    return out


# -- translation: edge -> qdrant-client models -------------------------------------------------------------


def _our_vectors(vector: edge.Vector | None) -> Any:
    if isinstance(vector, dict):
        return {
            name: models.SparseVector(indices=list(v.indices), values=list(v.values))
            if isinstance(v, edge.SparseVector)
            else v
            for name, v in vector.items()
        }
    return vector


def _scored(p: edge.ScoredPoint) -> models.ScoredPoint:
    return models.ScoredPoint.model_construct(
        id=_our_id(p.id), version=p.version, score=p.score, payload=p.payload, vector=_our_vectors(p.vector)
    )


def _record(r: edge.Record) -> models.Record:
    return models.Record.model_construct(id=_our_id(r.id), payload=r.payload, vector=_our_vectors(r.vector))


def _holds_shard(path: Path) -> bool:
    segments = path / "segments"
    return (path / "edge_config.json").is_file() or (segments.is_dir() and any(segments.iterdir()))


def _call(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """The binding raises plain `Exception` with the engine's message (a wrong vector name or dimension, a
    config that does not fit the shard, an I/O error): turn those into a StoreError naming the operation."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        if type(exc) is not Exception:
            raise
        raise StoreError(f"edge store {getattr(fn, '__name__', 'call')} failed: {exc}") from exc
