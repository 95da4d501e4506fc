"""Fine-tuning the last blocks of a timm image backbone on labelled photos, on cached trunk features.

The backbone is cut in two at a block boundary: the frozen trunk (stem and the first blocks) and the tail
(the last `blocks` blocks, the head convolution, its norm and the pooling). Every photo goes through the
trunk once; its output (fp16, per photo and view) is kept on disk by the photo's sha256, and training, the
held-out measure and re-embedding a catalogue run only the tail on it. The tail learns with the adaptation
heads' own objective (`train.batch_loss`: in-store photos against the catalogue's photos, the whole
gallery or a sample of it as negatives), early-stopped on held-out recall@1 with the untrained tail (the
backbone as it is) as the first candidate. The result is the tail's state dict and the block it starts at;
queries run trunk + tail (`TailEncoder`), a catalogue's stored photos only the tail on their cached
features."""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import pickle
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from timm.data import create_transform, resolve_model_data_config
from torch.nn import functional as F

from retrieval.adapt.data import Labelled, PhotoVectors, Stored, labelled_examples
from retrieval.adapt.train import Examples, batch_loss, gallery_rows, recall_at_1, rows_by_label, split
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
from retrieval.records import stored_photos
from retrieval.store import ProductStore
from retrieval.weights import keep_model
from schemas.adapters import AdaptExample, Loss

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


@dataclass
class TailFit:
    tail: ImageTail
    before: float  # held-out recall@1 of the untrained tail (the backbone as it is)
    after: float  # ... of the tail kept
    epochs: int  # epochs run
    best: int  # the epoch kept (0: the untrained tail, no improvement)
    seconds: float
    holdout: int  # anchors measured
    epoch_seconds: float  # mean seconds of one training epoch (without the held-out measure)


def vectors_of(tail: ImageTail, examples: Examples) -> Examples:
    """Examples of trunk features as examples of the tail's vectors (for recall, or a head on top)."""
    return Examples(
        tail.embed(examples.anchors),
        examples.labels,
        examples.owners,
        tail.embed(examples.gallery),
        examples.gallery_labels,
        examples.gallery_owners,
    )


