"""Background jobs of the service: run one at a time in a worker thread (they share the encoders and
the store with searches); their records, progress and rows kept for the most recent ones.

With a path (the service's `JOBS_PATH`, a small SQLite file in the store's folder) every record is written as it
changes, so a job outlives the process: after a crash or a kill the service starts by marking the jobs that
were queued or running `interrupted` (with what they had stored by then), and `GET /jobs/{id}` still answers.

A job runs in the logging context of the request that submitted it (its lines carry that request id, and
the job's id). On shutdown, queued jobs are dropped and the running one is asked to stop (an ingest stops
fetching photos at once); whatever has not ended within the shutdown bound is marked `interrupted` and left
behind: the worker is a daemon thread, so the process exits on time."""

from __future__ import annotations

import contextvars
import fcntl
import json
import logging
import queue
import shutil
import sqlite3
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from schemas.jobs import IngestSummary, Job, JobKind, TrainSummary
from service import metrics
from service.logs import JOB_ID

KEPT_JOBS = 100
log = logging.getLogger("service.jobs")

Work = Callable[["JobHandle"], Iterable[list[dict[str, str]]]]
Cleanup = Callable[[], None]
INTERRUPTED = (
    "the service stopped before the job finished; what it stored until then is kept: submit it again to finish"
)


class JobsClosed(RuntimeError):
    """The service is stopping: no new job is taken."""


class JobCancelled(RuntimeError):
    """The service stopped while the job was queued or running."""


class JobsFull(RuntimeError):
    """Too many jobs are waiting: try again later."""


class JobsBusy(RuntimeError):
    """Another process keeps its jobs in the same file."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class JobHandle:
    """What a running job sees of itself: its totals and report to set, and whether to stop."""

    def __init__(self, job: Job, jobs: Jobs, stop: threading.Event) -> None:
        self.job = job
        self._jobs = jobs
        self.stop = stop  # set when the service stops: finish the current step and return

    def set_total(self, total: int) -> None:
        self._jobs._update(self.job, total=total)

    def set_done(self, done: int) -> None:
        self._jobs._update(self.job, done=done)

    def set_ingest(self, summary: IngestSummary) -> None:
        self._jobs._update(self.job, ingest=summary)

    def set_training(self, summary: TrainSummary) -> None:
        self._jobs._update(self.job, training=summary)


class JobRecords:
    """The jobs' records and rows in SQLite: one row per job (its JSON), one per result row. One process
    holds the file (an exclusive lock on it), so a second service on the same folder is refused."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_file: IO[bytes] = (path.parent / f".{path.name}.lock").open("ab")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise JobsBusy(f"another service keeps its jobs in {path}; stop it, or set JOBS_PATH") from None
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, created TEXT, record TEXT)")
        self._db.execute("CREATE TABLE IF NOT EXISTS job_rows (job TEXT, seq INTEGER, row TEXT)")
        self._db.execute("CREATE INDEX IF NOT EXISTS job_rows_by_job ON job_rows (job, seq)")
        self._lock = threading.Lock()

    def load(self) -> list[Job]:
        with self._lock:
            found = self._db.execute("SELECT record FROM jobs ORDER BY created, rowid").fetchall()
        return [Job.model_validate_json(record) for (record,) in found]

    def save(self, job: Job) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO jobs (id, created, record) VALUES (?, ?, ?)",
                (job.id, job.created_at, job.model_dump_json()),
            )

    def add_rows(self, job_id: str, start: int, rows: list[dict[str, str]]) -> None:
        with self._lock:
            self._db.executemany(
                "INSERT INTO job_rows (job, seq, row) VALUES (?, ?, ?)",
                [(job_id, start + i, json.dumps(row, ensure_ascii=False)) for i, row in enumerate(rows)],
            )

    def rows(self, job_id: str, offset: int = 0, limit: int = -1) -> list[dict[str, str]]:
        """The job's rows from `offset`, `limit` of them (-1: all)."""
        with self._lock:
            found = self._db.execute(
                "SELECT row FROM job_rows WHERE job = ? ORDER BY seq LIMIT ? OFFSET ?", (job_id, limit, offset)
            ).fetchall()
        return [json.loads(row) for (row,) in found]

    def count_rows(self, job_id: str) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM job_rows WHERE job = ?", (job_id,)).fetchone()[0])

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            self._db.execute("DELETE FROM job_rows WHERE job = ?", (job_id,))

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self._lock_file.close()


