"""A fine-tuned image tail at work: the backbone cut into a frozen trunk and a trained tail, the tail loaded
from its kept folder, photos embedded through trunk + tail (`TailEncoder`), and trunk features cached on disk
by photo hash (`TrunkCache`). What serving and ingest need of a tail; training it is `finetune_image`'s."""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import pickle
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from timm.data import create_transform, resolve_model_data_config

from retrieval.encoders.base import PixelTransform, l2_normalise
from retrieval.encoders.timm_backbone import TimmImageEncoder
from retrieval.images import (
    MAX_IMAGE_BYTES,
    ImageDecodeError,
    LocalFileError,
    centre_crop,
    decode_image,
    read_regular_file,
)

log = logging.getLogger(__name__)

TAIL_FORMAT = "image-tail/1"
STATE_FILE, INFO_FILE = "tail.pt", "tail.json"
EMBED_CHUNK = 128  # trunk features per tail forward when embedding (7x7x192 fp32: 4.8 MB a chunk)
FP16_MAX = 65504.0


class TailError(ValueError):
    """A backbone that cannot be cut, or a stored tail that does not fit the encoder it is loaded for."""


def flat_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks of a timm EfficientNet / MobileNet in forward order (stages flattened)."""
    stages = getattr(model, "blocks", None)
    needed = ("conv_stem", "bn1", "conv_head", "bn2", "global_pool")
    if not isinstance(stages, torch.nn.Sequential) or not all(hasattr(model, name) for name in needed):
        raise TailError("fine-tuning needs a timm EfficientNet / MobileNet layout (conv_stem, blocks, conv_head)")
    return [block for stage in stages for block in stage.children()]


class Trunk:
    """The frozen part of an encoder's backbone: stem and blocks [0, start). `features` runs it on a batch of
    `preprocess` outputs with the encoder's precision policy (bf16: stem and the first FP32_BLOCKS blocks in
    float32, the rest under autocast, as `TimmImageEncoder` does) and returns float32."""

    def __init__(self, encoder: TimmImageEncoder, *, blocks: int) -> None:
        self.encoder = encoder
        self.model = encoder.model
        self.blocks = flat_blocks(self.model)
        if not 0 <= blocks <= len(self.blocks):
            raise TailError(f"{blocks} blocks to fine-tune: the backbone has {len(self.blocks)}")
        self.start = len(self.blocks) - blocks
        self.tail_blocks = blocks
        # The encoder's own split transform, rebuilt from the model's config: pixels to the normalised input.
        self._pixels = PixelTransform(create_transform(**resolve_model_data_config(self.model), is_training=False))
        channels, height, width = encoder.input_size
        probe = torch.zeros((1, channels, height, width), dtype=torch.uint8)
        self.shape: tuple[int, ...] = tuple(self.features(probe).shape[1:])
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", encoder.name)[:80]
        digest = hashlib.sha256(f"{encoder.name}\0{encoder.precision}".encode()).hexdigest()[:10]
        self.key = f"{safe}-{digest}-{encoder.precision}-from{self.start}"

    @property
    def feature_bytes(self) -> int:
        """Bytes of one photo view's cached features (fp16)."""
        return 2 * math.prod(self.shape)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.encoder.preprocess(image)

    @torch.inference_mode()
    def features(self, batch: torch.Tensor) -> torch.Tensor:
        x = self._pixels.model_input(batch).contiguous(memory_format=torch.channels_last)
        x = self.model.bn1(self.model.conv_stem(x))
        return self.onward(x, 0, self.start)

    @torch.inference_mode()
    def onward(self, x: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """Frozen blocks [first, last) on features entering block `first`: features cached at an earlier cut
        serve a later one without decoding a photo again."""
        bf16 = self.encoder.precision == "bf16"
        for index in range(first, last):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and index >= TimmImageEncoder.FP32_BLOCKS):
                x = self.blocks[index](x)
        return x.float()


