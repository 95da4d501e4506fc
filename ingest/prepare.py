"""Ingest's prepare stage: a validated chunk's photos read and hashed, unchanged products left out, known photo
vectors reused (this run's, or stored ones with the same bytes), and the rest decoded and preprocessed (or sent
to a `PhotoEmbedder` that decodes and embeds where it runs). Whether the run reads its photos' text (OCR) is
decided here too, by the first chunk when the catalogue has not decided yet. It runs in its own thread, a chunk
ahead of the embed stage (ingest/embed.py)."""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from ingest.sources import OutsideRoot, PhotoAccess, SourceError, UrlFetcher, file_signature
from retrieval.encoders.base import ImageEncoder, PhotoEmbedder
from retrieval.images import ImageDecodeError, decode_image
from retrieval.ocr import ENGINE as OCR_ENGINE
from retrieval.ocr import MIN_READ_CHARACTERS, TextReader, readable_characters
from retrieval.records import content_hash, point_id
from retrieval.settings import Settings
from retrieval.store import READS_TEXT_FROM, ProductStore
from schemas.catalogue import CatalogueRecord
from schemas.report import Rejection

log = logging.getLogger("ingest")
CACHED_PHOTOS = 20_000  # photo vectors kept by hash during a run (~100 MB at 1280-d)
# OCR=auto: photos spread over the first chunk of a catalogue's first ingest decide whether its photos carry
# text; it does when at least a quarter of them read MIN_READ_CHARACTERS or more.
TEXT_SAMPLE = 8
TEXT_SHARE = 0.25


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
    reads_text: bool  # the run reads its photos' text (decided by the first chunk under OCR=auto)
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


def text_reading(store: ProductStore, settings: Settings, catalogue: str) -> bool | None:
    """Whether a run reads its photos' text: OCR=on / off, recorded with the catalogue; auto: what the
    catalogue recorded, None when it has not decided yet (the first photos will). A catalogue of an
    older layout has nowhere to keep read text: never."""
    info = store.info(catalogue)
    wanted = settings.ocr
    if info.layout < READS_TEXT_FROM:
        if wanted == "on":
            log.warning("catalogue %s (layout %d) cannot keep read text: ingest into a new one", catalogue, info.layout)
        return False
    if wanted == "auto":
        return info.reads_text
    decided = wanted == "on"
    if decided != info.reads_text:
        record_text_reading(store, catalogue, decided)
    return decided


def record_text_reading(store: ProductStore, catalogue: str, on: bool) -> None:
    store.update_metadata(catalogue, {"ocr": {"on": on, "engine": OCR_ENGINE}})
    log.info("catalogue %s: text on photos is %s", catalogue, "read" if on else "not read")


@dataclass
class Preparer:
    """The prepare stage of one run: what each chunk needs before its photos and texts are embedded.
    `reads_text`: the catalogue's decision (None: the first chunk decides); `reuse_stored`: the catalogue held
    products before the run (their photo vectors are looked up by hash); `remote`: an encoder that decodes and
    embeds where it runs (the bytes are sent to it)."""

    settings: Settings
    store: ProductStore
    image_encoder: ImageEncoder
    reader: TextReader
    catalogue: str
    reads_text: bool | None
    reuse_stored: bool
    remote: PhotoEmbedder | None = None

    def prepare(
        self,
        chunk: list[CatalogueRecord | Rejection],
        access: PhotoAccess,
        pools: tuple[ThreadPoolExecutor, ThreadPoolExecutor],
        http: UrlFetcher,
        cache: PhotoCache,
    ) -> Prepared:
        """Read and hash the images, leave out unchanged products, reuse known photo vectors (this run's,
        or stored ones with the same bytes), and decode + preprocess the rest (or have `remote` decode and
        embed them)."""
        readers, decoders = pools
        catalogue = self.catalogue
        if self.reads_text is None:
            self._decide_text_reading(chunk, access, http, cache)
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
        reading = bool(self.reads_text)
        missing = {photo.digest for photo in photos if photo.vector is None or (reading and photo.read is None)}
        if missing and self.reuse_stored:
            changed = [p.point_id for p in work if p.stored]
            known = self.store.photos_by_hash(catalogue, sorted(missing), first_from=changed)
            for photo in photos:
                if (found := known.get(photo.digest)) is not None:
                    if photo.vector is None:
                        photo.vector = np.asarray(found.vector, dtype=np.float32)
                    if photo.read is None and found.read is not None:
                        photo.read = found.read
        embedded = 0
        if self.remote is None:
            list(decoders.map(lambda p: self._decode(p, access, http, cache), work))
        else:
            embedded = self._embed_remotely(work, access, http, cache, self.remote, readers)
        return Prepared(
            read=len(chunk),
            rejected=sorted([r for r in chunk if isinstance(r, Rejection)] + refused, key=lambda r: r.line or 0),
            unchanged=len(products) - len(work),
            work=work,
            reads_text=reading,
            embedded=embedded,
        )

    def _decide_text_reading(
        self,
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
        self.reads_text = legible >= TEXT_SHARE * len(sample)
        record_text_reading(self.store, self.catalogue, self.reads_text)

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
        product.digest = content_hash(product.record, digests, reads_text=bool(self.reads_text))

    def _pending_bytes(
        self, product: Listing, photo: Photo, access: PhotoAccess, http: UrlFetcher, cache: PhotoCache
    ) -> bytes | None:
        """The bytes of a photo that still has to be decoded (embedded, or read), taken off the photo; None
        when nothing is left to do or they cannot be read (the reason is then recorded)."""
        reading = bool(self.reads_text)
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
        reading = bool(self.reads_text)
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
        reading = bool(self.reads_text)
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
