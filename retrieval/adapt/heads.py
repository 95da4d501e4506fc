"""Adaptation heads: a small learned map on top of a frozen encoder's vectors, stored with the catalogue.

A head takes a modality's raw vectors (the `image` photos or the `text` vector) to the adapted space. While
a head is active for a modality, every point holds the head's output in the adapted twin vector
(`image_adapted`, `text_adapted`), written from the stored raw vectors (no photo is decoded again), new
products get it at ingest, and queries go through the same head and search the twin. Heads are versioned
in a hidden collection beside the catalogue (`_adapters.<catalogue>`); the collection metadata names the
active version per modality and the ones active before it, so rolling back is one step.

A text head can also be a fine-tuned text encoder (kind `encoder`): its record names a model folder by the
SHA-256 digest it is kept under (retrieval/weights.py, MODELS_PATH); the twin `text_adapted` is then every
product's text (rebuilt from the payload) embedded again by that model, and a text query is embedded by it
rather than by the base model. Every process loads the model from the record and checks the digest.

An image head can be the backbone's last blocks fine-tuned (kind `tail`, retrieval/adapt/finetune_image.py):
its model folder holds the tail's weights, `image_adapted` is every stored photo through the frozen trunk
and the tail (the trunk's features cached on disk by the photo's sha256, so a photo seen by training or an
earlier ingest is not decoded again), and a query photo (and its crops) is embedded by trunk + tail.

Activation first switches the modality off (queries use the raw vectors), rewrites every point, then
switches the new version on: an interrupted activation leaves the catalogue searchable on raw vectors,
never on a mix of two heads."""

from __future__ import annotations

import base64
import io
import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import ValidationError
from qdrant_client import models

from retrieval.encoders.base import EncoderError, ImageEncoder, TextEncoder
from retrieval.records import TEXT_FIELDS, payload_text, stored_photos
from retrieval.settings import Settings
from retrieval.store import (
    ADAPTED_VECTORS,
    HIDDEN_PREFIX,
    IMAGE_VECTOR,
    TEXT_VECTOR,
    CollectionMeta,
    ProductStore,
    StoreError,
)
from retrieval.weights import ModelFolderError, kept_model
from schemas.adapters import AdapterRecord, HeadKind

if TYPE_CHECKING:
    from PIL import Image

    from retrieval.adapt.tail import TailEncoder, TrunkCache

log = logging.getLogger(__name__)
HEADS_NAMESPACE = uuid.UUID("6f1c2a52-5d7e-4c1b-9a51-0c6a3f1f7a10")
PAGE = 256


class AdapterError(StoreError):
    """An adaptation cannot be done as asked; the message says why and what to do."""


@dataclass
class Head:
    """`linear`: y = W x + b (W starts as the identity); `mlp`: y = x + W2 gelu(W1 x + b1) + b2 (starts as
    the identity too). Outputs are unit vectors, like the encoders'."""

    kind: HeadKind
    arrays: dict[str, np.ndarray]
    _tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def dim(self) -> int:
        return int(self.arrays["weight" if self.kind == "linear" else "w2"].shape[0])

    @classmethod
    def from_module(cls, kind: HeadKind, module: torch.nn.Module) -> Head:
        state = {name: value.detach().cpu().numpy().astype(np.float32) for name, value in module.state_dict().items()}
        return cls(kind, state)

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(rows, dtype=np.float32)
        if self.kind == "linear":  # numpy: a query's head runs on a request thread, which stays torch-free
            y = x @ self.arrays["weight"].T + self.arrays["bias"]
        else:
            if not self._tensors:
                self._tensors = {name: torch.from_numpy(value) for name, value in self.arrays.items()}
            t = self._tensors
            with torch.inference_mode():
                hidden = torch.nn.functional.gelu(torch.from_numpy(x) @ t["w1"].T + t["b1"])
                y = (torch.from_numpy(x) + hidden @ t["w2"].T + t["b2"]).numpy()
        norms = np.linalg.norm(y, axis=1, keepdims=True)
        return np.asarray(y / np.maximum(norms, 1e-12), dtype=np.float32)

    def encode(self) -> str:
        buffer = io.BytesIO()
        np.savez(buffer, allow_pickle=False, **self.arrays)
        return base64.b64encode(buffer.getvalue()).decode("ascii")

    @classmethod
    def decode(cls, kind: HeadKind, blob: str) -> Head:
        with np.load(io.BytesIO(base64.b64decode(blob))) as arrays:
            return cls(kind, {name: arrays[name].astype(np.float32) for name in arrays.files})


