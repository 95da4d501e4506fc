"""`python -m bench speed serve`: the real service (uvicorn, a child process on loopback) under load from
this process: /search with a photo and a text, 1 and 8 concurrent clients, micro-batching on and off,
and requests arriving at random at 70% of the batched service's saturation rate (open loop), measured side
by side in one run; plus the in-process cost of one query (both encoders + the store) and
an optional steady-load soak watching the server's memory."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample" / "grocery"
QUERIES = [
    ("Arla-Standard-Milk_001.jpg", "Arla standard milk"),
    ("Granny-Smith_001.jpg", "green apple"),
    ("Oatly-Natural-Oatghurt_001.jpg", "oat yoghurt"),
]


@dataclass
class Load:
    label: str
    clients: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    errors: int = 0

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# How the image backbone runs (`--runtime`): the settings a service gets for each
RUNTIMES = {
    "auto": {},
    "torch-bf16": {"INFERENCE": "torch", "IMAGE_PRECISION": "bf16"},
    "torch-fp32": {"INFERENCE": "torch", "IMAGE_PRECISION": "fp32"},
    "onnx-fp32": {"INFERENCE": "onnx", "IMAGE_PRECISION": "fp32"},
}


def build_store(folder: Path, runtime: str = "auto") -> dict[str, str]:
    """The sample catalogue ingested under `runtime` (a catalogue's vectors carry their runtime in its
    fingerprint: each runtime's service gets a store of its own); the environment a service then runs with."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QDRANT_")}
    env.update(QDRANT_PATH=str(folder / "qdrant"), DEFAULT_CATALOGUE="grocery", MODELS_PATH=str(folder / "models"))
    env.update(RUNTIMES[runtime])
    subprocess.run(
        [sys.executable, "-m", "ingest", str(SAMPLE / "catalogue.csv"), "--catalogue", "grocery", "--no-progress"],
        cwd=ROOT, env=env, check=True, capture_output=True,
    )  # fmt: skip
    return env


def in_process_costs(env: dict[str, str], repeats: int = 20) -> dict[str, float]:
    """Median ms of the parts of one query, measured in this process on the same store (before serving)."""
    from retrieval.images import decode_image
    from retrieval.runtime import open_runtime
    from retrieval.settings import Settings
    from schemas.search import SearchOptions

    settings = Settings(
        qdrant_path=Path(env["QDRANT_PATH"]),
        models_path=Path(env["MODELS_PATH"]),
        default_catalogue="grocery",
        inference=env.get("INFERENCE", "auto"),
        image_precision=env.get("IMAGE_PRECISION", "auto"),
    )
    runtime = open_runtime(settings, serving=True)
    store, engine = runtime.store, runtime.engine
    try:
        photo, text = (SAMPLE / "queries" / QUERIES[0][0]).read_bytes(), QUERIES[0][1]
        parts: dict[str, list[float]] = {"decode": [], "image": [], "text": [], "store": []}
        for _ in range(repeats + 2):
            t0 = time.perf_counter()
            image = decode_image(photo, max_pixels=settings.max_image_pixels)
            t1 = time.perf_counter()
            with_image = engine.encode_query(image, None)
            t2 = time.perf_counter()
            with_text = engine.encode_query(None, text)
            t3 = time.perf_counter()
            vectors = type(with_image)(image=with_image.image, text=with_text.text, lexical=with_text.lexical)
            engine.search_vectors("grocery", vectors, options=SearchOptions(limit=10))
            t4 = time.perf_counter()
            for name, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                parts[name].append(seconds * 1000)
        return {name: statistics.median(values[2:]) for name, values in parts.items()}
    finally:
        store.close()


@contextmanager
def serving(env: dict[str, str], *, batching: bool) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "--port", str(port)],
        cwd=ROOT,
        env={**env, "MICRO_BATCHING": "true" if batching else "false"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError("the service exited while starting")
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        yield base, process
    finally:
        process.terminate()
        process.wait(timeout=60)


async def search_once(
    http: httpx.AsyncClient, base: str, i: int, photos: list[bytes], result: Load, since: float
) -> None:
    """Query `i` of the rotation (a photo and its text) against /search; its latency counted from `since`."""
    name, text = QUERIES[i % len(QUERIES)]
    try:
        response = await http.post(
            f"{base}/search",
            files={"image": (name, photos[i % len(photos)], "image/jpeg")},
            data={"text": text, "limit": "10"},
        )
        ok = response.status_code == 200
    except httpx.HTTPError:
        ok = False
    if ok:
        result.latencies.append(time.perf_counter() - since)
    else:
        result.errors += 1


async def load(base: str, label: str, clients: int, seconds: float) -> Load:
    photos = [(SAMPLE / "queries" / name).read_bytes() for name, _ in QUERIES]
    result = Load(label, clients, seconds)
    stop = time.perf_counter() + seconds

    async def client(number: int, http: httpx.AsyncClient) -> None:
        i = number
        while time.perf_counter() < stop:
            await search_once(http, base, i, photos, result, time.perf_counter())
            i += clients

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.gather(*(client(n, http) for n in range(clients)))
    return result


async def open_loop(base: str, rate: float, seconds: float, *, seed: int = 0) -> Load:
    """Requests arriving at random (Poisson, `rate` per second) for `seconds`, each sent whether or not the
    ones before it have been answered, as independent shoppers would. A latency is counted from the moment
    the request was due, not from when it went out, so a stalled client cannot hide a queue."""
    photos = [(SAMPLE / "queries" / name).read_bytes() for name, _ in QUERIES]
    result = Load(f"open loop, {rate:.1f} requests/s", 0, seconds)
    rng = random.Random(seed)

    tasks: list[asyncio.Task[None]] = []
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=256)) as http:
        start, offset, i = time.perf_counter(), 0.0, 0
        while (offset := offset + rng.expovariate(rate)) < seconds:
            due = start + offset
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.create_task(search_once(http, base, i, photos, result, due)))
            i += 1
        await asyncio.gather(*tasks)
    return result


