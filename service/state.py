"""What the app holds for its lifetime: settings, the store client and the search engine."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from retrieval.match.labels import LabelBook
from retrieval.runtime import open_runtime
from retrieval.search import SearchEngine
from retrieval.settings import Settings
from retrieval.store import ProductStore
from service.jobs import Jobs, sweep_extractions, sweep_uploads
from service.uploads import UPLOADS

log = logging.getLogger("service")


@dataclass
class AppState:
    settings: Settings
    store: ProductStore
    engine: SearchEngine
    jobs: Jobs = field(default_factory=Jobs)
    _labels: LabelBook | None = None
    _labels_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def labels(self) -> LabelBook:
        """The reviewers' labels (LABELS_PATH), opened at first use."""
        with self._labels_lock:
            if self._labels is None:
                self._labels = LabelBook(self.settings.labels_file)
            return self._labels

    def close(self, timeout_s: float | None = None) -> None:
        """Stop the jobs (a running one gets `timeout_s`, default SHUTDOWN_TIMEOUT_S, to reach a stopping
        point, else it is marked interrupted), then the store."""
        self.jobs.close(self.settings.shutdown_timeout_s if timeout_s is None else timeout_s)
        self.store.close()
        with self._labels_lock:
            if self._labels is not None:
                self._labels.close()


def build_state(settings: Settings) -> AppState:
    """Open the store (first: a busy store fails fast), then load both encoders.

    Raises StoreBusy / StoreError / EncoderError with a message that says what to do.
    """
    store = ProductStore.open(settings)
    jobs: Jobs | None = None
    try:
        # marks what a crashed process left running as interrupted
        jobs = Jobs(settings.jobs_file, max_queued=settings.max_queued_jobs, redact=settings.redact_paths)
        if swept := sweep_extractions(settings.sources_root):
            log.warning("removed %d half-extracted zips that a stopped process left behind", swept)
        if swept := sweep_uploads(settings.sources_root / UPLOADS):
            log.warning("removed %d uploads that a stopped process left behind", swept)
        catalogues = ", ".join(store.catalogues()) or "none"
        log.info("store: %s; catalogues: %s", settings.describe_store(store.engine), catalogues)
        log.info("loading encoders %s and %s", settings.image_model, settings.text_model)
        runtime = open_runtime(settings, store=store, serving=True)
    except BaseException:
        if jobs is not None:
            jobs.close(0)
        store.close()
        raise
    return AppState(settings, store, runtime.engine, jobs)