class ImageTail(torch.nn.Module):
    """Blocks [start, end) of a backbone, its head convolution and norm, and its pooling: trunk features to
    the pooled (not normalised) embedding. Its batch norms keep the statistics they were trained with (it is
    always in eval mode: batches of a few dozen photos of a few products would make poor statistics);
    their scales and shifts learn with the convolutions."""

    def __init__(self, trunk: Trunk) -> None:
        super().__init__()
        self.start = trunk.start
        self.encoder_name = trunk.encoder.name
        self.input_shape = trunk.shape
        self.blocks = torch.nn.Sequential(*(copy.deepcopy(block) for block in trunk.blocks[trunk.start :]))
        self.conv_head = copy.deepcopy(trunk.model.get_submodule("conv_head"))
        self.bn2 = copy.deepcopy(trunk.model.get_submodule("bn2"))
        self.pool = copy.deepcopy(trunk.model.get_submodule("global_pool"))
        for parameter in self.parameters():
            parameter.requires_grad_(True)  # the folded convolutions of the encoder are frozen
        super().train(False)

    def train(self, mode: bool = True) -> ImageTail:
        return super().train(False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        pooled: torch.Tensor = self.pool(self.bn2(self.conv_head(self.blocks(features))))
        return pooled

    def embed(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """Trunk features (n, C, H, W), any float dtype, to L2-normalised float32 rows."""
        out = [np.empty((0, self.dim), dtype=np.float32)]
        with torch.inference_mode():
            for start in range(0, len(features), EMBED_CHUNK):
                chunk = features[start : start + EMBED_CHUNK]
                tensor = torch.from_numpy(np.asarray(chunk)) if isinstance(chunk, np.ndarray) else chunk
                out.append(l2_normalise(self(tensor.float())))
        return np.concatenate(out)

    @property
    def dim(self) -> int:
        return int(self.conv_head.out_channels) if isinstance(self.conv_head, torch.nn.Conv2d) else self._probe_dim()

    def _probe_dim(self) -> int:
        with torch.inference_mode():
            return int(self(torch.zeros((1, *self.input_shape))).shape[1])

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save(self, folder: Path) -> Path:
        """The tail as a model folder (its state dict and what it fits), for `retrieval.weights.keep_model`."""
        folder.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().clone().contiguous() for name, tensor in self.state_dict().items()}
        torch.save(state, folder / STATE_FILE)
        info = TailInfo(
            format=TAIL_FORMAT,
            encoder=self.encoder_name,
            start=self.start,
            blocks=len(self.blocks),
            input_shape=list(self.input_shape),
            dim=self.dim,
        )
        (folder / INFO_FILE).write_text(info.model_dump_json(indent=1) + "\n", encoding="utf-8")
        return folder


class TailInfo(BaseModel):
    """What a stored tail fits: the encoder (by name), the block it starts at, its input and output."""

    model_config = ConfigDict(extra="forbid", strict=True)

    format: str
    encoder: str = Field(max_length=1000)
    start: int = Field(ge=0, le=10_000)
    blocks: int = Field(ge=0, le=10_000)
    input_shape: list[int] = Field(min_length=3, max_length=3)
    dim: int = Field(ge=1, le=1 << 20)


def load_tail(folder: Path, encoder: TimmImageEncoder) -> tuple[Trunk, ImageTail]:
    """The trunk and trained tail stored in `folder` for `encoder`. Everything in the folder is checked
    against the encoder before use: its name, the cut, the shapes and names of every tensor (strict), and
    that every value is finite; the state is read with torch's weights-only loader (no code runs)."""
    try:
        info = TailInfo.model_validate_json((folder / INFO_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValidationError) as exc:
        raise TailError(f"{folder} holds no readable image tail: {exc}") from None
    if info.format != TAIL_FORMAT:
        raise TailError(f"{folder}: tail format {info.format!r}, this version reads {TAIL_FORMAT!r}")
    if info.encoder != encoder.name:
        raise TailError(f"{folder}: a tail of {info.encoder!r}, not of the encoder {encoder.name!r}")
    trunk = Trunk(encoder, blocks=info.blocks)
    if trunk.start != info.start or list(trunk.shape) != info.input_shape:
        raise TailError(
            f"{folder}: the tail starts at block {info.start} {info.input_shape}, the encoder cuts there "
            f"at {trunk.start} {list(trunk.shape)}"
        )
    try:
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:  # refused or damaged
        raise TailError(f"{folder}: unreadable tail weights: {exc}") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise TailError(f"{folder}: the tail weights are not a state dict of tensors")
    if not all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point()):
        raise TailError(f"{folder}: the tail weights hold non-finite values")
    tail = ImageTail(trunk)
    try:
        tail.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # missing, unexpected or mis-shaped tensors
        raise TailError(f"{folder}: the tail weights do not fit {encoder.name}: {exc}") from None
    if tail.dim != info.dim:
        raise TailError(f"{folder}: the tail gives {tail.dim}-d vectors, its record says {info.dim}")
    return trunk, tail


class TailEncoder:
    """An image encoder (the `ImageEncoder` protocol) that is trunk + a trained tail: what queries (and
    photos embedded for the first time) go through once a tail is active. `name` fingerprints the tail."""

    def __init__(self, trunk: Trunk, tail: ImageTail, *, name: str) -> None:
        if tail.start != trunk.start:
            raise TailError(f"a tail from block {tail.start} on a trunk cut at {trunk.start}")
        self.trunk, self.tail, self.name, self.dim = trunk, tail, name, tail.dim

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.trunk.preprocess(image)

    def embed_tensors(self, batch: torch.Tensor) -> np.ndarray:
        return self.tail.embed(self.trunk.features(batch))


FeatureList = list[np.ndarray | None]
FeatureRows = tuple[FeatureList, dict[Path, str]]


class TrunkCache:
    """Photo files -> their trunk features, fp16 (C, H, W) per view (1.0: the whole photo, 0.8: its centre
    crop, as the query path makes them), kept on disk as one .npy per photo view under the trunk's key and
    the sha256 of the file's bytes: training again, other tails and re-embedding decode no photo twice. A
    cached file of the wrong shape or dtype, or unreadable, is computed again."""

    def __init__(self, trunk: Trunk, folder: Path, *, max_pixels: int, batch_size: int = 16) -> None:
        self.trunk = trunk
        self.folder = folder / trunk.key
        self.max_pixels = max_pixels
        self.batch_size = batch_size
        self.computed = 0  # photo views run through the trunk by this cache (the rest were on disk)

    def _file(self, digest: str, view: float) -> Path:
        return self.folder / digest[:2] / f"{digest}-{view:.3f}.npy"

    def _cached(self, file: Path) -> np.ndarray | None:
        try:
            array: np.ndarray = np.load(file, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("computing again the unreadable cached features %s: %s", file, exc)
            return None
        if array.dtype != np.float16 or tuple(array.shape) != self.trunk.shape:
            log.warning("computing again the cached features %s: %s %s", file, array.dtype, array.shape)
            return None
        return array

    def __call__(self, paths: Sequence[Path], *, view: float = 1.0) -> FeatureRows:
        if not 0.0 < view <= 1.0:
            raise ValueError(f"view {view}: the share of the photo's middle, in (0, 1]")
        failures: dict[Path, str] = {}
        out: list[np.ndarray | None] = []
        missing: list[tuple[int, Path, bytes, str]] = []
        for path in paths:
            try:
                data = read_regular_file(str(path), max_bytes=MAX_IMAGE_BYTES)
            except LocalFileError as exc:
                failures[path] = str(exc)
                out.append(None)
                continue
            digest = hashlib.sha256(data).hexdigest()
            array = self._cached(self._file(digest, view))
            if array is None:
                missing.append((len(out), path, data, digest))
            out.append(array)
        for start in range(0, len(missing), self.batch_size):
            ready: list[tuple[int, str, torch.Tensor]] = []
            for index, path, data, digest in missing[start : start + self.batch_size]:
                try:
                    image = decode_image(data, max_pixels=self.max_pixels)
                except ImageDecodeError as exc:
                    failures[path] = str(exc)
                    continue
                image = centre_crop(image, view) if view < 1.0 else image
                ready.append((index, digest, self.trunk.preprocess(image)))
            if not ready:
                continue
            rows = self.compute(torch.stack([tensor for _, _, tensor in ready]), [d for _, d, _ in ready], view=view)
            for (index, _, _), row in zip(ready, rows, strict=True):
                out[index] = row
        return out, failures

    def lookup(self, digest: str, *, view: float = 1.0) -> np.ndarray | None:
        """The cached features of the photo whose bytes have this sha256, or None."""
        return self._cached(self._file(digest, view))

    def compute(self, batch: torch.Tensor, digests: Sequence[str], *, view: float = 1.0) -> np.ndarray:
        """Trunk features (fp16, n x C x H x W) of a batch of `preprocess` outputs, kept under their photos'
        digests: ingest computes them from the tensors it decoded anyway."""
        features = self.trunk.features(batch).numpy()
        if not np.isfinite(features).all() or float(np.abs(features).max()) > FP16_MAX:
            raise TailError("trunk features overflow fp16: cache them at another cut")
        rows = features.astype(np.float16)
        for digest, row in zip(digests, rows, strict=True):
            self._write(self._file(digest, view), row)
        self.computed += len(rows)
        return rows

    def of_stored(self, refs: Sequence[str], digests: Sequence[str]) -> FeatureList:
        """A stored product's photos (its payload's `images` and `image_hashes`): each one's cached
        features, else its local file read and decoded again; a photo fetched from a URL at ingest is not
        fetched again (None), nor is a file that is gone or unreadable."""
        out: FeatureList = [self.lookup(digest) for digest in digests]
        local = [i for i, (ref, row) in enumerate(zip(refs, out, strict=True)) if row is None and "://" not in ref]
        if local:
            rows, failures = self([Path(refs[i]) for i in local])
            for path, reason in failures.items():
                log.warning("no trunk features for %s: %s", path, reason)
            for i, row in zip(local, rows, strict=True):
                out[i] = row
        return out

    def _write(self, file: Path, row: np.ndarray) -> None:
        file.parent.mkdir(parents=True, exist_ok=True)
        partial = file.with_name(f".{file.stem}.{os.getpid()}.part.npy")
        np.save(partial, np.ascontiguousarray(row), allow_pickle=False)
        partial.replace(file)  # atomic: a reader sees the whole file or none


def stack_features(rows: Sequence[np.ndarray | None], shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(the rows that exist as one fp16 array, their indexes): photos that could not be read drop out."""
    present = np.asarray([i for i, row in enumerate(rows) if row is not None], dtype=np.int64)
    if not len(present):
        return np.zeros((0, *shape), dtype=np.float16), present
    return np.stack([rows[i] for i in present]).astype(np.float16, copy=False), present
