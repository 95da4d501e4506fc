"""Prometheus metrics of the service, served at `/metrics`.

Every metric object lives here, in the process-wide default registry, so any module can record into it:
the request middleware (counts and latency per route template and status), the store (time per client
call and time waiting for the store lock), the jobs, and the encoder micro-batcher (batch sizes and the
time a request waited for its batch: call `observe_encoder_batch` or use `encoder_batch_observer`).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest

# Request latency: from a few milliseconds (health, a cached page) to long uploads.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Store calls: the embedded store answers the sample in about a millisecond, a large catalogue in 100s of ms.
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
QUEUE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0)

REQUESTS = Counter(
    "http_requests_total",
    "HTTP requests answered, by method, route template (not the raw path) and status code",
    ["method", "route", "status"],
)
REQUEST_SECONDS = Histogram(
    "http_request_duration_seconds",
    "Time from receiving a request to the end of its response, by method, route template and status code",
    ["method", "route", "status"],
    buckets=LATENCY_BUCKETS,
)
IN_FLIGHT = Gauge("http_requests_in_flight", "HTTP requests being answered now")
STORE_QUERY_SECONDS = Histogram(
    "store_query_seconds",
    "Time of one Qdrant client call (query_points, upsert, scroll...), lock wait excluded",
    ["operation"],
    buckets=STORE_BUCKETS,
)
STORE_LOCK_WAIT_SECONDS = Histogram(
    "store_lock_wait_seconds",
    "Time a call to the embedded store waited for the store lock (an ingest writing, other queries)",
    buckets=STORE_BUCKETS,
)
ENCODER_BATCH = Histogram(
    "encoder_batch_size",
    "Photos or texts embedded in one encoder call of the request micro-batcher",
    ["modality"],
    buckets=BATCH_BUCKETS,
)
ENCODER_QUEUE_SECONDS = Histogram(
    "encoder_queue_seconds",
    "Time a request's photo or text waited in the micro-batcher's queue before its batch ran",
    ["modality"],
    buckets=QUEUE_BUCKETS,
)
JOBS_FINISHED = Counter("jobs_finished_total", "Background jobs finished, by kind and final status", ["kind", "status"])
JOBS_RUNNING = Gauge("jobs_running", "Background jobs running now (one at a time)")


def observe_store_call(operation: str, wait_seconds: float, run_seconds: float) -> None:
    """`ProductStore.observer`: one client call, its time waiting for the lock and its own time."""
    STORE_LOCK_WAIT_SECONDS.observe(wait_seconds)
    STORE_QUERY_SECONDS.labels(operation).observe(run_seconds)


def observe_encoder_batch(modality: str, size: int, queue_seconds: float) -> None:
    """One encoder batch of `size` items (modality `image` or `text`); `queue_seconds`: how long its first
    (longest-waiting) item was queued."""
    ENCODER_BATCH.labels(modality).observe(size)
    ENCODER_QUEUE_SECONDS.labels(modality).observe(queue_seconds)


def encoder_batch_observer(modality: str) -> Callable[[int, float], None]:
    """A `(batch size, queue seconds)` callback bound to one modality, for the micro-batcher."""

    def observe(size: int, queue_seconds: float) -> None:
        observe_encoder_batch(modality, size, queue_seconds)

    return observe


def exposition() -> tuple[bytes, str]:
    """The registry in Prometheus' text format, and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
