"""Background jobs of the service: run one at a time in a worker thread (they share the encoders and
the store with searches), with their progress and results kept in memory for the most recent ones."""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

from schemas.jobs import Job

KEPT_JOBS = 100

Work = Callable[["JobHandle"], Iterable[list[dict[str, str]]]]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class JobHandle:
    """What a running job sees of itself: its totals to set."""

    def __init__(self, job: Job) -> None:
        self.job = job

    def set_total(self, total: int) -> None:
        self.job.total = total


class Jobs:
    def __init__(self) -> None:
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._rows: dict[str, list[dict[str, str]]] = {}
        self._lock = threading.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="job")

    def submit(self, kind: str, catalogue: str, work: Work) -> Job:
        job = Job(id=uuid.uuid4().hex, kind=kind, catalogue=catalogue, status="queued", created_at=_now())
        with self._lock:
            self._jobs[job.id] = job
            self._rows[job.id] = []
            while len(self._jobs) > KEPT_JOBS:
                oldest = next((k for k, j in self._jobs.items() if j.status in ("done", "failed")), None)
                if oldest is None:
                    break
                del self._jobs[oldest], self._rows[oldest]
        self._worker.submit(self._run, job, work)
        return job.model_copy()

    def _run(self, job: Job, work: Work) -> None:
        job.status, job.started_at = "running", _now()
        try:
            for rows in work(JobHandle(job)):
                with self._lock:
                    self._rows[job.id].extend(rows)
                    job.done += 1
            job.status = "done"
        except Exception as exc:  # a job's failure is reported in its status, never lost in a thread
            job.status, job.error = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            job.finished_at = _now()

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            job = self._jobs.get(job_id)
            return job.model_copy() if job else None

    def rows(self, job_id: str) -> list[dict[str, str]]:
        with self._lock:
            return list(self._rows.get(job_id, []))

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)
