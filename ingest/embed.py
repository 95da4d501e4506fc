"""Ingest's embed stage: a prepared chunk (ingest/prepare.py) counted into the report, its decoded photos embedded
in batches (and through an active image tail), its texts embedded (and through a fine-tuned text encoder), and
every product built into the point the write stage (ingest/write.py) upserts: vectors, lexical and read-text
sparse vectors, payload. It runs in the run's main thread while the next chunk is prepared and the previous one
written."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from qdrant_client import models
from tqdm import tqdm

from ingest.prepare import Listing, Photo, PhotoCache, Prepared
from retrieval.adapt.heads import ActiveHead, TailHead, adapted_vectors, encoder_twins
from retrieval.encoders.base import ImageEncoder, TextEncoder
from retrieval.lexical import document_vector
from retrieval.ocr import document_vector as read_text_vector
from retrieval.records import build_payload, product_text
from retrieval.store import ADAPTED_VECTORS, IMAGE_VECTOR, LEXICAL_VECTOR, OCR_VECTOR, TEXT_VECTOR
from schemas.report import IngestReport, Rejection


@dataclass
class Embedder:
    """The embed stage of one run: the encoders, the catalogue's active heads and the image batch size."""

    image_encoder: ImageEncoder
    text_encoder: TextEncoder
    heads: dict[str, ActiveHead]
    batch_size: int

    def embed(self, prepared: Prepared, cache: PhotoCache, report: IngestReport, bar: tqdm) -> list[models.PointStruct]:
        """Embed what the preparing stage left to embed and count the chunk; its points are returned for
        the store thread to upsert while the next chunk is embedded."""
        report.read += prepared.read
        report.reject(prepared.rejected)
        report.unchanged += prepared.unchanged
        report.images_embedded += prepared.embedded
        ready = []
        for product in prepared.work:
            report.skip(product.errors)
            if not product.usable and not product.record.title:
                reasons = "; ".join(e.reason for e in product.errors[:3])
                report.reject(
                    [
                        Rejection(
                            line=product.record.line,
                            id=product.record.id,
                            field="image",
                            reason=f"no usable image and no title ({reasons})",
                        )
                    ]
                )
            else:
                ready.append(product)
        points = self._points(ready, cache, report, reads_text=prepared.reads_text)
        for product in ready:
            if product.stored:
                report.updated += 1
            else:
                report.new += 1
        bar.update(prepared.read)
        return points

    def _points(
        self, products: list[Listing], cache: PhotoCache, report: IngestReport, *, reads_text: bool
    ) -> list[models.PointStruct]:
        heads = self.heads
        batch = self.batch_size
        to_embed: list[Photo] = []
        twins: dict[str, list[Photo]] = {}  # the same bytes under several listings of this chunk: embedded once
        for photo in (photo for product in products for photo in product.usable):
            if photo.vector is None and (known := cache.get(photo.digest)) is not None:
                photo.vector, photo.tensor = known, None  # embedded earlier in this run, after this chunk was read
            elif photo.vector is None and photo.digest in twins:
                twins[photo.digest].append(photo)
                photo.tensor = None
            elif photo.vector is None:
                twins[photo.digest] = []
                to_embed.append(photo)
        active = heads.get(IMAGE_VECTOR)
        tail = active if isinstance(active, TailHead) else None
        for start in range(0, len(to_embed), batch):
            group = to_embed[start : start + batch]
            stacked = torch.stack([p.tensor for p in group if p.tensor is not None])
            rows = self.image_encoder.embed_tensors(stacked)
            # An active tail embeds the same tensors again (trunk + tail: a second forward, its trunk
            # features cached for later tails and re-embedding).
            tail_rows: list[np.ndarray | None] = (
                list(tail.embed_tensors(stacked, [p.digest for p in group]))
                if tail is not None
                else [None] * len(group)
            )
            for photo, row, tuned_row in zip(group, rows, tail_rows, strict=True):
                photo.vector, photo.tensor, photo.tuned = row, None, tuned_row
                cache.put(photo.digest, row)
                for twin in twins[photo.digest]:
                    twin.vector, twin.tuned = row, tuned_row
                    twin.read = twin.read if twin.read is not None else photo.read
        report.images_embedded += len(to_embed)
        if tail is not None:  # photos whose raw vector was known: their trunk features are cached, or read again
            reused = [p for product in products for p in product.usable if p.tuned is None]
            for photo, tuned_row in zip(
                reused, tail.embed_stored([p.ref for p in reused], [p.digest for p in reused]), strict=True
            ):
                photo.tuned = tuned_row
        texts = [product_text(p.record) for p in products]
        text_vectors = self.text_encoder.embed_texts([t for t in texts if t])
        tuned = encoder_twins(heads, [t for t in texts if t])  # a fine-tuned text encoder's twins, if active
        points, text_at = [], 0
        for product, text in zip(products, texts, strict=True):
            vector: dict[str, models.Vector] = {}
            photos = product.usable
            if photos:
                vector[IMAGE_VECTOR] = [np.asarray(p.vector).tolist() for p in photos]
            if tail is not None and (through_tail := [p.tuned.tolist() for p in photos if p.tuned is not None]):
                vector[ADAPTED_VECTORS[IMAGE_VECTOR]] = through_tail
            if text:
                vector[TEXT_VECTOR] = text_vectors[text_at].tolist()
                if tuned is not None:
                    vector[ADAPTED_VECTORS[TEXT_VECTOR]] = tuned[text_at].tolist()
                text_at += 1
            vector.update(adapted_vectors(vector, heads))
            if lexical := document_vector(product.record):
                vector[LEXICAL_VECTOR] = lexical
            reads = [p.read or "" for p in photos] if reads_text else []
            if reads_text and (printed := read_text_vector(reads, product.record.title, product.record.brand)):
                vector[OCR_VECTOR] = printed
            payload = build_payload(
                product.record,
                images=[p.ref for p in photos],
                image_hashes=[p.digest for p in photos],
                image_files=[p.signature for p in photos],
                image_text=reads,
                digest=product.digest,
            )
            points.append(models.PointStruct(id=product.point_id, vector=vector, payload=payload.model_dump()))
        return points
