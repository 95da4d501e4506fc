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

import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from retrieval.adapt.data import Labelled, PhotoVectors, Stored, labelled_examples
from retrieval.adapt.tail import ImageTail, Trunk, TrunkCache
from retrieval.adapt.train import (
    Examples,
    HeldOutBy,
    batch_loss,
    early_stopped,
    gallery_rows,
    held_out_split,
    recall_at_1,
    rows_by_label,
)
from retrieval.encoders.timm_backbone import TimmImageEncoder
from retrieval.records import stored_photos
from retrieval.store import ProductStore
from retrieval.weights import keep_model
from schemas.adapters import AdaptExample, Loss

log = logging.getLogger(__name__)


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
        examples.products,
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
    held_out_by: HeldOutBy = "product",
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
    fit_index, held_index = held_out_split(examples, holdout, seed, held_out_by)
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
    training = 0.0

    def one_epoch() -> None:
        nonlocal training
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

    best, best_epoch, epoch = early_stopped(
        tail,
        epochs=epochs,
        patience=patience,
        before=before,
        one_epoch=one_epoch,
        measure=lambda: recall_at_1(vectors_of(tail, held)),
        on_epoch=(lambda number, measured: on_epoch(number, measured, tail)) if on_epoch is not None else None,
    )
    return TailFit(
        tail, before, best, epoch, best_epoch, time.perf_counter() - started, len(held), training / max(epoch, 1)
    )


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
        found.products,
    )
    fit = fit_tail(trunk, examples, views=[v.reshape(shape).astype(np.float16) for v in views], **fit_options)
    skipped = whole.skipped + ([f"{missing} products have no photo the tail can read"] if missing else [])
    with tempfile.TemporaryDirectory(prefix="tail-") as folder:
        digest = keep_model(fit.tail.save(Path(folder) / "tail"), models_root)
    return TunedTail(digest, fit, trunk, len(examples), len(stored.rows), skipped, cache.computed)