class Jobs:
    def __init__(
        self, path: Path | None = None, *, max_queued: int = 1_000, redact: Callable[[str], str] = lambda text: text
    ) -> None:
        """Jobs kept in memory, or (`path`) in a SQLite file that survives a restart: the jobs a previous
        process left queued or running are marked `interrupted` here, and the rows of every job live there
        (not in memory). `max_queued`: jobs waiting at most (JobsFull past it). `redact`: what an error
        message becomes before a client or the record sees it (server paths taken out)."""
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._rows: dict[str, list[dict[str, str]]] = {}  # only without a file
        self._row_counts: dict[str, int] = {}
        self._max_queued = max_queued
        self._redact = redact
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._queue: queue.SimpleQueue[tuple[Job, Work, Cleanup | None, contextvars.Context] | None] = (
            queue.SimpleQueue()
        )
        self._current: tuple[Job, threading.Event] | None = None
        self._records = JobRecords(path) if path is not None else None
        if self._records is not None:
            for job in self._records.load():
                if job.status in ("queued", "running"):
                    was = job.status
                    job.status, job.finished_at = "interrupted", _now()
                    job.error = f"{INTERRUPTED} (the previous process ended while the job was {was})"
                    self._records.save(job)
                self._jobs[job.id] = job
            self._trim()
        self._worker = threading.Thread(target=self._work, name="job", daemon=True)
        self._worker.start()

    def submit(
        self, kind: JobKind, catalogue: str, work: Work, *, cleanup: Cleanup | None = None, warning: str | None = None
    ) -> Job:
        """Queue `work`; `cleanup` runs once the job is over, however it ended (even if it never started),
        before its status says so. `warning` is shown with the job."""
        if self._stop.is_set():
            raise JobsClosed("the service is stopping and takes no new jobs")
        self.check_room()
        job = Job(
            id=uuid.uuid4().hex, kind=kind, catalogue=catalogue, status="queued", created_at=_now(), warning=warning
        )
        with self._lock:
            self._jobs[job.id] = job
            self._trim()
            self._save(job)
            # the request's context: the job's log lines carry the id of the request that submitted it
            self._queue.put((job, work, cleanup, contextvars.copy_context()))
        log.info("%s job %s queued for catalogue %s", kind, job.id, catalogue)
        return job.model_copy()

    def queued(self) -> int:
        with self._lock:
            return sum(job.status == "queued" for job in self._jobs.values())

    def check_room(self) -> None:
        """JobsFull when `max_queued` jobs are waiting already (a route asks before it takes an upload)."""
        if self.queued() >= self._max_queued:
            raise JobsFull(f"{self._max_queued} jobs are waiting already (MAX_QUEUED_JOBS)")

    def _trim(self) -> None:
        while len(self._jobs) > KEPT_JOBS:
            oldest = next((k for k, j in self._jobs.items() if j.status in ("done", "failed", "interrupted")), None)
            if oldest is None:
                break
            del self._jobs[oldest]
            self._rows.pop(oldest, None)
            self._row_counts.pop(oldest, None)
            if self._records is not None:
                self._records.forget(oldest)

    def _save(self, job: Job) -> None:
        if self._records is not None:
            self._records.save(job)

    def _update(self, job: Job, **changes: object) -> None:
        with self._lock:
            if job.status != "running":  # marked interrupted at shutdown: the job's late updates are dropped
                return
            for key, value in changes.items():
                setattr(job, key, value)
            self._save(job)

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            job, work, cleanup, context = item
            if self._stop.is_set():
                self._drop(job, cleanup)
            else:
                context.run(self._run, job, work, cleanup)

    def _drop(self, job: Job, cleanup: Cleanup | None) -> None:
        """A queued job the shutdown came before: interrupted, its upload removed."""
        self._end(job, "interrupted", f"JobCancelled: {INTERRUPTED}")
        _clean(cleanup)

    def _end(self, job: Job, status: str, error: str | None) -> bool:
        """Record how `job` ended, unless shutdown already marked it interrupted; False then."""
        with self._lock:
            if job.status == "interrupted":
                return False
            job.status, job.error, job.finished_at = status, error, _now()  # type: ignore[assignment]
            self._save(job)
        metrics.JOBS_FINISHED.labels(job.kind, job.status).inc()
        return True

    def _run(self, job: Job, work: Work, cleanup: Cleanup | None) -> None:
        token = JOB_ID.set(job.id)
        stop = threading.Event()
        cleaned = False

        def clean() -> None:  # once, before the status says the job is over: a client then finds nothing left
            nonlocal cleaned
            if not cleaned:
                cleaned = True
                _clean(cleanup)

        with self._lock:
            job.status, job.started_at = "running", _now()
            self._current = (job, stop)
            self._save(job)
        if self._stop.is_set():
            stop.set()
        metrics.JOBS_RUNNING.inc()
        log.info("%s job started", job.kind)
        try:
            for rows in work(JobHandle(job, self, stop)):
                with self._lock:
                    if job.status != "running":
                        break
                    start = self._row_counts.get(job.id, 0)
                    if self._records is not None:
                        if rows:
                            self._records.add_rows(job.id, start, rows)
                    else:
                        self._rows.setdefault(job.id, []).extend(rows)
                    self._row_counts[job.id] = start + len(rows)
                    job.done += 1
                    self._save(job)
                if stop.is_set():
                    raise JobCancelled(INTERRUPTED)
            clean()
            if self._end(job, "done", None):
                log.info("%s job done", job.kind)
        except Exception as exc:  # a job's failure is reported in its status, never lost in a thread
            clean()
            if stop.is_set():  # stopped by the shutdown, whatever the work raised on its way out
                self._end(job, "interrupted", f"{type(exc).__name__}: {INTERRUPTED}")
                log.warning("%s job interrupted by the shutdown: %s", job.kind, exc)
            elif self._end(job, "failed", self._redact(f"{type(exc).__name__}: {exc}")):
                log.warning("%s job failed: %s", job.kind, job.error, exc_info=exc)
        finally:
            metrics.JOBS_RUNNING.dec()
            with self._lock:
                self._current = None
            clean()  # what escaped the handlers above
            JOB_ID.reset(token)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            job = self._jobs.get(job_id)
            return job.model_copy() if job else None

    def rows(self, job_id: str, offset: int = 0, limit: int | None = None) -> list[dict[str, str]]:
        """A job's rows from `offset`, `limit` of them (None: all)."""
        if self._records is not None:
            return self._records.rows(job_id, offset, -1 if limit is None else limit)
        with self._lock:
            kept = self._rows.get(job_id, [])
            return list(kept[offset : None if limit is None else offset + limit])

    def stop(self) -> None:
        """Take no new job and ask the running one to stop at once (an ingest stops its photo fetches, a match
        job after its product); queued jobs will be marked interrupted. Called as soon as shutdown begins."""
        self._stop.set()
        with self._lock:
            if self._current is not None:
                self._current[1].set()

    def close(self, timeout: float = 30.0) -> None:
        """`stop`, then wait up to `timeout` seconds for the running job to end; one still running then is
        marked interrupted and left to its daemon thread (the process does not wait for it)."""
        self.stop()
        self._queue.put(None)  # the worker takes the queued jobs (each marked interrupted), then ends
        self._worker.join(timeout)
        with self._lock:
            current = self._current
        if current is not None:
            job = current[0]
            log.warning("%s job %s still runs %.0f s into the shutdown: marked interrupted", job.kind, job.id, timeout)
            self._end(job, "interrupted", f"JobCancelled: {INTERRUPTED}")
            while True:  # the worker is busy for good: the queued jobs are dropped here
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    self._drop(item[0], item[2])
        elif self._records is not None:
            self._records.close()


