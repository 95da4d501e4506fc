"""The image encoder as a pool of Ray actors: `python -m ingest PATH --workers N` (a local Ray cluster of N
workers) or `--ray ADDRESS` (an existing cluster).

Only the encoder moves: reading, validating, hashing, the incremental checks, decoding and the writes stay
in the ingest process exactly as without Ray, so rejects, the summary, resumption and the one writer of an
embedded store are unchanged. Each actor loads the model once; every encoder batch is split across the
actors and the rows come back in order. An actor asks for half a CPU (on a 2-core machine two actors and
the driver's decode threads then fit; with a whole CPU each, the driver's work starves) and for one GPU
where the cluster has GPUs."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from PIL import Image

from retrieval.encoders import load_image_encoder

log = logging.getLogger(__name__)
ACTOR_CPUS = 0.5


class EncoderActor:
    """One model load, in a Ray worker process."""

    def __init__(self, spec: str, precision: str) -> None:
        torch.set_num_threads(1)  # one thread an actor: more cores are used by more workers
        self.encoder = load_image_encoder(spec, precision)

    def name(self) -> str:
        return self.encoder.name

    def embed(self, batch: np.ndarray) -> np.ndarray:
        return self.encoder.embed_tensors(torch.from_numpy(batch))


class RayImageEncoder:
    """An `ImageEncoder` whose `embed_tensors` runs on Ray actors; `preprocess` runs here (decode threads)."""

    def __init__(self, spec: str, precision: str, *, workers: int, address: str | None = None) -> None:
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
        local = load_image_encoder(spec, precision)  # the transform, and the name the catalogue records
        self.name, self.dim, self._preprocess = local.name, local.dim, local.preprocess
        resources: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]
        gpus = 1 if resources.get("GPU", 0) >= workers else 0
        actor = ray.remote(num_cpus=ACTOR_CPUS, num_gpus=gpus)(EncoderActor)
        self._actors: list[Any] = [actor.remote(spec, precision) for _ in range(workers)]
        names = set(ray.get([a.name.remote() for a in self._actors]))
        if names != {self.name}:
            self.close()
            raise RuntimeError(f"the Ray workers loaded {sorted(names)}, this process {self.name}")
        log.info("image encoder on %d Ray actors (%s GPU each)", workers, gpus)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self._preprocess(image)

    def embed_tensors(self, batch: torch.Tensor) -> np.ndarray:
        parts = [p for p in torch.tensor_split(batch, min(len(self._actors), len(batch))) if len(p)]
        futures = [actor.embed.remote(part.numpy()) for actor, part in zip(self._actors, parts, strict=False)]
        rows: list[np.ndarray] = self._ray.get(futures)
        return np.concatenate(rows) if rows else np.zeros((0, self.dim), dtype=np.float32)

    def close(self) -> None:
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors = []
        if self._started:
            self._ray.shutdown()
