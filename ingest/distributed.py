"""The encoders as pools of Ray actors: `python -m ingest PATH --workers N` (a local Ray cluster of N
workers) or `--ray ADDRESS` (an existing cluster).

The work on photos moves to the workers: the ingest process reads a photo's bytes and hashes them (what the
incremental checks need), and an image actor decodes them, reads their text (OCR) when the catalogue wants
it, preprocesses and embeds them, so neither JPEG decoding nor OCR is bound to the ingest machine's cores.
Validating, the incremental checks and the writes stay in the ingest process exactly as without Ray, so
rejects, the summary, resumption and the one writer of an embedded store are unchanged. While an image tail
is active the ingest decodes itself (the tail needs the tensors) and only the forward passes move.
Each worker is an image-encoder actor and a text-encoder actor; each actor loads its model once, batches are
dealt to the actors of a pool in turn and the rows come back in order. An actor asks for a quarter of a CPU
(on a 2-core machine the four actors of two workers and the driver's reading threads then fit; with a whole
CPU each, the driver's work starves) and, where the cluster has a GPU per worker, half a GPU (a worker's two
models share one)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from retrieval.encoders import EmbeddedPhoto, load_image_encoder, load_text_encoder
from retrieval.images import ImageDecodeError, decode_image
from retrieval.ocr import TextReader

log = logging.getLogger(__name__)
ACTOR_CPUS = 0.25


class ImageEncoderActor:
    """One image-model load, in a Ray worker process."""

    def __init__(self, spec: str, precision: str) -> None:
        torch.set_num_threads(1)  # one thread an actor: more cores are used by more workers
        self.encoder = load_image_encoder(spec, precision)
        self.reader = TextReader()  # onnxruntime loads on the first photo read

    def name(self) -> str:
        return self.encoder.name

    def embed(self, batch: np.ndarray) -> np.ndarray:
        return self.encoder.embed_tensors(torch.from_numpy(batch))

    def embed_photos(self, blobs: list[bytes], max_pixels: int, read: bool) -> list[EmbeddedPhoto]:
        """Decode, read (when asked), preprocess and embed a batch of photos; one that does not decode
        comes back with its reason and takes no row."""
        done: list[EmbeddedPhoto] = []
        tensors: list[torch.Tensor] = []
        for blob in blobs:
            try:
                image = decode_image(blob, max_pixels=max_pixels)
            except ImageDecodeError as exc:
                done.append(EmbeddedPhoto(None, error=str(exc)))
                continue
            done.append(EmbeddedPhoto(None, read=self.reader.read(image) if read else None))
            tensors.append(self.encoder.preprocess(image))
        rows = iter(self.encoder.embed_tensors(torch.stack(tensors)) if tensors else ())
        return [photo if photo.error is not None else EmbeddedPhoto(next(rows), photo.read) for photo in done]


class TextEncoderActor:
    """One text-model load, in a Ray worker process."""

    def __init__(self, spec: str, precision: str) -> None:
        torch.set_num_threads(1)
        self.encoder = load_text_encoder(spec, precision)

    def name(self) -> str:
        return self.encoder.name

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.encoder.embed_texts(texts)


class _Pool:
    """Actors of one class, each with one model load; a batch is split across them in order."""

    def __init__(self, ray: Any, actor_class: type, spec: str, precision: str, workers: int, gpus: float) -> None:
        self._ray = ray
        actor = ray.remote(num_cpus=ACTOR_CPUS, num_gpus=gpus)(actor_class)
        self.actors: list[Any] = [actor.remote(spec, precision) for _ in range(workers)]

    def names(self) -> set[str]:
        return set(self._ray.get([a.name.remote() for a in self.actors]))

    def map(self, parts: Sequence[Any], dim: int) -> np.ndarray:
        futures = [actor.embed.remote(part) for actor, part in zip(self.actors, parts, strict=False)]
        rows: list[np.ndarray] = self._ray.get(futures)
        return np.concatenate(rows) if rows else np.zeros((0, dim), dtype=np.float32)

    def deal(self, method: str, parts: Sequence[Any], *args: Any) -> list[Any]:
        """`method(part, *args)` on the actors in turn (an actor runs its calls one after another, so every
        actor is busy while parts remain); the results in the parts' order."""
        actors = itertools.cycle(self.actors)
        return list(self._ray.get([getattr(next(actors), method).remote(part, *args) for part in parts]))

    def close(self) -> None:
        for actor in self.actors:
            self._ray.kill(actor)
        self.actors = []