def fit_tail(
    trunk: Trunk,
    examples: Examples,
    *,
    loss: Loss = "contrastive",
    epochs: int = 12,
    patience: int = 3,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    temperature: float = 0.05,
    margin: float = 0.2,
    batch_size: int = 256,
    gallery_limit: int = 512,
    holdout: float = 1 / 7,
    views: Sequence[np.ndarray] = (),
    flip: bool = False,
    seed: int = 0,
    on_epoch: Callable[[int, float, ImageTail], None] | None = None,
) -> TailFit:
    """Train a tail on `examples` whose anchors and gallery are trunk features (n, C, H, W) (fp16 or fp32):
    anchors should land nearest to the gallery rows of their label. The held-out share is the one
    `fit_supervised` holds out for the same count and seed, so a head fitted after the tail is measured on
    photos neither saw. `gallery_limit`: gallery rows per batch beyond the batch's positives (each one runs
    through the tail, forward and backward). `views`: other views of the same anchors, row for row (the
    trunk features of their centre crops, cached like the photos): each time an anchor is drawn for
    training, it is the photo or one of its views at random (an augmentation that costs no epoch time; the
    held-out photos are measured whole). `flip`: mirror a random half of each batch's anchor features
    left-right (cheap, but a mirrored feature map is not the mirrored photo's: measured no better).
    `on_epoch(epoch, held-out recall@1, tail)` after each epoch: progress for a caller."""
    started = time.perf_counter()
    if len(examples) < 4:
        raise ValueError(f"{len(examples)} labelled photos with a match in the catalogue: at least 4 are needed")
    if tuple(examples.anchors.shape[1:]) != trunk.shape or tuple(examples.gallery.shape[1:]) != trunk.shape:
        raise ValueError(f"features of shape {examples.anchors.shape[1:]}: the trunk gives {trunk.shape}")
    if any(view.shape != examples.anchors.shape for view in views):
        raise ValueError("each view holds one row per anchor, of the anchors' shape")
    sources = [examples.anchors, *views]
    torch.manual_seed(seed)
    generator = np.random.default_rng(seed)
    fit_index, held_index = split(len(examples), holdout, seed)
    held = examples.take(held_index)
    tail = ImageTail(trunk)
    optimiser = torch.optim.AdamW([p for p in tail.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    labels, owners = torch.from_numpy(examples.labels), torch.from_numpy(examples.owners)
    gallery_labels, gallery_owners = (
        torch.from_numpy(examples.gallery_labels),
        torch.from_numpy(examples.gallery_owners),
    )
    rows_of = rows_by_label(examples.gallery_labels)
    before = recall_at_1(vectors_of(tail, held))
    best, best_epoch, best_state = before, 0, copy.deepcopy(tail.state_dict())
    training = 0.0
    epoch = 0
    for epoch in range(1, epochs + 1):
        epoch_started = time.perf_counter()
        shuffled = generator.permutation(fit_index)
        for start in range(0, len(shuffled), batch_size):
            batch = shuffled[start : start + batch_size]
            rows = gallery_rows(rows_of, examples.labels[batch], len(examples.gallery), generator, limit=gallery_limit)
            drawn = generator.integers(len(sources), size=len(batch))
            anchors = torch.from_numpy(
                np.stack([sources[view][row] for view, row in zip(drawn, batch, strict=True)]).astype(np.float32)
            )
            if flip:
                mirrored = torch.from_numpy(generator.random(len(batch)) < 0.5)
                anchors[mirrored] = anchors[mirrored].flip(-1)
            stored = torch.from_numpy(np.asarray(examples.gallery[rows], dtype=np.float32))
            value = batch_loss(
                F.normalize(tail(anchors), dim=-1),
                F.normalize(tail(stored), dim=-1),
                (labels[batch], owners[batch]),
                (gallery_labels[rows], gallery_owners[rows]),
                loss=loss,
                temperature=temperature,
                margin=margin,
            )
            if value is None:
                continue
            optimiser.zero_grad()
            value.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
        training += time.perf_counter() - epoch_started
        measured = recall_at_1(vectors_of(tail, held))
        log.info("epoch %d: held-out recall@1 %.3f (best %.3f)", epoch, measured, best)
        if on_epoch is not None:
            on_epoch(epoch, measured, tail)
        if measured > best:
            best, best_epoch, best_state = measured, epoch, copy.deepcopy(tail.state_dict())
        elif epoch - best_epoch >= patience:
            break
    tail.load_state_dict(best_state)
    return TailFit(
        tail, before, best, epoch, best_epoch, time.perf_counter() - started, len(held), training / max(epoch, 1)
    )


def stack_features(rows: Sequence[np.ndarray | None], shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(the rows that exist as one fp16 array, their indexes): photos that could not be read drop out."""
    present = np.asarray([i for i, row in enumerate(rows) if row is not None], dtype=np.int64)
    if not len(present):
        return np.zeros((0, *shape), dtype=np.float16), present
    return np.stack([rows[i] for i in present]).astype(np.float16, copy=False), present


@dataclass
class TunedTail:
    """A tail trained on a catalogue's labelled photos, kept under `digest`."""

    digest: str
    fit: TailFit
    trunk: Trunk
    examples: int  # labelled photos learnt from (anchors)
    photos: int  # the catalogue's photos in the gallery
    skipped: list[str]  # example lines not used, and why
    computed: int  # photo views run through the trunk (the rest came from the cache)


def read_photo_catalogue(store: ProductStore, catalogue: str, cache: TrunkCache) -> tuple[Stored, int]:
    """The catalogue's photos as trunk features (flattened rows, for `labelled_examples`), and how many
    products had none that could be read (URL photos are not fetched again)."""
    rows: list[np.ndarray] = []
    owners: list[int] = []
    ids: list[tuple[str, str]] = []
    titles: list[str] = []
    missing = 0
    fields = ["retailer", "product_id", "title", "images", "image_hashes"]
    for points in store.scroll_pages(catalogue, page=256, with_payload=fields):
        for point in points:
            payload = point.payload or {}
            refs, digests = stored_photos(payload)
            if not refs:
                continue
            found = [row for row in cache.of_stored(refs, digests) if row is not None]
            if not found:
                missing += 1
                continue
            index = len(ids)
            ids.append((str(payload.get("retailer")), str(payload.get("product_id"))))
            titles.append(str(payload.get("title") or payload.get("product_id")))
            rows += [row.reshape(-1) for row in found]
            owners += [index] * len(found)
    if not ids:
        raise ValueError(f"catalogue {catalogue!r} has no photo the tail can read (local files are needed)")
    stored = Stored(np.stack(rows), np.asarray(owners, dtype=np.int64), ids, [None] * len(ids), titles)
    return stored, missing


def finetune_catalogue_photos(
    store: ProductStore,
    catalogue: str,
    lines: Sequence[tuple[int, AdaptExample]],
    encoder: TimmImageEncoder,
    *,
    base: Path,
    models_root: Path,
    cache_root: Path,
    max_pixels: int,
    blocks: int = 4,
    crops: Sequence[float] = (0.8, 0.6),
    **fit_options: Any,
) -> TunedTail:
    """Fine-tune the last `blocks` blocks of `encoder` on the labelled photos (`lines`, paths relative to
    `base`) against the catalogue's own photos, training on their centre `crops` too (the query path's
    views), and keep the tail under `models_root` by its digest (nothing is stored in the catalogue: that
    is `Adapters.save`). `fit_options`: as `fit_tail`."""
    trunk = Trunk(encoder, blocks=blocks)
    cache = TrunkCache(trunk, cache_root, max_pixels=max_pixels)
    stored, missing = read_photo_catalogue(store, catalogue, cache)

    def flattened(view: float) -> Callable[[Sequence[Path]], PhotoVectors]:
        def embed(paths: Sequence[Path]) -> PhotoVectors:
            rows, failures = cache(paths, view=view)
            return [row.reshape(-1) if row is not None else None for row in rows], failures

        return embed

    def labelled(view: float) -> Labelled:
        return labelled_examples(stored, "image", "product", list(lines), base=base, embed_photos=flattened(view))

    whole = labelled(1.0)
    views = [labelled(view).examples.anchors for view in crops]  # the same lines fail alike: row for row
    shape = (-1, *trunk.shape)
    found = whole.examples
    examples = Examples(
        found.anchors.reshape(shape).astype(np.float16),
        found.labels,
        found.owners,
        found.gallery.reshape(shape),
        found.gallery_labels,
        found.gallery_owners,
    )
    fit = fit_tail(trunk, examples, views=[v.reshape(shape).astype(np.float16) for v in views], **fit_options)
    skipped = whole.skipped + ([f"{missing} products have no photo the tail can read"] if missing else [])
    with tempfile.TemporaryDirectory(prefix="tail-") as folder:
        digest = keep_model(fit.tail.save(Path(folder) / "tail"), models_root)
    return TunedTail(digest, fit, trunk, len(examples), len(stored.rows), skipped, cache.computed)
