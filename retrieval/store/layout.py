"""One catalogue's collection layout, which both engines are configured from: vector names, payload indexes,
the encoder fingerprint kept in the collection's metadata (a leaf: no client, no engine)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, TypeVar, cast

from qdrant_client import models

IMAGE_VECTOR = "image"
TEXT_VECTOR = "text"
LEXICAL_VECTOR = "lexical"
OCR_VECTOR = "ocr"  # trigrams of the text read off a product's photos, its title and brand (retrieval/ocr.py)
# An adaptation head's output for the raw vector of the same modality (retrieval/adapt/heads.py).
ADAPTED_VECTORS = {IMAGE_VECTOR: "image_adapted", TEXT_VECTOR: "text_adapted"}
LAYOUT_VERSION = 4  # 2: + the `lexical` sparse vector; 3: + the adapted vectors; 4: + the `ocr` sparse vector
READABLE_LAYOUTS = (2, 3, 4)  # older layouts search as before; adaptation needs 3, reading package text 4
READS_TEXT_FROM = 4  # the first layout with the `ocr` vector
DENSE_VECTORS = frozenset({IMAGE_VECTOR, TEXT_VECTOR, *ADAPTED_VECTORS.values()})
HIDDEN_PREFIX = "_"  # collections of the tool's own (adaptation heads); a catalogue name cannot start so

# Every field a query can filter on gets an index (a server needs them; local mode ignores them).
PAYLOAD_INDEXES: dict[str, models.PayloadSchemaType] = {
    "product_id": models.PayloadSchemaType.KEYWORD,
    "retailer": models.PayloadSchemaType.KEYWORD,
    "brand": models.PayloadSchemaType.KEYWORD,
    "gtin": models.PayloadSchemaType.KEYWORD,
    "mpn": models.PayloadSchemaType.KEYWORD,
    "category_path": models.PayloadSchemaType.KEYWORD,
    "category_prefixes": models.PayloadSchemaType.KEYWORD,
    "currency": models.PayloadSchemaType.KEYWORD,
    "price": models.PayloadSchemaType.FLOAT,
    "image_hashes": models.PayloadSchemaType.KEYWORD,
}


# Qdrant's RRF constant: 1 / (k + 0-based rank) on a server and in local mode; edge's Fusion.Rrf has no
# default, so the request builder and the edge adapter both spell it out, to rank alike on every engine.
RRF_K = 2
SHARD_DIR = "shard"  # the edge engine's shard, one sub-folder of the catalogue's folder


def plain_vector(v: Sequence[float] | Sequence[Sequence[float]]) -> list[float] | list[list[float]]:
    """Plain float lists from lists, tuples or numpy arrays; rows make a multivector."""
    if len(v) and hasattr(v[0], "__len__"):
        return [[float(x) for x in row] for row in cast(Sequence[Sequence[float]], v)]
    return [float(x) for x in cast(Sequence[float], v)]


class Encoder(Protocol):
    """What a fingerprint needs of an encoder (both encoder protocols have it)."""

    name: str
    dim: int


class StoredState(NamedTuple):
    """A stored product as incremental ingest sees it."""

    content_hash: str
    files: dict[tuple[str, str], str]  # (local photo path, 'size:mtime_ns') -> sha256 of its bytes


@dataclass(frozen=True)
class CollectionMeta:
    """What a catalogue's collection metadata says: its encoders, layout and active adaptation heads."""

    fingerprint: EncoderFingerprint
    layout: int
    adapters: dict[str, int]  # modality (`image`, `text`) -> version of the head queries go through
    reads_text: bool | None = None  # OCR of photos: on, off, or not decided yet (no photo ingested)


@dataclass(frozen=True)
class EncoderFingerprint:
    """Which encoders (name = model + weights) produced a collection's vectors, and their widths."""

    image: str
    image_dim: int
    text: str
    text_dim: int

    def as_metadata(self) -> dict[str, Any]:
        return {
            "layout_version": LAYOUT_VERSION,
            "image_encoder": self.image,
            "image_dim": self.image_dim,
            "text_encoder": self.text,
            "text_dim": self.text_dim,
        }

    @classmethod
    def of(cls, image_encoder: Encoder, text_encoder: Encoder) -> EncoderFingerprint:
        return cls(image_encoder.name, image_encoder.dim, text_encoder.name, text_encoder.dim)

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any] | None) -> EncoderFingerprint | None:
        try:
            meta = metadata or {}
            return cls(meta["image_encoder"], int(meta["image_dim"]), meta["text_encoder"], int(meta["text_dim"]))
        except (KeyError, TypeError, ValueError):
            return None


