"""Ingest's write stage: embedded points upserted in order, in their own thread while the next chunk is embedded;
after the run, products the feed no longer lists pruned (when asked), quantized segments built, extracted zips
no product refers to any more removed; a catalogue the run created and filled with nothing dropped again."""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from qdrant_client import models

from retrieval.records import point_id
from retrieval.store import ProductStore, StoreError

log = logging.getLogger("ingest")


@dataclass
class Writer:
    """The write stage of one run, for one catalogue."""

    store: ProductStore
    catalogue: str

    def write(self, points: list[models.PointStruct], number: int, unchanged: int, read: int) -> None:
        catalogue = self.catalogue
        self.store.upsert(catalogue, points)
        log.info(
            "stored chunk %d of %s: %d written, %d unchanged (%d rows read so far)",
            number,
            catalogue,
            len(points),
            unchanged,
            read,
        )

    def prune(self, seen: dict[str, set[str]], rejected_ids: set[str]) -> int:
        """Delete the products of the feed's retailers that the feed no longer lists. A row rejected this
        time keeps its stored product (a broken row is not a removal)."""
        catalogue = self.catalogue
        gone = []
        for retailer, ids in seen.items():
            for product_id in self.store.product_ids(catalogue, retailer):
                if product_id not in ids and product_id not in rejected_ids:
                    gone.append(point_id(retailer, product_id))
        self.store.delete(catalogue, gone)
        if gone:
            log.info("pruned %d products of %s that the feed no longer lists", len(gone), catalogue)
        return len(gone)

    def compact(self) -> None:
        """Build the catalogue's quantized segments now that the run has written (where the engine does)."""
        began = time.perf_counter()
        if self.store.compact(self.catalogue):
            log.info("catalogue %s: quantized segments built in %.1f s", self.catalogue, time.perf_counter() - began)

    def remove_old_extractions(self, current: Path) -> None:
        """After a zip's ingest: remove the catalogue's other extracted zips that no stored product's photo
        lies in any more (v1 and v2 of a feed, once v3 has replaced their products). One writer of a catalogue at
        a time is assumed (the embedded store's lock, the service's one job at a time): two processes ingesting
        zips into one catalogue of a Qdrant server at once could remove each other's fresh extraction."""
        catalogue = self.catalogue
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

    def drop_if_empty(self) -> None:
        """Remove a catalogue this run created and stored nothing in (a refused feed leaves none behind);
        one that another writer filled meanwhile stays. A store that cannot answer now is left alone."""
        catalogue = self.catalogue
        try:
            if self.store.count(catalogue) == 0:
                self.store.drop_catalogue(catalogue)
        except StoreError as exc:
            log.warning("could not remove the empty catalogue %s: %s", catalogue, exc)
