"""The encoder protocols: a name that fingerprints model + weights, a dimension, and batched embedding."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image


class EncoderError(RuntimeError):
    """An encoder spec that cannot be resolved or loaded; the message says what to do."""


@runtime_checkable
class ImageEncoder(Protocol):
    """Turns decoded RGB images into L2-normalised float32 rows of width `dim`."""

    name: str
    dim: int

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One RGB image to the model's input tensor (thread-safe: decode workers call it)."""
        ...

    def embed_tensors(self, batch: torch.Tensor) -> np.ndarray:
        """A stacked batch of `preprocess` outputs to embeddings, in order."""
        ...


@runtime_checkable
class TextEncoder(Protocol):
    """Turns texts into L2-normalised float32 rows of width `dim`."""

    name: str
    dim: int

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...


def embed_images(encoder: ImageEncoder, images: Sequence[Image.Image], *, batch_size: int = 32) -> np.ndarray:
    """Preprocess and embed images in batches of `batch_size`, keeping their order."""
    out = [np.empty((0, encoder.dim), dtype=np.float32)]
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        out.append(encoder.embed_tensors(torch.stack([encoder.preprocess(im) for im in chunk])))
    return np.concatenate(out)


class PixelTransform:
    """A model's eval transform, split so that per-image work stays in PIL and numpy: `__call__` gives
    uint8 channels x height x width (resize, crop: the transform's PIL steps), `model_input` turns a
    stacked batch of those into the normalised float input, in one torch op for the whole batch.

    Why: preprocessing runs on decode worker threads, and each thread that runs a torch op gets an OpenMP
    team of its own; teams of all the cores on the same cores slow the model's forward 2-3x
    (`python -m bench.torch_threads`). A transform that does not end with to-tensor + normalise is kept
    whole (float output, `model_input` passes it through)."""

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.transform = transform
        steps = list(getattr(transform, "transforms", []))
        self.pil_steps: list[Callable[[Image.Image], Image.Image]] | None = None
        if len(steps) >= 2 and type(steps[-1]).__name__ == "Normalize" and "ToTensor" in type(steps[-2]).__name__:
            self.pil_steps = steps[:-2]
            normalise = steps[-1]
            self.mean = torch.as_tensor(normalise.mean, dtype=torch.float32).view(1, -1, 1, 1) * 255
            self.std = torch.as_tensor(normalise.std, dtype=torch.float32).view(1, -1, 1, 1) * 255

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if self.pil_steps is None:
            tensor: torch.Tensor = self.transform(image)
            return tensor
        for step in self.pil_steps:
            image = step(image)
        pixels = np.array(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(pixels).permute(2, 0, 1)  # a view: no torch compute on this thread

    def model_input(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.dtype == torch.uint8:
            return (batch.float() - self.mean) / self.std  # = to-tensor (/255) then normalise
        return batch


def l2_normalise(x: torch.Tensor) -> np.ndarray:
    """Rows to unit length as float32 numpy (cosine = dot product downstream)."""
    return torch.nn.functional.normalize(x.float(), dim=-1).cpu().numpy().astype(np.float32, copy=False)
