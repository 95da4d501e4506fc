"""Micro-batching of the encoders: concurrent requests' photos (and texts) are embedded together in one
model call, run off the event loop, and each request gets its own row back.

On a CPU a batch of 8 photos costs far less than 8 single forwards, so under load the service answers
more requests per second. A batch takes whatever is queued when the model is free: a lone request runs at
once (no added latency), and requests that arrive while a batch runs form the next one. An optional
window (`BATCH_WINDOW_MS`) waits that long for more before running. Each model has one worker thread of
its own, so a request's photo and text are embedded side by side, and torch's intra-op threads are split
between the two (`TORCH_THREADS`, `torch_threads_for`): on 2 cores one each, which also keeps a core for
the requests' HTTP and store work and avoids torch thread teams of several threads competing for the same
cores (measured in docs/BENCHMARKS.md). The queue in front of each model is bounded: when it is full the
request is refused at once (503 with Retry-After) instead of waiting without end, and a request that
waits longer than its timeout gives up."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import torch
from PIL import Image

from retrieval.encoders.base import ImageEncoder, TextEncoder
from retrieval.ocr import TextReader
from service.metrics import encoder_batch_observer
from service.state import AppState

Item = TypeVar("Item")


class Overloaded(RuntimeError):
    """The encoder queue is full or the request waited past its timeout: try again shortly."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class _Waiting(Generic[Item]):
    item: Item
    future: asyncio.Future[np.ndarray]
    queued_at: float


# Called with (batch size, seconds the first request of the batch waited): metrics hook it.
BatchObserver = Callable[[int, float], None]


class MicroBatcher(Generic[Item]):
    """Collects items for up to `window_s` (or `max_batch` items) and embeds them with one call of `embed`
    on its worker thread (one forward of this model at a time)."""

    def __init__(
        self,
        name: str,
        embed: Callable[[Sequence[Item]], np.ndarray],
        *,
        window_s: float,
        max_batch: int,
        max_queue: int,
        timeout_s: float,
        observe: BatchObserver | None = None,
    ) -> None:
        self.name = name
        self._embed = embed
        self._window_s = window_s
        self._max_batch = max_batch
        self._timeout_s = timeout_s
        self._observe = observe
        self._queue: asyncio.Queue[_Waiting[Item]] = asyncio.Queue(maxsize=max_queue)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"encode-{name}")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._worker.shutdown(wait=False, cancel_futures=True)

    async def embed(self, item: Item) -> np.ndarray:
        """This item's row, computed in a batch with whatever else arrived within the window."""
        self.start()
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Waiting(item, future, time.perf_counter()))
        except asyncio.QueueFull:
            raise Overloaded(f"the {self.name} encoder has {self._queue.qsize()} requests waiting") from None
        try:
            return await asyncio.wait_for(asyncio.shield(future), self._timeout_s)
        except TimeoutError:
            future.cancel()  # the batch still runs; nobody waits for this row any more
            raise Overloaded(f"the {self.name} encoder did not answer within {self._timeout_s:g} s") from None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self._window_s
            while len(batch) < self._max_batch:
                if not self._queue.empty():  # what arrived while the model was busy
                    batch.append(self._queue.get_nowait())
                    continue
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), timeout))
                except TimeoutError:
                    break
            batch = [w for w in batch if not w.future.cancelled()]
            if not batch:
                continue
            if self._observe:
                self._observe(len(batch), time.perf_counter() - batch[0].queued_at)
            try:
                rows = await loop.run_in_executor(self._worker, self._embed, [w.item for w in batch])
            except Exception as exc:  # every waiting request hears of the failure
                for waiting in batch:
                    if not waiting.future.done():
                        waiting.future.set_exception(exc)
                continue
            for waiting, row in zip(batch, rows, strict=True):
                if not waiting.future.done():
                    waiting.future.set_result(row)