def layout_sparse() -> dict[str, models.SparseVectorParams]:
    """The sparse named vectors of a catalogue: `lexical` terms and `ocr` trigrams, which the engine weighs
    by inverse document frequency (kept up to date as data changes)."""
    return {name: models.SparseVectorParams(modifier=models.Modifier.IDF) for name in (LEXICAL_VECTOR, OCR_VECTOR)}


def layout_vectors(encoders: EncoderFingerprint, *, on_disk: bool | None = None) -> dict[str, models.VectorParams]:
    """The dense named vectors of a catalogue: photos as one multivector per product (MAX_SIM: the best
    photo counts), the product text, and each one's adapted twin (filled only while a head is active).
    `on_disk`: a server keeps the original vectors memory-mapped (None: the engine's default)."""
    photos = models.VectorParams(
        size=encoders.image_dim,
        distance=models.Distance.COSINE,
        multivector_config=models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM),
        on_disk=on_disk,
    )
    text = models.VectorParams(size=encoders.text_dim, distance=models.Distance.COSINE, on_disk=on_disk)
    return {
        IMAGE_VECTOR: photos,
        TEXT_VECTOR: text,
        ADAPTED_VECTORS[IMAGE_VECTOR]: photos,
        ADAPTED_VECTORS[TEXT_VECTOR]: text,
    }


@dataclass(frozen=True)
class StorageLayout:
    """How a new catalogue's collection is laid out: on a Qdrant server (QDRANT_SHARDS, QDRANT_REPLICAS,
    QDRANT_WRITE_CONSISTENCY, QDRANT_ON_DISK, QDRANT_QUANTIZATION; the defaults are the server's own), and
    on the embedded edge engine, which takes the last two (`edge_config`)."""

    shards: int = 1
    replicas: int = 1
    write_consistency: int = 1
    on_disk: bool = False
    quantization: str = "none"  # or "int8"
    oversampling: float = 2.0  # quantized candidates per result that are rescored with the original vectors

    def collection_options(self) -> dict[str, Any]:
        """Keyword arguments of `create_collection` beyond the vectors (empty: the server's defaults)."""
        options: dict[str, Any] = {}
        if self.shards != 1:
            options["shard_number"] = self.shards
        if self.replicas != 1:
            options["replication_factor"] = self.replicas
        if self.write_consistency != 1:
            options["write_consistency_factor"] = self.write_consistency
        if self.on_disk:
            options["on_disk_payload"] = True
        if self.quantization == "int8":
            options["quantization_config"] = models.ScalarQuantization(
                scalar=models.ScalarQuantizationConfig(type=models.ScalarType.INT8, quantile=0.99, always_ram=True)
            )
        return options

    def search_params(self) -> models.SearchParams | None:
        """What every dense ranking of a collection laid out so asks: `rescoring()` when quantized, else
        nothing beyond the engine's defaults."""
        return self.rescoring() if self.quantization == "int8" else None

    def rescoring(self) -> models.SearchParams:
        """What every dense ranking of a quantized collection asks: rescoring, always, with oversampling."""
        return models.SearchParams(
            quantization=models.QuantizationSearchParams(rescore=True, oversampling=self.oversampling)
        )


Ranked = TypeVar("Ranked", models.QueryRequest, models.Prefetch)


def rescored(ranking: Ranked, params: models.SearchParams) -> Ranked:
    """The request with every dense ranking in it (itself, its prefetches) asking for `params`: on a
    quantized collection, candidates found on the int8 vectors are rescored with the original ones."""
    prefetch = ranking.prefetch
    nested = [prefetch] if isinstance(prefetch, models.Prefetch) else list(prefetch or [])
    update: dict[str, Any] = {"prefetch": [rescored(p, params) for p in nested] if nested else prefetch}
    if ranking.using in DENSE_VECTORS and ranking.params is None:
        update["params"] = params
    return ranking.model_copy(update=update)