@dataclass(frozen=True)
class EncoderHead:
    """A fine-tuned text encoder as the text head: it embeds texts (a query, a product's stored text)
    instead of mapping the base model's vectors."""

    digest: str  # of the kept model folder
    encoder: TextEncoder
    kind: HeadKind = "encoder"

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.encoder.embed_texts(texts)


@dataclass(frozen=True)
class TailHead:
    """The image backbone's fine-tuned tail as the image head: photos (decoded, or their cached trunk
    features) are embedded by trunk + tail instead of mapping the base backbone's vectors."""

    digest: str  # of the kept model folder
    encoder: TailEncoder
    cache: TrunkCache
    kind: HeadKind = "tail"

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Decoded photos (a query photo and its crops) through trunk + tail, in one forward."""
        return self.encoder.embed_tensors(torch.stack([self.encoder.preprocess(image) for image in images]))

    def embed_tensors(self, batch: torch.Tensor, digests: Sequence[str]) -> np.ndarray:
        """Preprocessed photos (at ingest) through trunk + tail, their trunk features kept in the cache."""
        return self.encoder.tail.embed(self.cache.compute(batch, digests))

    def embed_stored(self, refs: Sequence[str], digests: Sequence[str]) -> list[np.ndarray | None]:
        """Stored photos by their payload refs and digests (see `TrunkCache.of_stored`): None where a photo
        can be neither found in the cache nor read again."""
        from retrieval.adapt.tail import stack_features

        features, present = stack_features(self.cache.of_stored(refs, digests), self.cache.trunk.shape)
        out: list[np.ndarray | None] = [None] * len(refs)
        for i, row in zip(present, self.encoder.tail.embed(features), strict=True):
            out[int(i)] = row
        return out


# What a modality's active version is: a map on the raw vectors, a fine-tuned text encoder, or (image) a
# fine-tuned backbone tail.
ActiveHead = Head | EncoderHead | TailHead


def load_kept_encoder(root: Path, digest: str, *, precision: str = "auto") -> TextEncoder:
    """The sentence-transformers model kept under `digest`, its files checked against it first."""
    from retrieval.encoders.sentence import SentenceTextEncoder

    try:
        folder = kept_model(root, digest)
        return SentenceTextEncoder(str(folder), precision=precision)
    except (ModelFolderError, EncoderError) as exc:
        raise AdapterError(f"fine-tuned text encoder {digest[:12]}: {exc}") from exc


def trunk_cache_root(settings: Settings) -> Path:
    """Where trunk features are cached: beside the store, as the adaptation photo cache is."""
    return settings.store_path.parent / "cache" / "trunk"


def head_collection(catalogue: str) -> str:
    return f"{HIDDEN_PREFIX}adapters.{catalogue}"


def _head_id(modality: str, version: int) -> str:
    return str(uuid.uuid5(HEADS_NAMESPACE, f"{modality}/{version}"))


# Called with (points rewritten so far, points in the catalogue).
Progress = Callable[[int, int], None]


class Adapters:
    """The heads of the catalogues in one store: saved, listed, loaded (cached), activated, rolled back.
    `models_root`: where fine-tuned encoders are kept (default: the settings' MODELS_PATH); `precision`:
    what they run in (as TEXT_PRECISION)."""

    def __init__(
        self,
        store: ProductStore,
        *,
        models_root: Path | None = None,
        precision: str = "auto",
        image_encoder: Callable[[], ImageEncoder] | None = None,
        cache_root: Path | None = None,
        max_pixels: int | None = None,
    ) -> None:
        self.store = store
        self._models_root = models_root
        self.precision = precision
        # A fine-tuned tail is loaded onto the process's image encoder (asked for only then: loading one is
        # seconds) and caches trunk features under cache_root (default: the settings' store folder/cache).
        self._image_encoder = image_encoder
        self._cache_root = cache_root
        self._max_pixels = max_pixels
        self._heads: dict[tuple[str, str, int], ActiveHead] = {}
        self._models: dict[str, TextEncoder] = {}  # digest -> the loaded model, shared by its versions
        self._tails: dict[str, TailHead] = {}
        self._lock = threading.Lock()
        self._loading = threading.Lock()

    @property
    def models_root(self) -> Path:
        if self._models_root is None:
            self._models_root = Settings().models_root
        return self._models_root

    # -- stored heads --------------------------------------------------------------------------------------

    def records(self, catalogue: str) -> list[AdapterRecord]:
        name = head_collection(catalogue)
        self.store.info(catalogue)  # CatalogueNotFound for an unknown catalogue
        if not self.store.has_collection(name):
            return []
        pages = self.store.scroll_pages(name, page=PAGE, with_payload=list(AdapterRecord.model_fields))
        found = [AdapterRecord.model_validate(p.payload) for points in pages for p in points]
        return sorted(found, key=lambda r: (r.modality, r.version))

    def save(self, record: AdapterRecord, head: Head | None = None) -> AdapterRecord:
        """Store a head as the next version of its modality (the record's version is replaced). A fine-tuned
        encoder's record needs no head: its model must be kept under the record's digest already."""
        info = self.require_slots(record.catalogue)
        if record.model is not None:  # refused here, before a version names a missing or altered folder
            self._tail(record.model) if record.kind == "tail" else self._model(record.model)
        elif head is None:
            raise AdapterError(f"a {record.kind} head is stored with its weights")
        name = head_collection(record.catalogue)
        self.store.ensure_side_collection(name, info.fingerprint, owner=record.catalogue)
        taken = [r.version for r in self.records(record.catalogue) if r.modality == record.modality]
        saved = record.model_copy(update={"version": max(taken, default=0) + 1})
        payload: dict[str, Any] = saved.model_dump(mode="json")
        if head is not None and record.model is None:
            payload["weights"] = head.encode()
        self.store.upsert(
            name, [models.PointStruct(id=_head_id(saved.modality, saved.version), vector={}, payload=payload)]
        )
        return saved

    def load(self, catalogue: str, modality: str, version: int) -> ActiveHead:
        key = (catalogue, modality, version)
        with self._lock:
            if key in self._heads:
                return self._heads[key]
        name = head_collection(catalogue)
        found = []
        if self.store.has_collection(name):
            found = self.store.retrieve(name, [_head_id(modality, version)])
        if not found or not found[0].payload:
            raise AdapterError(f"catalogue {catalogue!r} has no {modality} head version {version}")
        payload = found[0].payload
        try:
            record = AdapterRecord.model_validate(payload)
        except ValidationError as exc:
            raise AdapterError(f"catalogue {catalogue!r}: {modality} head version {version} is unreadable") from exc
        head: ActiveHead
        if record.model is not None and record.kind == "tail":
            head = self._tail(record.model)
        elif record.model is not None:
            head = EncoderHead(record.model, self._model(record.model))
        elif isinstance(weights := payload.get("weights"), str):
            head = Head.decode(record.kind, weights)
        else:
            raise AdapterError(f"catalogue {catalogue!r}: {modality} head version {version} has no weights")
        with self._lock:
            self._heads[key] = head
        return head

    def _model(self, digest: str) -> TextEncoder:
        """The fine-tuned encoder kept under `digest`, loaded (and its folder checked) once per digest."""
        with self._loading:
            if digest not in self._models:
                self._models[digest] = load_kept_encoder(self.models_root, digest, precision=self.precision)
            return self._models[digest]

    def _tail(self, digest: str) -> TailHead:
        """The image tail kept under `digest` on this process's image encoder (folder and fit checked)."""
        from retrieval.adapt.tail import TailEncoder, TailError, TrunkCache, load_tail
        from retrieval.encoders.timm_backbone import TimmImageEncoder

        with self._loading:
            if digest not in self._tails:
                encoder = self._image_encoder() if self._image_encoder is not None else None
                encoder = getattr(encoder, "reference", encoder)  # on ONNX Runtime: its torch model
                if not isinstance(encoder, TimmImageEncoder):
                    raise AdapterError(
                        f"image tail {digest[:12]}: it runs on the timm image encoder it was trained on, loaded in "
                        "this process (not on Ray workers: ingest this catalogue without --workers)"
                    )
                try:
                    trunk, tail = load_tail(kept_model(self.models_root, digest), encoder)
                except (ModelFolderError, TailError) as exc:
                    raise AdapterError(f"image tail {digest[:12]}: {exc}") from exc
                if self._cache_root is None or self._max_pixels is None:
                    defaults = Settings()
                    self._cache_root = self._cache_root or trunk_cache_root(defaults)
                    self._max_pixels = self._max_pixels or defaults.max_image_pixels
                cache = TrunkCache(trunk, self._cache_root, max_pixels=self._max_pixels)
                self._tails[digest] = TailHead(digest, TailEncoder(trunk, tail, name=f"tail:{digest[:12]}"), cache)
            return self._tails[digest]

    def image_model(self, catalogue: str, active: dict[str, int] | None = None) -> TailHead | None:
        """The catalogue's fine-tuned image tail when it is the active image head (its query photos are
        embedded by it), else None."""
        versions = self.store.info(catalogue).adapters if active is None else active
        if (version := versions.get(IMAGE_VECTOR)) is None:
            return None
        head = self.load(catalogue, IMAGE_VECTOR, version)
        return head if isinstance(head, TailHead) else None

    def active_heads(self, catalogue: str, active: dict[str, int] | None = None) -> dict[str, ActiveHead]:
        """Raw vector name -> the head its queries and new points go through."""
        versions = self.store.info(catalogue).adapters if active is None else active
        return {modality: self.load(catalogue, modality, version) for modality, version in versions.items()}

    def text_model(self, catalogue: str, active: dict[str, int] | None = None) -> EncoderHead | None:
        """The catalogue's fine-tuned text encoder when one is the active text head (its queries are embedded
        by it), else None."""
        versions = self.store.info(catalogue).adapters if active is None else active
        if (version := versions.get(TEXT_VECTOR)) is None:
            return None
        head = self.load(catalogue, TEXT_VECTOR, version)
        return head if isinstance(head, EncoderHead) else None

    def active_labels(self, catalogue: str) -> dict[str, str]:
        """Modality -> what its active version is, e.g. {"text": "encoder v2 1a2b3c4d5e6f"}."""
        active = self.store.info(catalogue).adapters
        return {r.modality: r.label for r in self.records(catalogue) if active.get(r.modality) == r.version}

    def require_slots(self, catalogue: str) -> CollectionMeta:
        info = self.store.info(catalogue)
        if info.layout < 3:
            raise AdapterError(
                f"catalogue {catalogue!r} was created before adapted vectors existed (layout {info.layout}): "
                "ingest it again under a new name to adapt it"
            )
        return info

    # -- activation ----------------------------------------------------------------------------------------

    def activate(self, catalogue: str, modality: str, version: int | None, *, progress: Progress | None = None) -> int:
        """Make `version` the modality's active head (None: none, queries use the raw vectors); the version
        active before is remembered for `rollback`. Returns the points rewritten."""
        active = self.store.info(catalogue).adapters
        current = active.get(modality)
        history = self._history(catalogue)
        if current is not None and current != version:
            history[modality] = [*history.get(modality, []), current]
        return self._switch(catalogue, modality, version, history, progress)

    def rollback(self, catalogue: str, modality: str, *, progress: Progress | None = None) -> int | None:
        """Back to the head active before the current one (or to none); returns the version now active."""
        history = self._history(catalogue)
        earlier = history.get(modality, [])
        if self.store.info(catalogue).adapters.get(modality) is None and not earlier:
            raise AdapterError(f"catalogue {catalogue!r} has no active {modality} head to roll back")
        version = earlier.pop() if earlier else None
        history[modality] = earlier
        self._switch(catalogue, modality, version, history, progress)
        return version

    def _history(self, catalogue: str) -> dict[str, list[int]]:
        stored = self.store.metadata(catalogue).get("adapter_history") or {}
        return {str(k): [int(v) for v in values] for k, values in stored.items()}

    def _switch(
        self,
        catalogue: str,
        modality: str,
        version: int | None,
        history: dict[str, list[int]],
        progress: Progress | None,
    ) -> int:
        if modality not in ADAPTED_VECTORS:
            raise AdapterError(f"no adapted vector for {modality!r}: use one of {', '.join(ADAPTED_VECTORS)}")
        active = dict(self.store.info(catalogue).adapters)
        head = self.load(catalogue, modality, version) if version is not None else None
        active.pop(modality, None)
        self._set(catalogue, active, history)  # off while the points are rewritten
        rewritten = 0
        if head is not None:
            self.require_slots(catalogue)
            rewritten = rewrite_adapted(self.store, catalogue, modality, head, progress=progress)
            self.store.compact(catalogue)  # a quantized catalogue's rewritten twins get their int8 copies
            active[modality] = version  # type: ignore[assignment]  # version is not None with a head
            self._set(catalogue, active, history)
        return rewritten

    def _set(self, catalogue: str, active: dict[str, int], history: dict[str, list[int]]) -> None:
        self.store.update_metadata(
            catalogue,
            {
                "adapters": {modality: active.get(modality) for modality in ADAPTED_VECTORS},
                "adapter_history": history,
            },
        )


def adapted_vectors(vector: dict[str, Any], heads: dict[str, ActiveHead]) -> dict[str, Any]:
    """The adapted twins of a point's raw vectors, for the modalities whose active head maps vectors (a
    fine-tuned encoder's twin comes from the text, `encoder_twins`; a tail's from the photos)."""
    out: dict[str, Any] = {}
    for modality, head in heads.items():
        raw = vector.get(modality)
        if not raw or not isinstance(head, Head):
            continue
        rows = np.asarray(raw, dtype=np.float32)
        adapted = head(rows if rows.ndim == 2 else rows[None, :])
        out[ADAPTED_VECTORS[modality]] = adapted.tolist() if rows.ndim == 2 else adapted[0].tolist()
    return out


def encoder_twins(heads: dict[str, ActiveHead], texts: Sequence[str]) -> np.ndarray | None:
    """The products' texts embedded by the active fine-tuned text encoder (their `text_adapted`), or None
    when the text head is not one."""
    head = heads.get(TEXT_VECTOR)
    return head.embed_texts(texts) if isinstance(head, EncoderHead) else None


def rewrite_adapted(
    store: ProductStore, catalogue: str, modality: str, head: ActiveHead, *, progress: Progress | None = None
) -> int:
    """Write head(raw) into the adapted twin of every point of the catalogue, page by page (a fine-tuned
    encoder: the product's text embedded by it). Only the twin is written: payloads and the other vectors
    are not touched (an ingest's payload update between the read and the write is not undone)."""
    if isinstance(head, EncoderHead):
        return _reembed_texts(store, catalogue, head, progress)
    if isinstance(head, TailHead):
        return _reembed_photos(store, catalogue, head, progress)
    total = store.count(catalogue)
    done = 0
    for points in store.scroll_pages(catalogue, page=PAGE, with_payload=False, with_vectors=[modality]):
        batch = []
        for point in points:
            twin = adapted_vectors(point.vector if isinstance(point.vector, dict) else {}, {modality: head})
            if twin:
                batch.append(models.PointVectors(id=point.id, vector=twin))
        store.update_vectors(catalogue, batch)
        done += len(points)
        if progress:
            progress(done, total)
    return done


def _reembed_texts(store: ProductStore, catalogue: str, head: EncoderHead, progress: Progress | None) -> int:
    total = store.count(catalogue)
    done = 0
    twin = ADAPTED_VECTORS[TEXT_VECTOR]
    for points in store.scroll_pages(catalogue, page=PAGE, with_payload=list(TEXT_FIELDS), with_vectors=False):
        texts = [(point.id, text) for point in points if (text := payload_text(point.payload or {}))]
        rows = head.embed_texts([text for _, text in texts])
        store.update_vectors(
            catalogue,
            [
                models.PointVectors(id=pid, vector={twin: row.tolist()})
                for (pid, _), row in zip(texts, rows, strict=True)
            ],
        )
        done += len(points)
        if progress:
            progress(done, total)
    return done


def _reembed_photos(store: ProductStore, catalogue: str, head: TailHead, progress: Progress | None) -> int:
    """Every point's photos through the tail (their cached trunk features, else the local file again). A
    point none of whose photos can be had loses its twin rather than keep an earlier head's, and is
    counted in the log: it is still found by text, and by photo once ingested again."""
    total = store.count(catalogue)
    done = missing = 0
    twin = ADAPTED_VECTORS[IMAGE_VECTOR]
    for points in store.scroll_pages(catalogue, page=PAGE, with_payload=["images", "image_hashes"]):
        batch: list[models.PointVectors] = []
        lost: list[str | int] = []
        for point in points:
            refs, digests = stored_photos(point.payload or {})
            if not refs:
                continue
            rows = [row for row in head.embed_stored(refs, digests) if row is not None]
            if rows:
                batch.append(models.PointVectors(id=point.id, vector={twin: [row.tolist() for row in rows]}))
            else:
                lost.append(str(point.id) if not isinstance(point.id, int) else point.id)
        store.update_vectors(catalogue, batch)
        store.delete_vectors(catalogue, [twin], lost)
        missing += len(lost)
        done += len(points)
        if progress:
            progress(done, total)
    if missing:
        log.warning(
            "%s: %d products have no photo the tail could read again (URL photos are not fetched)", catalogue, missing
        )
    return done
