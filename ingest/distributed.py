"""The encoders as pools of Ray actors: `python -m ingest PATH --workers N` (a local Ray cluster of N
workers) or `--ray ADDRESS` (an existing cluster).

Only the models move: reading, validating, hashing, the incremental checks, decoding and the writes stay in
the ingest process exactly as without Ray, so rejects, the summary, resumption and the one writer of an
embedded store are unchanged. Each worker is an image-encoder actor and a text-encoder actor; each actor
loads its model once, every encoder batch is split across the actors of its pool and the rows come back in
order. An actor asks for a quarter of a CPU (on a 2-core machine the four actors of two workers and the
driver's decode threads then fit; with a whole CPU each, the driver's work starves) and, where the cluster
has a GPU per worker, half a GPU (a worker's two models share one)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from retrieval.encoders import load_image_encoder, load_text_encoder

log = logging.getLogger(__name__)
ACTOR_CPUS = 0.25


class ImageEncoderActor:
    """One image-model load, in a Ray worker process."""

    def __init__(self, spec: str, precision: str) -> None:
        torch.set_num_threads(1)  # one thread an actor: more cores are used by more workers
        self.encoder = load_image_encoder(spec, precision)

    def name(self) -> str:
        return self.encoder.name

    def embed(self, batch: np.ndarray) -> np.ndarray:
        return self.encoder.embed_tensors(torch.from_numpy(batch))


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

    def close(self) -> None:
        for actor in self.actors:
            self._ray.kill(actor)
        self.actors = []


class RayImageEncoder:
    """An `ImageEncoder` whose `embed_tensors` runs on Ray actors; `preprocess` runs here (decode threads)."""

    def __init__(self, pool: _Pool, name: str, dim: int, preprocess: Any) -> None:
        self._pool, self.name, self.dim, self._preprocess = pool, name, dim, preprocess

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        result: torch.Tensor = self._preprocess(image)
        return result

    def embed_tensors(self, batch: torch.Tensor) -> np.ndarray:
        parts = [p.numpy() for p in torch.tensor_split(batch, min(len(self._pool.actors), len(batch))) if len(p)]
        return self._pool.map(parts, self.dim)


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
        self.image = RayImageEncoder(self._pools[0], image.name, image.dim, image.preprocess)
        self.text = RayTextEncoder(self._pools[1], text.name, text.dim)
        log.info("encoders on %d Ray workers (%s GPU an actor)", workers, gpus)

    def close(self) -> None:
        for pool in self._pools:
            pool.close()
        self._pools = []
        if self._started:
            self._ray.shutdown()
            self._started = False
