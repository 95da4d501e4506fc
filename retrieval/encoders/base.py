"""The encoder protocols: a name that fingerprints model + weights, a dimension, and batched embedding."""

from __future__ import annotations

from collections.abc import Sequence
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


def l2_normalise(x: torch.Tensor) -> np.ndarray:
    """Rows to unit length as float32 numpy (cosine = dot product downstream)."""
    return torch.nn.functional.normalize(x.float(), dim=-1).cpu().numpy().astype(np.float32, copy=False)