class BatchedEncoders:
    """The service's `QueryEmbedder`: query rows computed by micro-batchers on the app's event loop. Called
    from a request's worker thread (the search runs off the loop): photos are preprocessed there and
    batched as tensors, texts batched as strings; each call returns a future of the row at once."""

    def __init__(
        self,
        image_encoder: ImageEncoder,
        text_encoder: TextEncoder,
        *,
        window_s: float,
        max_batch: int,
        max_queue: int,
        timeout_s: float,
        observe: Callable[[str], BatchObserver] | None = None,
        reader: TextReader | None = None,
        read_deadline_s: float | None = None,
        max_reads: int = 8,
    ) -> None:
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self._loop = asyncio.get_running_loop()  # made on the app's loop, where the batchers run
        self._reader = reader or TextReader()
        # OCR is not batched (one photo at a time is how the engine runs): one thread of its own, beside the
        # encoders' threads, so a photo's text is read while its vector is computed. Each read has a deadline
        # counted from its submission (a read that waited past it gives up at once), and at most `max_reads`
        # are queued or running: more are refused (503) rather than piled up.
        self._reading = ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-text")
        self._read_deadline_s = read_deadline_s
        self._max_reads = max_reads
        self._reads = threading.BoundedSemaphore(max_reads)

        def batcher(name: str, embed: Callable[[Sequence[Item]], np.ndarray]) -> MicroBatcher[Item]:
            return MicroBatcher(
                name,
                embed,
                window_s=window_s,
                max_batch=max_batch,
                max_queue=max_queue,
                timeout_s=timeout_s,
                observe=observe(name) if observe else None,
            )

        self.images: MicroBatcher[torch.Tensor] = batcher(
            "image", lambda tensors: image_encoder.embed_tensors(torch.stack(list(tensors)))
        )
        self.texts: MicroBatcher[str] = batcher("text", lambda texts: text_encoder.embed_texts(list(texts)))
        # With a CLIP image encoder, a text alone also searches the photos (see SearchEngine.encode_query).
        self.cross_modal: MicroBatcher[str] | None = None
        if isinstance(image_encoder, TextEncoder) and image_encoder is not text_encoder:
            clip = image_encoder
            self.cross_modal = batcher("image-text", lambda texts: clip.embed_texts(list(texts)))

    def _submit(self, batcher: MicroBatcher[Item], item: Item) -> Future[np.ndarray]:
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:  # no loop runs in this thread: a worker thread, as it should be
            on_loop = False
        if on_loop:  # waiting for the row here would block the loop that computes it
            raise RuntimeError("BatchedEncoders is called from a worker thread, not from the event loop")
        return asyncio.run_coroutine_threadsafe(batcher.embed(item), self._loop)

    def photos(self, images: Sequence[Image.Image]) -> list[Future[np.ndarray]]:
        return [self._submit(self.images, self.image_encoder.preprocess(image)) for image in images]

    def text(self, text: str) -> Future[np.ndarray]:
        return self._submit(self.texts, text)

    def text_as_photo(self, text: str) -> Future[np.ndarray]:
        if self.cross_modal is None:
            raise TypeError(f"{self.image_encoder.name} does not embed texts apart from the text encoder")
        return self._submit(self.cross_modal, text)

    def read(self, image: Image.Image) -> Future[str]:
        if not self._reads.acquire(blocking=False):
            raise Overloaded(f"{self._max_reads} query photos are waiting for their text to be read")
        deadline = None if self._read_deadline_s is None else time.monotonic() + self._read_deadline_s
        try:
            future = self._reading.submit(self._reader.read, image, deadline=deadline)
        except BaseException:
            self._reads.release()
            raise
        future.add_done_callback(lambda _: self._reads.release())
        return future

    async def close(self) -> None:
        for batcher in (self.images, self.texts, self.cross_modal):
            if batcher is not None:
                await batcher.close()
        self._reading.shutdown(wait=False, cancel_futures=True)


def torch_threads_for(setting: int, cores: int | None) -> int:
    """Intra-op threads for the service's models: TORCH_THREADS when set, else half the cores (the image
    and the text model run side by side), at least one."""
    return setting if setting > 0 else max(1, (cores or 2) // 2)


def batched_encoders(state: AppState) -> BatchedEncoders:
    settings = state.settings
    torch.set_num_threads(torch_threads_for(settings.torch_threads, os.cpu_count()))
    return BatchedEncoders(
        state.engine.image_encoder,
        state.engine.text_encoder,
        window_s=settings.batch_window_ms / 1000,
        max_batch=settings.batch_max,
        max_queue=settings.encoder_queue,
        timeout_s=settings.request_timeout_s,
        observe=encoder_batch_observer,
        reader=state.engine.reader,
        read_deadline_s=settings.ocr_deadline_s,
        max_reads=settings.ocr_queue,
    )