def sweep_uploads(folder: Path) -> int:
    """Remove what uploads left in `folder` (a crash between an upload and the end of its job): at start no
    job is running, so every entry there is an orphan. Returns how many were removed."""
    if not folder.is_dir():
        return 0
    removed = 0
    for entry in folder.iterdir():
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed += 1
        except OSError as exc:
            log.warning("cannot remove the orphaned upload %s: %s", entry.name, exc.strerror or exc)
    return removed


def sweep_extractions(sources: Path, *, older_than_s: float = 3_600) -> int:
    """Remove half-extracted zips (`<sources>/<catalogue>/.<name>.<random>`, renamed into place only when
    whole) that a killed ingest left behind; ones younger than `older_than_s` may belong to a running ingest
    of another process and stay. Returns how many were removed."""
    if not sources.is_dir():
        return 0
    removed = 0
    now = time.time()
    for catalogue in sources.iterdir():
        if not catalogue.is_dir() or catalogue.name.startswith("."):
            continue
        for entry in catalogue.iterdir():
            try:
                if entry.name.startswith(".") and entry.is_dir() and now - entry.stat().st_mtime > older_than_s:
                    shutil.rmtree(entry)
                    removed += 1
            except OSError as exc:
                log.warning("cannot remove the half-extracted %s: %s", entry.name, exc.strerror or exc)
    return removed


def _clean(cleanup: Cleanup | None) -> None:
    if cleanup is None:
        return
    try:
        cleanup()
    except Exception:
        log.exception("a job's clean-up failed")
