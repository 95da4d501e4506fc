"""Background jobs of the service: run one at a time in a worker thread (they share the encoders and
the store with searches), with their progress and results kept in memory for the most recent ones.

A job runs in the logging context of the request that submitted it (its lines carry that request id, and
the job's id). On shutdown, queued jobs are dropped and a running one is asked to stop at its next step."""

from __future__ import annotations

import contextvars
import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from datetime import UTC, datetime

from schemas.jobs import IngestSummary, Job, JobKind
from service import metrics
from service.logs import JOB_ID

KEPT_JOBS = 100
log = logging.getLogger("service.jobs")

Work = Callable[["JobHandle"], Iterable[list[dict[str, str]]]]


class JobsClosed(RuntimeError):
    """The service is stopping: no new job is taken."""


class JobCancelled(RuntimeError):
    """The service stopped while the job was queued or running."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class JobHandle:
    """What a running job sees of itself: its totals and report to set, and whether to stop."""

    def __init__(self, job: Job, lock: threading.Lock, stop: threading.Event) -> None:
        self.job = job
        self._lock = lock
        self.stop = stop  # set when the service stops: finish the current step and return

    def set_total(self, total: int) -> None:
        self.job.total = total

    def set_done(self, done: int) -> None:
        with self._lock:
            self.job.done = done

    def set_ingest(self, summary: IngestSummary) -> None:
        with self._lock:
            self.job.ingest = summary


class Jobs:
    def __init__(self) -> None:
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._rows: dict[str, list[dict[str, str]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pending: dict[str, tuple[Future[None], Callable[[], None] | None]] = {}
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="job")

    def submit(self, kind: JobKind, catalogue: str, work: Work, *, cleanup: Callable[[], None] | None = None) -> Job:
        """Queue `work`; `cleanup` runs once the job is over, however it ended (even if it never started)."""
        if self._stop.is_set():
            raise JobsClosed("the service is stopping and takes no new jobs")
        job = Job(id=uuid.uuid4().hex, kind=kind, catalogue=catalogue, status="queued", created_at=_now())
        with self._lock:
            self._jobs[job.id] = job
            self._rows[job.id] = []
            while len(self._jobs) > KEPT_JOBS:
                oldest = next((k for k, j in self._jobs.items() if j.status in ("done", "failed")), None)
                if oldest is None:
                    break
                del self._jobs[oldest], self._rows[oldest]
            # the request's context: the job's log lines carry the id of the request that submitted it
            future = self._worker.submit(contextvars.copy_context().run, self._run, job, work, cleanup)
            self._pending[job.id] = (future, cleanup)
        log.info("%s job %s queued for catalogue %s", kind, job.id, catalogue)
        return job.model_copy()

    def _run(self, job: Job, work: Work, cleanup: Callable[[], None] | None) -> None:
        token = JOB_ID.set(job.id)
        job.status, job.started_at = "running", _now()
        metrics.JOBS_RUNNING.inc()
        log.info("%s job started", job.kind)
        try:
            for rows in work(JobHandle(job, self._lock, self._stop)):
                with self._lock:
                    self._rows[job.id].extend(rows)
                    job.done += 1
                if self._stop.is_set():
                    raise JobCancelled("the service stopped before the job finished")
            job.status = "done"
            log.info("%s job done", job.kind)
        except Exception as exc:  # a job's failure is reported in its status, never lost in a thread
            job.status, job.error = "failed", f"{type(exc).__name__}: {exc}"
            log.warning("%s job failed: %s", job.kind, job.error, exc_info=exc)
        finally:
            job.finished_at = _now()
            metrics.JOBS_RUNNING.dec()
            metrics.JOBS_FINISHED.labels(job.kind, job.status).inc()
            with self._lock:
                self._pending.pop(job.id, None)
            _clean(cleanup)
            JOB_ID.reset(token)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            job = self._jobs.get(job_id)
            return job.model_copy() if job else None

    def rows(self, job_id: str) -> list[dict[str, str]]:
        with self._lock:
            return list(self._rows.get(job_id, []))

    def close(self, timeout: float = 30.0) -> None:
        """Take no new job, drop the queued ones, ask the running one to stop at its next step (a match job
        after its product, an ingest after its chunk) and wait for it up to `timeout` seconds."""
        self._stop.set()
        self._worker.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            pending = dict(self._pending)
        running = []
        for job_id, (future, cleanup) in pending.items():
            if future.cancelled():
                with self._lock:
                    job = self._jobs[job_id]
                    job.status, job.error, job.finished_at = "failed", "JobCancelled: the service stopped", _now()
                    self._pending.pop(job_id, None)
                metrics.JOBS_FINISHED.labels(job.kind, job.status).inc()
                _clean(cleanup)
            else:
                running.append(future)
        if running and wait_for(running, timeout=timeout).not_done:
            log.warning("a job is still running %.0f s after the service was asked to stop", timeout)


def _clean(cleanup: Callable[[], None] | None) -> None:
    if cleanup is None:
        return
    try:
        cleanup()
    except Exception:
        log.exception("a job's clean-up failed")