class RayImageEncoder:
    """An `ImageEncoder` whose `embed_tensors` runs on Ray actors (`preprocess` runs here, for a catalogue
    decoded here) and a `PhotoEmbedder` whose photos are decoded, read and embedded on them."""

    def __init__(self, pool: _Pool, name: str, dim: int, preprocess: Any, batch: int) -> None:
        self._pool, self.name, self.dim, self._preprocess, self.batch = pool, name, dim, preprocess, batch

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        result: torch.Tensor = self._preprocess(image)
        return result

    def embed_tensors(self, batch: torch.Tensor) -> np.ndarray:
        parts = [p.numpy() for p in torch.tensor_split(batch, min(len(self._pool.actors), len(batch))) if len(p)]
        return self._pool.map(parts, self.dim)

    def embed_photos(self, blobs: Sequence[bytes], *, max_pixels: int, read: bool) -> list[EmbeddedPhoto]:
        """A `PhotoEmbedder`: the bytes go to the actors in batches of `batch` photos."""
        parts = [list(blobs[start : start + self.batch]) for start in range(0, len(blobs), self.batch)]
        return [photo for done in self._pool.deal("embed_photos", parts, max_pixels, read) for photo in done]


class RayTextEncoder:
    """A `TextEncoder` whose `embed_texts` runs on Ray actors."""

    def __init__(self, pool: _Pool, name: str, dim: int) -> None:
        self._pool, self.name, self.dim = pool, name, dim

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        shares = np.array_split(np.arange(len(texts)), min(len(self._pool.actors), max(len(texts), 1)))
        parts = [[texts[i] for i in share] for share in shares if len(share)]
        return self._pool.map(parts, self.dim)


class RayEncoders:
    """Both encoders of an ingest on Ray workers: starts a local cluster of `workers` CPUs (or joins the one
    at `address`), loads each model once per actor, checks that the actors loaded the models this process
    names the catalogue's vectors by, and stops what it started on `close`."""

    def __init__(
        self,
        image_spec: str,
        text_spec: str,
        *,
        image_precision: str = "auto",
        text_precision: str = "auto",
        workers: int,
        address: str | None = None,
        batch: int = 8,
    ) -> None:
        import ray

        if workers < 1:
            raise ValueError("at least one Ray worker is needed")
        self._ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            ray.init(
                address=address,
                num_cpus=None if address else workers,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.WARNING,
            )
        # Loaded here too: the image transform runs on this process's decode threads, and both names are
        # what the catalogue records.
        image, text = load_image_encoder(image_spec, image_precision), load_text_encoder(text_spec, text_precision)
        resources: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]
        gpus = 0.5 if resources.get("GPU", 0) >= workers else 0.0
        self._pools = [
            _Pool(ray, ImageEncoderActor, image_spec, image_precision, workers, gpus),
            _Pool(ray, TextEncoderActor, text_spec, text_precision, workers, gpus),
        ]
        for pool, name in zip(self._pools, (image.name, text.name), strict=True):
            if (names := pool.names()) != {name}:
                self.close()
                raise RuntimeError(f"the Ray workers loaded {sorted(names)}, this process {name}")
        self.image = RayImageEncoder(self._pools[0], image.name, image.dim, image.preprocess, batch)
        self.text = RayTextEncoder(self._pools[1], text.name, text.dim)
        log.info("encoders on %d Ray workers (%s GPU an actor)", workers, gpus)

    def close(self) -> None:
        for pool in self._pools:
            pool.close()
        self._pools = []
        if self._started:
            self._ray.shutdown()
            self._started = False
