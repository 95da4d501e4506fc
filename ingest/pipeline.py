"""The ingest runner: records -> read image bytes -> skip unchanged -> decode -> embed (batched) -> upsert."""

from __future__ import annotations

import hashlib
import itertools
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx
import numpy as np
import torch
from qdrant_client import models
from tqdm import tqdm

from ingest.readers import validated_records
from ingest.sources import URL_TIMEOUT_S, SourceError, read_ref, resolve_ref
from retrieval.encoders.base import ImageEncoder, TextEncoder
from retrieval.images import ImageDecodeError, decode_image
from retrieval.lexical import document_vector
from retrieval.records import build_payload, content_hash, point_id, product_text
from retrieval.settings import Settings
from retrieval.store import IMAGE_VECTOR, LEXICAL_VECTOR, TEXT_VECTOR, EncoderFingerprint, ProductStore
from schemas.catalogue import CatalogueRecord
from schemas.report import IngestReport, Rejection

T = TypeVar("T")
CHUNK_SIZE = 256  # records read, checked against the store and upserted together


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


@dataclass
class Product:
    """A validated record on its way to the store."""

    record: CatalogueRecord
    point_id: str
    refs: list[str] = field(default_factory=list)
    blobs: list[bytes | None] = field(default_factory=list)
    errors: list[Rejection] = field(default_factory=list)
    digest: str = ""
    tensors: list[torch.Tensor] = field(default_factory=list)
    used_refs: list[str] = field(default_factory=list)

    def image_error(self, ref: str, reason: str) -> None:
        self.errors.append(
            Rejection(line=self.record.line, id=self.record.id, field="image", reason=f"{ref}: {reason}")
        )


class Ingestor:
    """Holds the encoders, the store and the worker pools for one or more ingest runs."""

    def __init__(
        self, settings: Settings, store: ProductStore, image_encoder: ImageEncoder, text_encoder: TextEncoder
    ) -> None:
        self.settings = settings
        self.store = store
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.fingerprint = EncoderFingerprint.of(image_encoder, text_encoder)

    def run(self, path: Path, catalogue: str, *, progress: bool | None = None) -> IngestReport:
        """Ingest one catalogue file; rows that break the contract are reported, the rest lands."""
        started = time.perf_counter()
        path = path.resolve()
        report = IngestReport(catalogue=catalogue, source=str(path))
        records = validated_records(path)
        first = next(records, None)  # surfaces a file-level CatalogueError before touching the store
        self.store.ensure_catalogue(catalogue, self.fingerprint)
        show = sys.stderr.isatty() if progress is None else progress
        bar = tqdm(desc=f"ingest {catalogue}", unit="product", disable=not show, file=sys.stderr)
        stream = itertools.chain([first], records) if first is not None else iter(())
        with (
            ThreadPoolExecutor(self.settings.decode_workers, thread_name_prefix="decode") as pool,
            httpx.Client(timeout=URL_TIMEOUT_S, follow_redirects=True) as http,
        ):
            for chunk in chunked(stream, CHUNK_SIZE):
                report.read += len(chunk)
                report.rejected_rows += [r for r in chunk if isinstance(r, Rejection)]
                products = [Product(r, point_id(r.retailer, r.id)) for r in chunk if isinstance(r, CatalogueRecord)]
                self._ingest_chunk(products, catalogue, path.parent, pool, http, report)
                bar.update(len(chunk))
        bar.close()
        report.seconds = round(time.perf_counter() - started, 3)
        return report

    def _ingest_chunk(
        self,
        products: list[Product],
        catalogue: str,
        base_dir: Path,
        pool: ThreadPoolExecutor,
        http: httpx.Client,
        report: IngestReport,
    ) -> None:
        list(pool.map(lambda p: self._read_images(p, base_dir, http), products))
        stored = self.store.content_hashes(catalogue, [p.point_id for p in products])
        todo = []
        for product in products:
            if stored.get(product.point_id) == product.digest:
                report.unchanged += 1
            else:
                todo.append(product)
        list(pool.map(self._decode, todo))
        ready = []
        for product in todo:
            report.skipped_images += product.errors
            if not product.tensors and not product.record.title:
                reasons = "; ".join(e.reason for e in product.errors[:3])
                report.rejected_rows.append(
                    Rejection(
                        line=product.record.line,
                        id=product.record.id,
                        field="image",
                        reason=f"no usable image and no title ({reasons})",
                    )
                )
            else:
                ready.append(product)
        report.images_embedded += sum(len(p.tensors) for p in ready)
        self.store.upsert(catalogue, self._embed(ready))
        for product in ready:
            if product.point_id in stored:
                report.updated += 1
            else:
                report.new += 1

    def _read_images(self, product: Product, base_dir: Path, http: httpx.Client) -> None:
        digests: list[str | None] = []
        for ref in product.record.images:
            try:
                resolved = resolve_ref(ref, base_dir)
                blob = read_ref(resolved, client=http)
            except SourceError as exc:
                product.image_error(ref, str(exc))
                product.refs.append(ref)
                product.blobs.append(None)
                digests.append(None)
                continue
            product.refs.append(resolved)
            product.blobs.append(blob)
            digests.append(hashlib.sha256(blob).hexdigest())
        product.digest = content_hash(product.record, digests)

    def _decode(self, product: Product) -> None:
        for ref, blob in zip(product.refs, product.blobs, strict=True):
            if blob is None:
                continue
            try:
                image = decode_image(blob, max_pixels=self.settings.max_image_pixels)
            except ImageDecodeError as exc:
                product.image_error(ref, str(exc))
                continue
            product.tensors.append(self.image_encoder.preprocess(image))
            product.used_refs.append(ref)
        product.blobs = []  # the bytes are not needed any more

    def _embed(self, products: list[Product]) -> list[models.PointStruct]:
        batch = self.settings.batch_size
        flat = [t for p in products for t in p.tensors]
        image_rows = [
            self.image_encoder.embed_tensors(torch.stack(flat[i : i + batch])) for i in range(0, len(flat), batch)
        ]
        image_vectors = np.concatenate(image_rows) if image_rows else np.empty((0, self.image_encoder.dim))
        texts = [product_text(p.record) for p in products]
        text_vectors = self.text_encoder.embed_texts([t for t in texts if t])
        points, image_at, text_at = [], 0, 0
        for product, text in zip(products, texts, strict=True):
            vector: dict[str, models.Vector] = {}
            n = len(product.tensors)
            if n:
                vector[IMAGE_VECTOR] = image_vectors[image_at : image_at + n].tolist()
                image_at += n
            if text:
                vector[TEXT_VECTOR] = text_vectors[text_at].tolist()
                text_at += 1
            if lexical := document_vector(product.record):
                vector[LEXICAL_VECTOR] = lexical
            payload = build_payload(product.record, images=product.used_refs, digest=product.digest)
            points.append(models.PointStruct(id=product.point_id, vector=vector, payload=payload.model_dump()))
            product.tensors = []
        return points
