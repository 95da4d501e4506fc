"""The ingest runner: records -> read image bytes -> skip unchanged -> reuse or decode -> embed -> upsert.

Chunks flow through two stages that overlap: while the main thread embeds and stores chunk N, a
preparing thread reads, hashes, checks against the store and decodes chunk N+1 (its own decode threads
in a pool), so the encoder is not left waiting on files or JPEG decoding."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import shutil
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from qdrant_client import models
from tqdm import tqdm

from ingest.inputs import CatalogueInput, open_input
from ingest.readers import validate_rows
from ingest.sources import FetchCancelled, OutsideRoot, PhotoAccess, SourceError, UrlFetcher, file_signature
from retrieval.adapt.heads import ActiveHead, Adapters, TailHead, adapted_vectors, encoder_twins, trunk_cache_root
from retrieval.encoders.base import ImageEncoder, PhotoEmbedder, TextEncoder
from retrieval.images import ImageDecodeError, decode_image
from retrieval.lexical import document_vector
from retrieval.ocr import ENGINE as OCR_ENGINE
from retrieval.ocr import MIN_READ_CHARACTERS, TextReader, readable_characters
from retrieval.ocr import document_vector as read_text_vector
from retrieval.records import build_payload, content_hash, point_id, product_text
from retrieval.settings import Settings
from retrieval.store import (
    ADAPTED_VECTORS,
    IMAGE_VECTOR,
    LEXICAL_VECTOR,
    OCR_VECTOR,
    READS_TEXT_FROM,
    TEXT_VECTOR,
    EncoderFingerprint,
    ProductStore,
    StoreError,
)
from schemas.catalogue import CatalogueRecord
from schemas.report import IngestReport, Rejection, RejectionSink

T = TypeVar("T")
log = logging.getLogger("ingest")
CACHED_PHOTOS = 20_000  # photo vectors kept by hash during a run (~100 MB at 1280-d)
# OCR=auto: photos spread over the first chunk of a catalogue's first ingest decide whether its photos carry
# text; it does when at least a quarter of them read MIN_READ_CHARACTERS or more.
TEXT_SAMPLE = 8
TEXT_SHARE = 0.25


class IngestCancelled(RuntimeError):
    """The run was asked to stop; the chunks stored so far stay (a re-run finds them unchanged)."""


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


@dataclass
class Photo:
    """One image of a product: where it came from, the hash of its bytes, then its tensor or vector."""

    ref: str
    digest: str
    blob: bytes | None = None
    tensor: torch.Tensor | None = None
    vector: np.ndarray | None = None
    tuned: np.ndarray | None = None  # through the active image tail, while one is active
    read: str | None = None  # the text read off it (OCR), None while not read
    signature: str = ""  # 'size:mtime_ns' of a local file ('' for a URL)
    unread: bool = False  # the hash came from the store (same file signature): read the bytes only if needed


@dataclass
class Listing:
    """A validated record on its way to the store."""

    record: CatalogueRecord
    point_id: str
    photos: list[Photo] = field(default_factory=list)
    errors: list[Rejection] = field(default_factory=list)
    digest: str = ""
    stored: bool = False  # the point exists (with another content hash when it is in a chunk's work)
    refused: Rejection | None = None  # a photo reference outside the allowed folders: the row is not ingested

    def image_error(self, ref: str, reason: str) -> None:
        self.errors.append(
            Rejection(line=self.record.line, id=self.record.id, field="image", reason=f"{ref}: {reason}")
        )

    @property
    def usable(self) -> list[Photo]:
        return [p for p in self.photos if p.vector is not None or p.tensor is not None]


@dataclass
class Prepared:
    """A chunk after the preparing stage: what changed, with photos reused or decoded."""

    read: int
    rejected: list[Rejection]
    unchanged: int
    work: list[Listing]
    embedded: int = 0  # photos embedded already (by a PhotoEmbedder, while preparing)


class PhotoCache:
    """Photo vectors (and the text read off each photo) by the hash of the image bytes, for one run: a photo
    shared by several listings is embedded and read once. Least recently used entries go first."""

    def __init__(self, size: int = CACHED_PHOTOS) -> None:
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()
        self._reads: OrderedDict[str, str] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def read(self, digest: str) -> str | None:
        with self._lock:
            return self._reads.get(digest)

    def put_read(self, digest: str, text: str) -> None:
        with self._lock:
            self._reads[digest] = text
            self._reads.move_to_end(digest)
            while len(self._reads) > self._size * 10:  # a few words a photo: ten times as many fit
                self._reads.popitem(last=False)

    def get(self, digest: str) -> np.ndarray | None:
        with self._lock:
            vector = self._vectors.get(digest)
            if vector is not None:
                self._vectors.move_to_end(digest)
            return vector

    def put(self, digest: str, vector: np.ndarray) -> None:
        with self._lock:
            self._vectors[digest] = vector
            self._vectors.move_to_end(digest)
            while len(self._vectors) > self._size:
                self._vectors.popitem(last=False)


class Ingestor:
    """Holds the encoders, the store and the worker pools for one or more ingest runs."""

    def __init__(
        self,
        settings: Settings,
        store: ProductStore,
        image_encoder: ImageEncoder,
        text_encoder: TextEncoder,
        *,
        tail_encoder: ImageEncoder | None = None,
    ) -> None:
        """`tail_encoder`: the same image model loaded in this process, for a fine-tuned image tail to run
        on when `image_encoder` runs elsewhere (Ray workers); default `image_encoder`."""
        self.settings = settings
        self.store = store
        self.image_encoder = image_encoder
        self.tail_encoder = tail_encoder or image_encoder
        self.text_encoder = text_encoder
        self.reader = TextReader()
        self._reads_text: bool | None = False  # this run's catalogue: read its photos' text; None: undecided
        self.fingerprint = EncoderFingerprint.of(image_encoder, text_encoder)

    def run(
        self,
        path: Path,
        catalogue: str,
        *,
        progress: bool | None = None,
        retailer: str | None = None,
        product_folders: bool = False,
        prune: bool = False,
        uploaded: bool = False,
        photo_roots: Sequence[Path] = (),
        cancel: threading.Event | None = None,
        on_chunk: Callable[[IngestReport], None] | None = None,
        on_rejection: RejectionSink | None = None,
    ) -> IngestReport:
        """Ingest a catalogue file, folder or zip (ingest/inputs.py); bad rows are reported, the rest lands.
        `prune`: then delete the products of the feed's retailers that the feed no longer lists.
        `uploaded`: the file came from a client, so its rows may not name photos on this machine (inputs.py).
        `photo_roots`: folders beyond the catalogue's own that its local photos may come from (a CLI user's).
        `cancel`: when set, the run stops after the chunk being stored, or at once while photos are being
        fetched (IngestCancelled; the chunk being read is not stored; no pruning).
        `on_chunk`: called with the report so far after each chunk (embedded, and being stored while the
        next one is embedded). `on_rejection`: called with each rejected row and skipped photo as it happens
        (the report keeps the first ones only).
        A zip extracted by this run is removed again when the run stores nothing (a refused or failed input
        leaves nothing on disk)."""
        source = open_input(
            path,
            catalogue=catalogue,
            sources_root=self.settings.sources_root,
            retailer=retailer,
            product_folders=product_folders,
            max_archive_bytes=self.settings.max_archive_bytes,
            max_archive_entries=self.settings.max_archive_entries,
            uploaded=uploaded,
            photo_roots=photo_roots,
        )
        report = IngestReport(catalogue=catalogue, source=source.source)
        report.send_rejections_to(on_rejection)
        try:
            self._run(source, catalogue, report, progress=progress, prune=prune, cancel=cancel, on_chunk=on_chunk)
        except FetchCancelled:
            raise IngestCancelled(
                f"stopped after {report.read} rows; run it again to finish (stored rows are kept)"
            ) from None
        finally:
            if report.created_catalogue and report.written == 0:
                self._drop_if_empty(catalogue)
            if source.extracted is not None and report.written == 0:
                shutil.rmtree(source.extracted, ignore_errors=True)
                with contextlib.suppress(OSError):  # the catalogue's sources folder, when nothing else is there
                    source.extracted.parent.rmdir()
        if source.zip_folder is not None and (report.written or report.unchanged):
            self._remove_old_extractions(catalogue, source.zip_folder)
        return report

    def _remove_old_extractions(self, catalogue: str, current: Path) -> None:
        """After a zip's ingest: remove the catalogue's other extracted zips that no stored product's photo
        lies in any more (v1 and v2 of a feed, once v3 has replaced their products). One writer of a catalogue at
        a time is assumed (the embedded store's lock, the service's one job at a time): two processes ingesting
        zips into one catalogue of a Qdrant server at once could remove each other's fresh extraction."""
        parent = current.parent
        others = {p for p in parent.iterdir() if p.is_dir() and p != current and not p.name.startswith(".")}
        if not others:
            return
        prefix = str(parent) + os.sep
        for page in self.store.scroll_pages(catalogue, with_payload=["images"]):
            for point in page:
                for ref in (point.payload or {}).get("images", []):
                    if isinstance(ref, str) and ref.startswith(prefix):
                        others.discard(parent / ref[len(prefix) :].split(os.sep, 1)[0])
            if not others:
                return
        for folder in others:
            log.info("removing %s: no product of catalogue %s refers to it any more", folder.name, catalogue)
            shutil.rmtree(folder, ignore_errors=True)

    def _drop_if_empty(self, catalogue: str) -> None:
        """Remove a catalogue this run created and stored nothing in (a refused feed leaves none behind);
        one that another writer filled meanwhile stays. A store that cannot answer now is left alone."""
        try:
            if self.store.count(catalogue) == 0:
                self.store.drop_catalogue(catalogue)
        except StoreError as exc:
            log.warning("could not remove the empty catalogue %s: %s", catalogue, exc)

    def _run(
        self,
        source: CatalogueInput,
        catalogue: str,
        report: IngestReport,
        *,
        progress: bool | None,
        prune: bool,
        cancel: threading.Event | None,
        on_chunk: Callable[[IngestReport], None] | None,
    ) -> None:
        started = time.perf_counter()
        records = validate_rows(source.rows)
        first = next(records, None)  # surfaces a file-level CatalogueError before touching the store
        created = self.store.ensure_catalogue(catalogue, self.fingerprint)
        report.created_catalogue = created
        self._reads_text = self._text_reading(catalogue)
        existed = not created and self.store.count(catalogue) > 0
        adapters = Adapters(
            self.store,
            models_root=self.settings.models_root,
            precision=self.settings.text_precision,
            image_encoder=lambda: self.tail_encoder,
            cache_root=trunk_cache_root(self.settings),
            max_pixels=self.settings.max_image_pixels,
        )
        heads = adapters.active_heads(catalogue)  # new points get the adapted twins too
        # An encoder that decodes where it runs (Ray workers) is sent photo bytes; an active image tail needs
        # the tensors here, so then this process decodes and the encoder only runs the forward passes.
        remote = self.image_encoder if isinstance(self.image_encoder, PhotoEmbedder) else None
        if isinstance(heads.get(IMAGE_VECTOR), TailHead):
            remote = None
        show = sys.stderr.isatty() if progress is None else progress
        bar = tqdm(desc=f"ingest {catalogue}", unit="product", disable=not show, file=sys.stderr)
        stream = itertools.chain([first], records) if first is not None else iter(())
        cache = PhotoCache()
        seen: dict[str, set[str]] = {}  # retailer -> ids in the feed (for --prune)
        rejected_ids: set[str] = set()
        with (
            ThreadPoolExecutor(self.settings.decode_workers, thread_name_prefix="decode") as pool,
            ThreadPoolExecutor(  # reading waits on disks and URLs, not on the CPU: as many as URLs in flight
                max(self.settings.decode_workers, self.settings.url_concurrency), thread_name_prefix="read"
            ) as readers,
            ThreadPoolExecutor(1, thread_name_prefix="prepare") as preparer,
            ThreadPoolExecutor(1, thread_name_prefix="store") as writer,
            UrlFetcher.from_settings(self.settings, cancel=cancel) as http,
        ):
            pending: Future[Prepared] | None = None
            storing: Future[None] | None = None  # the previous chunk's upsert, while this one is embedded

            def finish(prepared: Prepared, number: int) -> None:
                nonlocal storing
                points = self._finish(prepared, catalogue, cache, heads, report, number, bar)
                if storing is not None:
                    storing.result()  # chunks land in order; a failed upsert stops the run here
                storing = writer.submit(self._store, catalogue, points, number, prepared.unchanged, report.read)
                if cancel is not None and cancel.is_set():
                    storing.result()  # what was embedded is stored before stopping
                self._after_chunk(report, cancel, on_chunk)

            number = 0
            for number, chunk in enumerate(chunked(stream, self.settings.ingest_chunk), start=1):
                for item in chunk if prune else ():  # the ids are kept only to know what to prune
                    if isinstance(item, CatalogueRecord):
                        seen.setdefault(item.retailer, set()).add(item.id)
                    elif item.id:
                        rejected_ids.add(item.id)
                upcoming = preparer.submit(
                    self._prepare,
                    chunk,
                    catalogue,
                    source.photos,
                    (readers, pool),
                    http,
                    cache,
                    reuse_stored=existed,
                    remote=remote,
                )
                if pending is not None:
                    finish(pending.result(), number - 1)
                pending = upcoming
            if pending is not None:
                finish(pending.result(), number)
            if storing is not None:
                storing.result()
        bar.close()
        if prune:
            report.pruned = self._prune(catalogue, seen, rejected_ids)
        if report.written or report.pruned:
            began = time.perf_counter()
            if self.store.compact(catalogue):
                log.info("catalogue %s: quantized segments built in %.1f s", catalogue, time.perf_counter() - began)
        report.seconds = round(time.perf_counter() - started, 3)

    def _text_reading(self, catalogue: str) -> bool | None:
        """Whether this run reads its photos' text: OCR=on / off, recorded with the catalogue; auto: what the
        catalogue recorded, None when it has not decided yet (the first photos will). A catalogue of an
        older layout has nowhere to keep read text: never."""
        info = self.store.info(catalogue)
        wanted = self.settings.ocr
        if info.layout < READS_TEXT_FROM:
            if wanted == "on":
                log.warning(
                    "catalogue %s (layout %d) cannot keep read text: ingest into a new one", catalogue, info.layout
                )
            return False
        if wanted == "auto":
            return info.reads_text
        decided = wanted == "on"
        if decided != info.reads_text:
            self._record_text_reading(catalogue, decided)
        return decided

    def _record_text_reading(self, catalogue: str, on: bool) -> None:
        self.store.update_metadata(catalogue, {"ocr": {"on": on, "engine": OCR_ENGINE}})
        log.info("catalogue %s: text on photos is %s", catalogue, "read" if on else "not read")

    def _decide_text_reading(
        self,
        catalogue: str,
        chunk: list[CatalogueRecord | Rejection],
        access: PhotoAccess,
        http: UrlFetcher,
        cache: PhotoCache,
    ) -> None:
        """OCR=auto on a catalogue that has not decided: read a few of the first photos and keep the answer.
        What they read goes to the run's cache, so the chunk does not read them again."""
        sample: list[str] = []
        records = [r for r in chunk if isinstance(r, CatalogueRecord) and r.images]
        step = max(1, len(records) // TEXT_SAMPLE)  # spread over the chunk: feeds are often sorted by category
        for record in records[::step]:
            for ref in record.images[:1]:
                try:
                    blob = access.read(access.resolve(ref), client=http)
                    image = decode_image(blob, max_pixels=self.settings.max_image_pixels)
                except (SourceError, ImageDecodeError):
                    continue
                sample.append(self.reader.read(image))
                cache.put_read(hashlib.sha256(blob).hexdigest(), sample[-1])
            if len(sample) >= TEXT_SAMPLE:
                break
        if not sample:
            return  # no photo to judge by yet: the next run decides
        legible = sum(readable_characters(text) >= MIN_READ_CHARACTERS for text in sample)
        self._reads_text = legible >= TEXT_SHARE * len(sample)
        self._record_text_reading(catalogue, self._reads_text)

    @staticmethod
    def _after_chunk(
        report: IngestReport, cancel: threading.Event | None, on_chunk: Callable[[IngestReport], None] | None
    ) -> None:
        if on_chunk is not None:
            on_chunk(report)
        if cancel is not None and cancel.is_set():
            raise IngestCancelled(f"stopped after {report.read} rows; run it again to finish (stored rows are kept)")

    def _prepare(
        self,
        chunk: list[CatalogueRecord | Rejection],
        catalogue: str,
        access: PhotoAccess,
        pools: tuple[ThreadPoolExecutor, ThreadPoolExecutor],
        http: UrlFetcher,
        cache: PhotoCache,
        *,
        reuse_stored: bool,
        remote: PhotoEmbedder | None = None,
    ) -> Prepared:
        """Read and hash the images, leave out unchanged products, reuse known photo vectors (this run's,
        or stored ones with the same bytes), and decode + preprocess the rest (or have `remote` decode and
        embed them)."""
        readers, decoders = pools
        if self._reads_text is None:
            self._decide_text_reading(catalogue, chunk, access, http, cache)
        products = [Listing(r, point_id(r.retailer, r.id)) for r in chunk if isinstance(r, CatalogueRecord)]
        stored = self.store.stored_hashes(catalogue, [p.point_id for p in products])
        known_files = {key: digest for state in stored.values() for key, digest in state.files.items()}
        list(readers.map(lambda p: self._read_images(p, access, http, known_files), products))
        refused = [p.refused for p in products if p.refused is not None]
        products = [p for p in products if p.refused is None]
        work = []
        for product in products:
            if product.point_id in stored and stored[product.point_id].content_hash == product.digest:
                continue
            product.stored = product.point_id in stored
            work.append(product)
        photos = [photo for product in work for photo in product.photos if photo.blob is not None or photo.unread]
        for photo in photos:
            photo.vector, photo.read = cache.get(photo.digest), cache.read(photo.digest)
        reading = bool(self._reads_text)
        missing = {photo.digest for photo in photos if photo.vector is None or (reading and photo.read is None)}
        if missing and reuse_stored:
            changed = [p.point_id for p in work if p.stored]
            known = self.store.photos_by_hash(catalogue, sorted(missing), first_from=changed)
            for photo in photos:
                if (found := known.get(photo.digest)) is not None:
                    if photo.vector is None:
                        photo.vector = np.asarray(found.vector, dtype=np.float32)
                    if photo.read is None and found.read is not None:
                        photo.read = found.read
        embedded = 0
        if remote is None:
            list(decoders.map(lambda p: self._decode(p, access, http, cache), work))
        else:
            embedded = self._embed_remotely(work, access, http, cache, remote, readers)
        return Prepared(
            read=len(chunk),
            rejected=sorted([r for r in chunk if isinstance(r, Rejection)] + refused, key=lambda r: r.line or 0),
            unchanged=len(products) - len(work),
            work=work,
            embedded=embedded,
        )

    def _finish(
        self,
        prepared: Prepared,
        catalogue: str,
        cache: PhotoCache,
        heads: dict[str, ActiveHead],
        report: IngestReport,
        number: int,
        bar: tqdm,
    ) -> list[models.PointStruct]:
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
        points = self._embed(ready, cache, heads, report)
        for product in ready:
            if product.stored:
                report.updated += 1
            else:
                report.new += 1
        bar.update(prepared.read)
        return points

    def _store(self, catalogue: str, points: list[models.PointStruct], number: int, unchanged: int, read: int) -> None:
        self.store.upsert(catalogue, points)
        log.info(
            "stored chunk %d of %s: %d written, %d unchanged (%d rows read so far)",
            number,
            catalogue,
            len(points),
            unchanged,
            read,
        )

    def _read_images(
        self, product: Listing, access: PhotoAccess, http: UrlFetcher, known_files: dict[tuple[str, str], str]
    ) -> None:
        """Hash each photo's bytes; a local file whose size and modification time are those stored with its
        hash is not read (as git and rsync trust a file's stat): re-ingesting an unchanged feed reads no photo.
        Every reference is checked against the folders the catalogue may read before anything is looked at;
        one outside them refuses the whole row."""
        record = product.record
        resolved: list[str | SourceError] = []
        for ref in record.images:
            try:
                resolved.append(access.resolve(ref))
            except OutsideRoot as exc:
                product.refused = Rejection(line=record.line, id=record.id, field="image", reason=f"{ref}: {exc}")
                return
            except SourceError as exc:  # an unsupported URL scheme: this photo is skipped
                resolved.append(exc)
        digests: list[str | None] = []
        for ref, where in zip(record.images, resolved, strict=True):
            try:
                if isinstance(where, SourceError):
                    raise where
                signature = file_signature(where)
                if (digest := known_files.get((where, signature))) is not None:
                    product.photos.append(Photo(where, digest, signature=signature, unread=True))
                    digests.append(digest)
                    continue
                blob = access.read(where, client=http)
            except SourceError as exc:
                product.image_error(ref, str(exc))
                digests.append(None)
                continue
            digest = hashlib.sha256(blob).hexdigest()
            product.photos.append(Photo(where, digest, blob, signature=signature))
            digests.append(digest)
        product.digest = content_hash(product.record, digests, reads_text=bool(self._reads_text))

    def _pending_bytes(
        self, product: Listing, photo: Photo, access: PhotoAccess, http: UrlFetcher, cache: PhotoCache
    ) -> bytes | None:
        """The bytes of a photo that still has to be decoded (embedded, or read), taken off the photo; None
        when nothing is left to do or they cannot be read (the reason is then recorded)."""
        reading = bool(self._reads_text)
        blob, photo.blob = photo.blob, None  # the bytes are not needed after this
        if photo.read is None and reading:
            photo.read = cache.read(photo.digest)  # read meanwhile for another listing of the run
        if photo.vector is not None and (photo.read is not None or not reading):
            return None
        if blob is None and photo.unread:  # its vector was neither in this run's cache nor stored
            try:
                blob = access.read(photo.ref, client=http)
            except SourceError as exc:
                self._undecodable(product, photo, str(exc))
                return None
            photo.digest = hashlib.sha256(blob).hexdigest()
        return blob

    @staticmethod
    def _undecodable(product: Listing, photo: Photo, reason: str) -> None:
        if photo.vector is not None:  # only its text was wanted: the photo keeps its vector, unread
            photo.read = ""
        else:
            product.image_error(photo.ref, reason)

    def _embed_remotely(
        self,
        work: list[Listing],
        access: PhotoAccess,
        http: UrlFetcher,
        cache: PhotoCache,
        remote: PhotoEmbedder,
        readers: ThreadPoolExecutor,
    ) -> int:
        """Send the bytes of the photos still to embed (or read) to `remote`, each distinct photo once, and
        keep what comes back as if decoded here; returns how many photos were embedded."""
        reading = bool(self._reads_text)
        pending = readers.map(
            lambda product: [
                (product, photo, blob)
                for photo in product.photos
                if (blob := self._pending_bytes(product, photo, access, http, cache)) is not None
            ],
            work,
        )
        sharing: dict[str, list[tuple[Listing, Photo]]] = {}  # digest -> the photos with those bytes
        blobs: list[bytes] = []
        for product, photo, blob in (item for items in pending for item in items):
            if photo.digest not in sharing:
                sharing[photo.digest] = []
                blobs.append(blob)
            sharing[photo.digest].append((product, photo))
        done = remote.embed_photos(blobs, max_pixels=self.settings.max_image_pixels, read=reading)
        embedded = 0
        for (digest, photos), result in zip(sharing.items(), done, strict=True):
            if result.vector is not None and any(photo.vector is None for _, photo in photos):
                cache.put(digest, result.vector)
                embedded += 1
            if reading and result.read is not None:
                cache.put_read(digest, result.read)
            for product, photo in photos:
                if result.error is not None:
                    self._undecodable(product, photo, result.error)
                    continue
                if photo.vector is None:
                    photo.vector = result.vector
                if reading and photo.read is None:
                    photo.read = result.read
        return embedded

    def _decode(self, product: Listing, access: PhotoAccess, http: UrlFetcher, cache: PhotoCache) -> None:
        reading = bool(self._reads_text)
        for photo in product.photos:
            if (blob := self._pending_bytes(product, photo, access, http, cache)) is None:
                continue
            try:
                image = decode_image(blob, max_pixels=self.settings.max_image_pixels)
            except ImageDecodeError as exc:
                self._undecodable(product, photo, str(exc))
                continue
            if reading and photo.read is None:
                photo.read = self.reader.read(image)
                cache.put_read(photo.digest, photo.read)
            if photo.vector is None:
                photo.tensor = self.image_encoder.preprocess(image)

    def _embed(
        self, products: list[Listing], cache: PhotoCache, heads: dict[str, ActiveHead], report: IngestReport
    ) -> list[models.PointStruct]:
        batch = self.settings.batch_size
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
            reads = [p.read or "" for p in photos] if self._reads_text else []
            if self._reads_text and (printed := read_text_vector(reads, product.record.title, product.record.brand)):
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

    def _prune(self, catalogue: str, seen: dict[str, set[str]], rejected_ids: set[str]) -> int:
        """Delete the products of the feed's retailers that the feed no longer lists. A row rejected this
        time keeps its stored product (a broken row is not a removal)."""
        gone = []
        for retailer, ids in seen.items():
            for product_id in self.store.product_ids(catalogue, retailer):
                if product_id not in ids and product_id not in rejected_ids:
                    gone.append(point_id(retailer, product_id))
        self.store.delete(catalogue, gone)
        if gone:
            log.info("pruned %d products of %s that the feed no longer lists", len(gone), catalogue)
        return len(gone)
