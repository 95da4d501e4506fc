"""Micro-batching: concurrent queries share model calls and get their own rows; a full queue, a timeout
and a failing model each reach the waiting requests as clear errors."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from PIL import Image

from retrieval.ocr import ReadTimeout, TextReader
from retrieval.search import QueryVectors, SearchEngine
from service.batching import BatchedEncoders, MicroBatcher, Overloaded, torch_threads_for
from tests.conftest import SAMPLE

PHOTOS = sorted((SAMPLE.parent / "queries").glob("*.jpg"))
TEXTS = ["oat milk", "apple juice", "Arla standard milk", "golden delicious", "red bell pepper", "yoghurt"]


def batched(engine: SearchEngine, **options: Any) -> BatchedEncoders:
    """The service's encoders over the session's models (to be made on the event loop), `options` over defaults."""
    defaults: dict[str, Any] = {"window_s": 0.0, "max_batch": 8, "max_queue": 8, "timeout_s": 5}
    return BatchedEncoders(engine.image_encoder, engine.text_encoder, **{**defaults, **options})


def test_concurrent_queries_share_batches_and_get_their_own_vectors(engine: SearchEngine) -> None:
    batches: list[int] = []
    photos = [Image.open(p).convert("RGB") for p in PHOTOS]
    queries = [(photos[i % len(photos)], TEXTS[i % len(TEXTS)]) for i in range(8)]

    async def run() -> list[QueryVectors]:
        encoders = batched(
            engine,
            window_s=0.2,
            max_batch=32,
            max_queue=64,
            timeout_s=60,
            observe=lambda modality: lambda size, waited: batches.append(size),
        )
        try:  # as the service runs them: each query's encoding in a worker thread of its own
            jobs = (asyncio.to_thread(engine.encode_query, image, text, embedder=encoders) for image, text in queries)
            return list(await asyncio.gather(*jobs))
        finally:
            await encoders.close()

    together = asyncio.run(run())
    views = 1 + len(engine.query_crops)  # each photo is embedded whole and as its centre crops
    assert max(batches) > 1 and sum(batches) == 8 * views + 8  # 8 photos and 8 texts, in fewer model calls
    for (image, text), vectors in zip(queries, together, strict=True):
        alone = engine.encode_query(image, text)
        assert alone.image is not None and vectors.image is not None
        assert alone.text is not None and vectors.text is not None
        assert float(alone.image @ vectors.image) > 0.999 and float(alone.text @ vectors.text) > 0.9999
        assert vectors.lexical == alone.lexical


def slow_batcher(release: threading.Event, *, max_queue: int, timeout_s: float = 30) -> MicroBatcher[int]:
    def embed(items: Sequence[int]) -> np.ndarray:
        release.wait(10)
        return np.asarray([[float(i)] for i in items])

    return MicroBatcher("test", embed, window_s=0.0, max_batch=1, max_queue=max_queue, timeout_s=timeout_s)


def test_a_full_queue_refuses_at_once_and_the_rest_still_answer() -> None:
    release = threading.Event()

    async def run() -> tuple[list[np.ndarray], bool]:
        batcher = slow_batcher(release, max_queue=1)
        first = asyncio.create_task(batcher.embed(1))  # taken by the worker, which blocks in the model
        await asyncio.sleep(0.1)
        second = asyncio.create_task(batcher.embed(2))  # waits in the queue (size 1)
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded, match="1 requests waiting"):
            await batcher.embed(3)
        refused_while_busy = not first.done()  # refused at once: the model had not even finished the first
        release.set()
        rows = list(await asyncio.gather(first, second))
        await batcher.close()
        return rows, refused_while_busy

    rows, refused_while_busy = asyncio.run(run())
    assert [float(r[0]) for r in rows] == [1.0, 2.0]
    assert refused_while_busy


def test_a_request_past_its_timeout_gives_up_and_a_model_error_reaches_every_waiter() -> None:
    release = threading.Event()

    async def timeout() -> None:
        batcher = slow_batcher(release, max_queue=4, timeout_s=0.2)
        with pytest.raises(Overloaded, match="within 0.2 s"):
            await batcher.embed(1)
        release.set()
        await batcher.close()

    asyncio.run(timeout())

    def broken(items: Sequence[int]) -> np.ndarray:
        raise RuntimeError("model exploded")

    async def failing() -> list[BaseException | np.ndarray]:
        batcher: MicroBatcher[int] = MicroBatcher("broken", broken, window_s=0.1, max_batch=8, max_queue=8, timeout_s=5)
        results = await asyncio.gather(batcher.embed(1), batcher.embed(2), return_exceptions=True)
        await batcher.close()
        return list(results)

    assert [str(r) for r in asyncio.run(failing())] == ["model exploded", "model exploded"]


def test_the_two_models_split_the_cores_unless_told() -> None:
    assert torch_threads_for(0, 2) == 1  # this machine: one core each for the photo and the text model
    assert torch_threads_for(0, 16) == 8
    assert torch_threads_for(0, 1) == 1
    assert torch_threads_for(0, None) == 1
    assert torch_threads_for(3, 16) == 3  # TORCH_THREADS wins


class HeldReader(TextReader):
    """A reader that holds every read until released, then reads for real: reads pile up as under load."""

    def __init__(self, release: threading.Event) -> None:
        super().__init__()
        self.release = release

    def read(self, image: Image.Image, *, deadline: float | None = None) -> str:
        self.release.wait(10)
        return super().read(image, deadline=deadline)


def test_reads_of_query_photos_are_bounded_and_a_late_one_gives_up(engine: SearchEngine) -> None:
    release = threading.Event()
    photo = Image.open(PHOTOS[0])

    async def run() -> list[BaseException | str]:
        encoders = batched(engine, reader=HeldReader(release), read_deadline_s=0.3, max_reads=2)
        held = [encoders.read(photo), encoders.read(photo)]  # one read running (held), one waiting behind it
        with pytest.raises(Overloaded, match="2 query photos are waiting"):
            encoders.read(photo)  # refused at once, not queued
        await asyncio.sleep(0.5)  # past both deadlines
        release.set()
        outcomes: list[BaseException | str] = list(
            await asyncio.gather(*map(asyncio.wrap_future, held), return_exceptions=True)
        )
        again = encoders.read(photo)  # room again once they ended
        outcomes.append((await asyncio.gather(asyncio.wrap_future(again), return_exceptions=True))[0])
        await encoders.close()
        return outcomes

    first, second, third = asyncio.run(run())
    assert isinstance(first, ReadTimeout) and isinstance(second, ReadTimeout)
    assert isinstance(third, str | ReadTimeout)
