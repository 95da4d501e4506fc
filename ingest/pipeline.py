"""The ingest runner: a catalogue walks once through five stages, each with one job:

read (ingest/inputs.py: a file, folder or zip opened as rows) -> validate (ingest/readers.py: rows to records
or reported rejections) -> prepare (ingest/prepare.py: photos read and hashed, unchanged products left out,
known vectors reused, the rest decoded) -> embed (ingest/embed.py: photos and texts through the encoders,
points built) -> write (ingest/write.py: upsert, prune, compaction).

Chunks of records flow through the last three stages, which overlap: while the main thread embeds chunk N, a
preparing thread prepares chunk N+1 (its own read and decode threads in pools) and a writing thread upserts
chunk N-1, so the encoder is not left waiting on files, JPEG decoding or the store."""

from __future__ import annotations

import contextlib
import itertools
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from tqdm import tqdm

from ingest.embed import Embedder
from ingest.inputs import CatalogueInput, open_input
from ingest.prepare import PhotoCache, Prepared, Preparer, text_reading
from ingest.readers import validate_rows
from ingest.sources import FetchCancelled, UrlFetcher
from ingest.write import Writer
from retrieval.adapt.heads import Adapters, TailHead, trunk_cache_root
from retrieval.encoders.base import ImageEncoder, PhotoEmbedder, TextEncoder
from retrieval.ocr import TextReader
from retrieval.settings import Settings
from retrieval.store import IMAGE_VECTOR, EncoderFingerprint, ProductStore
from schemas.catalogue import CatalogueRecord
from schemas.report import IngestReport, RejectionSink

T = TypeVar("T")


class IngestCancelled(RuntimeError):
    """The run was asked to stop; the chunks stored so far stay (a re-run finds them unchanged)."""


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


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
        writer = Writer(self.store, catalogue)
        try:
            self._run(source, writer, report, progress=progress, prune=prune, cancel=cancel, on_chunk=on_chunk)
        except FetchCancelled:
            raise IngestCancelled(
                f"stopped after {report.read} rows; run it again to finish (stored rows are kept)"
            ) from None
        finally:
            if report.created_catalogue and report.written == 0:
                writer.drop_if_empty()
            if source.extracted is not None and report.written == 0:
                shutil.rmtree(source.extracted, ignore_errors=True)
                with contextlib.suppress(OSError):  # the catalogue's sources folder, when nothing else is there
                    source.extracted.parent.rmdir()
        if source.zip_folder is not None and (report.written or report.unchanged):
            writer.remove_old_extractions(source.zip_folder)
        return report

    def _run(
        self,
        source: CatalogueInput,
        writer: Writer,
        report: IngestReport,
        *,
        progress: bool | None,
        prune: bool,
        cancel: threading.Event | None,
        on_chunk: Callable[[IngestReport], None] | None,
    ) -> None:
        started = time.perf_counter()
        catalogue = writer.catalogue
        records = validate_rows(source.rows)
        first = next(records, None)  # surfaces a file-level CatalogueError before touching the store
        created = self.store.ensure_catalogue(catalogue, self.fingerprint)
        report.created_catalogue = created
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
        reads_text = text_reading(self.store, self.settings, catalogue)
        preparer = Preparer(
            self.settings, self.store, self.image_encoder, self.reader, catalogue, reads_text, existed, remote
        )
        embedder = Embedder(self.image_encoder, self.text_encoder, heads, self.settings.batch_size)
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
            ThreadPoolExecutor(1, thread_name_prefix="prepare") as preparing,
            ThreadPoolExecutor(1, thread_name_prefix="store") as writing,
            UrlFetcher.from_settings(self.settings, cancel=cancel) as http,
        ):
            pending: Future[Prepared] | None = None
            storing: Future[None] | None = None  # the previous chunk's upsert, while this one is embedded

            def finish(prepared: Prepared, number: int) -> None:
                nonlocal storing
                points = embedder.embed(prepared, cache, report, bar)
                if storing is not None:
                    storing.result()  # chunks land in order; a failed upsert stops the run here
                storing = writing.submit(writer.write, points, number, prepared.unchanged, report.read)
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
                upcoming = preparing.submit(preparer.prepare, chunk, source.photos, (readers, pool), http, cache)
                if pending is not None:
                    finish(pending.result(), number - 1)
                pending = upcoming
            if pending is not None:
                finish(pending.result(), number)
            if storing is not None:
                storing.result()
        bar.close()
        if prune:
            report.pruned = writer.prune(seen, rejected_ids)
        if report.written or report.pruned:
            writer.compact()
        report.seconds = round(time.perf_counter() - started, 3)

    @staticmethod
    def _after_chunk(
        report: IngestReport, cancel: threading.Event | None, on_chunk: Callable[[IngestReport], None] | None
    ) -> None:
        if on_chunk is not None:
            on_chunk(report)
        if cancel is not None and cancel.is_set():
            raise IngestCancelled(f"stopped after {report.read} rows; run it again to finish (stored rows are kept)")
