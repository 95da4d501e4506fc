"""The encoder protocols: a name that fingerprints model + weights, a dimension, and batched embedding."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
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


@dataclass(frozen=True)
class EmbeddedPhoto:
    """What a `PhotoEmbedder` made of one photo's bytes: its row, the text read off it (None when not
    asked), or why it could not be decoded (then neither)."""

    vector: np.ndarray | None
    read: str | None = None
    error: str | None = None


@runtime_checkable
class PhotoEmbedder(Protocol):
    """An image encoder that also decodes: photo bytes in, rows (and read text) out, wherever it runs. Ray
    workers are one; the ingest then sends bytes instead of decoding on its own machine."""

    def embed_photos(self, blobs: Sequence[bytes], *, max_pixels: int, read: bool) -> list[EmbeddedPhoto]:
        """One `EmbeddedPhoto` a blob, in order; `read`: OCR each photo too; `max_pixels`: the decode guard."""
        ...


@runtime_checkable
class TextEncoder(Protocol):
    """Turns texts into L2-normalised float32 rows of width `dim`."""

    name: str
    dim: int

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...


@cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated, slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="ignore")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def resolve_precision(precision: str, role: str) -> str:
    """`auto` -> bf16 on a CPU that computes it natively, else fp32; `fp32` / `bf16` as given."""
    if precision not in ("auto", "fp32", "bf16"):
        raise EncoderError(f"{role} precision {precision!r}: use auto, fp32 or bf16")
    if precision == "auto":
        return "bf16" if cpu_has_bf16() else "fp32"
    return precision


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
            if fused := ResizeCrop.of(self.pil_steps[:2]):
                self.pil_steps[:2] = [fused]
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


class ResizeCrop:
    """A Resize followed by a CenterCrop (torchvision, as timm and open_clip build them) done, when it
    shrinks, as one PIL resample of the crop's area of the source: the same filter and scale without
    computing the pixels the crop throws away (1.9 -> 1.3 ms on a 348 px grocery photo, timed while
    developing it, not a bench row). Pixels differ from the two steps' by a few levels at most; embeddings
    keep cosine > 0.99999 (tested). An image that is enlarged goes through the two steps as torchvision
    does them."""

    RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}

    def __init__(self, size: int | tuple[int, int], crop: tuple[int, int], resample: Image.Resampling) -> None:
        self.size, self.crop, self.resample = size, crop, resample

    @classmethod
    def of(cls, steps: Sequence[object]) -> ResizeCrop | None:
        """The fused step for `[Resize, CenterCrop]`, or None when the steps are anything else."""
        if len(steps) != 2 or type(steps[0]).__name__ != "Resize" or type(steps[1]).__name__ != "CenterCrop":
            return None
        resize, crop = steps
        size = getattr(resize, "size", None)
        mode = getattr(getattr(resize, "interpolation", None), "value", None)
        if isinstance(size, Sequence) and len(size) == 1:
            size = size[0]
        crop_size = tuple(getattr(crop, "size", ()))
        if (
            mode not in cls.RESAMPLE
            or getattr(resize, "max_size", None) is not None
            or getattr(resize, "antialias", True) is False
            or len(crop_size) != 2
            or not (isinstance(size, int) or (isinstance(size, Sequence) and len(size) == 2))
        ):
            return None
        fixed = size if isinstance(size, int) else (int(size[0]), int(size[1]))
        crop_hw = (int(crop_size[0]), int(crop_size[1]))
        least = (fixed, fixed) if isinstance(fixed, int) else fixed
        if crop_hw[0] > least[0] or crop_hw[1] > least[1]:
            return None  # a crop larger than the resized image pads: the two steps' own rules
        return cls(fixed, crop_hw, cls.RESAMPLE[mode])

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if isinstance(self.size, int):  # the shorter side to `size`, as torchvision computes it
            if width <= height:
                new_w, new_h = self.size, int(self.size * height / width)
            else:
                new_w, new_h = int(self.size * width / height), self.size
        else:
            new_h, new_w = self.size
        crop_h, crop_w = self.crop
        top, left = int(round((new_h - crop_h) / 2.0)), int(round((new_w - crop_w) / 2.0))
        if new_w > width or new_h > height:  # enlarging: the two steps (small images, cheap either way)
            return image.resize((new_w, new_h), self.resample).crop((left, top, left + crop_w, top + crop_h))
        sx, sy = width / new_w, height / new_h
        box = (left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy)
        return image.resize((crop_w, crop_h), self.resample, box=box)


def l2_normalise(x: torch.Tensor) -> np.ndarray:
    """Rows to unit length as float32 numpy (cosine = dot product downstream)."""
    return torch.nn.functional.normalize(x.float(), dim=-1).cpu().numpy().astype(np.float32, copy=False)