def warm(base: str) -> None:
    asyncio.run(load(base, "warm-up", 2, 3))


OPEN_LOOP_SHARE = 0.7  # of the saturation rate (the batched service's throughput at 8 closed-loop clients)


def run_serve(*, seconds: float, soak_s: float, runtimes: tuple[str, ...] = ("auto",)) -> str:
    """The table for each of `runtimes` (RUNTIMES), one after the other in one run; the soak on the first."""
    sections = []
    for runtime in runtimes:
        table = _serve_runtime(runtime, seconds=seconds, soak_s=soak_s if runtime == runtimes[0] else 0)
        sections.append(table if len(runtimes) == 1 else f"Image backbone: **{runtime}**\n\n{table}")
    return "\n\n".join(sections)


def _serve_runtime(runtime: str, *, seconds: float, soak_s: float) -> str:
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        env = build_store(Path(tmp), runtime)
        costs = in_process_costs(env)
        runs: dict[tuple[bool, int], Load] = {}
        for batching in (True, False):
            with serving(env, batching=batching) as (base, _):
                warm(base)
                for clients in (1, 8):
                    label = f"batching {'on' if batching else 'off'}"
                    runs[(batching, clients)] = asyncio.run(load(base, label, clients, seconds))
                if batching:
                    saturation = runs[(True, 8)].rate
                    opened = asyncio.run(open_loop(base, OPEN_LOOP_SHARE * saturation, seconds))
        soak_lines = soak(env, soak_s) if soak_s > 0 else []
    lines = [
        "| service | clients | requests | errors | requests/s | p50 ms | p95 ms |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in (*runs.values(), opened):
        shown = str(run.clients) if run.clients else "-"
        lines.append(
            f"| {run.label} | {shown} | {len(run.latencies)} | {run.errors} | {run.rate:.1f} | "
            f"{run.percentile(0.5):.0f} | {run.percentile(0.95):.0f} |"
        )
    parts = " + ".join(f"{name} {ms:.1f}" for name, ms in costs.items())
    inside = sum(costs.values())
    on1, on8, off8 = runs[(True, 1)], runs[(True, 8)], runs[(False, 8)]
    lines += [
        "",
        f"- in-process parts of one query (median ms): {parts} = **{inside:.1f} ms**",
        f"- 8 clients, throughput batching on / off: **{on8.rate / off8.rate:.2f}x** (target >= 1.8x)",
        f"- open loop at {OPEN_LOOP_SHARE:.0%} of the saturation rate ({on8.rate:.1f} requests/s, batching on, 8 "
        f"clients), batching on: p95 / single-client p50 **{opened.percentile(0.95) / on1.percentile(0.5):.2f}** "
        "(target <= 3)",
        f"- p95 at 8 closed-loop clients / single-client p50 (batching on): "
        f"{on8.percentile(0.95) / on1.percentile(0.5):.2f} (the queue of 8 always-waiting clients)",
        f"- single-client p50 / in-process cost: **{on1.percentile(0.5) / inside:.2f}** (target <= 1.2)",
        *soak_lines,
    ]
    return "\n".join(lines)


def soak(env: dict[str, str], seconds: float) -> list[str]:
    """Steady load (4 clients, batching on) for `seconds`, the server's RSS sampled every 10 s."""
    with serving(env, batching=True) as (base, process):
        warm(base)
        samples = [rss_mib(process.pid)]
        total = Load("soak", 4, 0)
        remaining = seconds
        while remaining > 0:
            step = min(10.0, remaining)
            part = asyncio.run(load(base, "soak", 4, step))
            total.latencies += part.latencies
            total.errors += part.errors
            total.seconds += step
            remaining -= step
            samples.append(rss_mib(process.pid))
    settled = samples[1]  # after the first 10 s of load: caches and allocator pools are warm
    drift = (samples[-1] - settled) / settled * 100
    return [
        f"- soak: {seconds:.0f} s at 4 clients, {len(total.latencies)} requests, **{total.errors} errors**, "
        f"p95 {total.percentile(0.95):.0f} ms; server RSS {samples[0]:.0f} MiB before, {settled:.0f} after 10 s, "
        f"{samples[-1]:.0f} at the end, max {max(samples):.0f}: **{drift:+.1f}%** from 10 s to the end "
        "(target: within 10%)"
    ]
