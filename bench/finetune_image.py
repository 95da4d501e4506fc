"""`python -m bench finetune-image`: the image backbone's last blocks fine-tuned on grocery train photos,
against the linear head on frozen vectors. Everything is computed on vectors, without a store: val
in-store photos (whole, and as the query path makes them: the mean direction of the photo and its centre
crops) by cosine against the 81 shop photos of the catalogue. Every photo runs through the frozen trunk
once (cached on disk by content); each tail trains and embeds on those features only. Train split only
for fitting; the held-out share of it stops training; val is measured."""

from __future__ import annotations

import csv
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from retrieval.adapt.finetune_image import fit_tail, vectors_of
from retrieval.adapt.tail import ImageTail, Trunk, TrunkCache
from retrieval.adapt.train import Examples, fit_supervised
from retrieval.encoders.timm_backbone import TimmImageEncoder

CACHE = Path("bench/out/cache/trunk")
BLOCKS = (1, 2, 4)
CACHE_BLOCKS = 5  # features are cached entering the last two stages: every tail up to 5 blocks reuses them


@dataclass
class Photos:
    """One split's photo files and their product (class id)."""

    paths: list[Path]
    labels: np.ndarray


def read_split(dataset: Path, split: str) -> Photos:
    paths, labels = [], []
    for line in (dataset / f"{split}.txt").read_text(encoding="utf-8").splitlines():
        if line.strip():
            photo, label, _ = (part.strip() for part in line.split(","))
            paths.append(dataset / photo)
            labels.append(int(label))
    return Photos(paths, np.asarray(labels, dtype=np.int64))


def read_shop(dataset: Path) -> Photos:
    """The catalogue: one shop (iconic) photo per product."""
    paths, labels = [], []
    with (dataset / "classes.csv").open(encoding="utf-8") as f:
        for item in csv.DictReader(f):
            paths.append(dataset / item["Iconic Image Path (str)"].lstrip("/"))
            labels.append(int(item["Class ID (int)"]))
    return Photos(paths, np.asarray(labels, dtype=np.int64))


@dataclass
class Features:
    """Trunk features at one cut: train photos (whole, then per crop), shop photos, val photos per view."""

    train: np.ndarray
    shop: np.ndarray
    val: dict[float, np.ndarray]  # 1.0 (the whole photo) first, then the query path's crops
    train_views: dict[float, np.ndarray]  # the train photos' centre crops: augmentation

    def onward(self, trunk: Trunk, first: int) -> Features:
        """The same photos' features at `trunk`'s (later) cut, from features entering block `first`."""

        def run(rows: np.ndarray) -> np.ndarray:
            parts = [
                trunk.onward(torch.from_numpy(rows[i : i + 128]).float(), first, trunk.start).numpy()
                for i in range(0, len(rows), 128)
            ]
            return np.concatenate(parts).astype(np.float16) if parts else np.zeros((0, *trunk.shape), np.float16)

        return Features(
            run(self.train),
            run(self.shop),
            {view: run(rows) for view, rows in self.val.items()},
            {view: run(rows) for view, rows in self.train_views.items()},
        )


def _all(cache: TrunkCache, photos: Photos, view: float = 1.0) -> np.ndarray:
    rows, failures = cache(photos.paths, view=view)
    if failures:
        raise ValueError(f"unreadable photos: {dict(list(failures.items())[:3])}")
    return np.stack([row for row in rows if row is not None])


@dataclass
class Row:
    method: str
    fit_s: float
    holdout: str
    recall: dict[str, float] = field(default_factory=dict)  # "R@1", "R@5", "crops R@1", "crops R@5"
    cut: str = ""
    note: str = ""


def recall(queries: np.ndarray, labels: np.ndarray, gallery: np.ndarray, gallery_labels: np.ndarray, k: int) -> float:
    """Share of queries with a gallery row of their label among their k nearest (cosine)."""
    top = np.argsort(-(queries @ gallery.T), axis=1)[:, :k]
    return float(np.mean((gallery_labels[top] == labels[:, None]).any(axis=1)))


def mean_direction(views: Sequence[np.ndarray]) -> np.ndarray:
    mean = np.mean(np.stack(views), axis=0)
    return np.asarray(mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12), dtype=np.float32)


def measure(
    row: Row,
    tail: ImageTail,
    features: Features,
    val: Photos,
    shop: Photos,
    head: Callable[[np.ndarray], np.ndarray] | None = None,
) -> None:
    """Val recall through the tail (and a head after it): the whole photo, and the query path's views."""
    through = head or (lambda rows: rows)
    gallery = through(tail.embed(features.shop))
    views = [tail.embed(rows) for rows in features.val.values()]
    for name, queries in (("", views[0]), ("crops ", mean_direction(views))):
        for k in (1, 5):
            row.recall[f"{name}R@{k}"] = recall(through(queries), val.labels, gallery, shop.labels, k)


def examples(features: Features, train: Photos, shop: Photos) -> Examples:
    """Train photos (anchors, from outside the catalogue) against the shop photos (one product each)."""
    return Examples(
        anchors=features.train,
        labels=train.labels,
        owners=np.full(len(train.labels), -1, dtype=np.int64),
        gallery=features.shop,
        gallery_labels=shop.labels,
        gallery_owners=np.arange(len(shop.labels), dtype=np.int64),
    )


def _holdout(before: float, after: float) -> str:
    return f"{before:.3f} -> {after:.3f}"


def progress(count: int) -> Callable[[int, float, ImageTail], None]:
    def report(epoch: int, held: float, _: ImageTail) -> None:
        print(f"tail {count}: epoch {epoch}, held-out R@1 {held:.3f}", file=sys.stderr, flush=True)

    return report


def with_views(vectors: Examples, views: Sequence[np.ndarray]) -> Examples:
    """Vector examples whose anchors are the photos and then each view of them (a head has no views of its
    own: its held-out share then mixes views of photos it trains on, so its held-out figure flatters)."""
    return Examples(
        np.concatenate([vectors.anchors, *views]),
        np.concatenate([vectors.labels] * (1 + len(views))),
        np.concatenate([vectors.owners] * (1 + len(views))),
        vectors.gallery,
        vectors.gallery_labels,
        vectors.gallery_owners,
    )


def run_finetune_image(
    dataset: Path,
    encoder: TimmImageEncoder,
    *,
    blocks: Sequence[int] = BLOCKS,
    crops: Sequence[float] = (0.8, 0.6),
    train_views: bool = True,
    max_pixels: int = 40_000_000,
    cache: Path = CACHE,
    lr: float = 1e-4,
    batch_size: int = 256,
    epochs: int = 12,
    patience: int = 3,
    flip: bool = False,
) -> str:
    """The table: no adaptation, the linear head (without and with the crops as extra examples), then per
    tail size the tail alone and the tail with a linear head fitted on its vectors."""
    train, val, shop = read_split(dataset, "train"), read_split(dataset, "val"), read_shop(dataset)
    first = Trunk(encoder, blocks=max([*blocks, CACHE_BLOCKS]))  # later cuts start from its features
    store = TrunkCache(first, cache, max_pixels=max_pixels)
    started = time.perf_counter()
    base = Features(
        _all(store, train),
        _all(store, shop),
        {view: _all(store, val, view) for view in (1.0, *crops)},
        {view: _all(store, train, view) for view in crops} if train_views else {},
    )
    cache_s = time.perf_counter() - started
    cached = store.computed

    rows: list[Row] = []
    raw_trunk = Trunk(encoder, blocks=0)
    raw = base.onward(raw_trunk, first.start)
    raw_tail = ImageTail(raw_trunk)
    raw_examples = vectors_of(raw_tail, examples(raw, train, shop))
    raw_views = [raw_tail.embed(rows) for rows in raw.train_views.values()]
    none = Row("none (backbone as it is)", 0.0, "")
    measure(none, raw_tail, raw, val, shop)
    rows.append(none)
    heads = [("", raw_examples)] + (
        [(", crops as extra examples", with_views(raw_examples, raw_views))] if raw_views else []
    )
    for label, head_examples in heads:
        fit = fit_supervised(head_examples, held_out_by="example")
        note = f"epoch {fit.best} of {fit.epochs}"
        linear = Row(f"linear head{label}", fit.seconds, _holdout(fit.before, fit.after), note=note)
        measure(linear, raw_tail, raw, val, shop, fit.head)
        rows.append(linear)

    for count in sorted(set(blocks)):
        trunk = Trunk(encoder, blocks=count)
        features = base.onward(trunk, first.start)
        tail_fit = fit_tail(
            trunk,
            examples(features, train, shop),
            lr=lr,
            batch_size=batch_size,
            epochs=epochs,
            patience=patience,
            views=list(features.train_views.values()),
            flip=flip,
            held_out_by="example",  # val's photos are of the same products: new photos of labelled ones
            on_epoch=progress(count),
        )
        tail = tail_fit.tail
        cut = f"block {trunk.start}, {'x'.join(map(str, trunk.shape))}, {trunk.feature_bytes / 1024:.1f} KiB"
        row = Row(
            f"tail: last {count} block{'s' if count != 1 else ''} + head conv ({tail.parameter_count / 1e6:.2f} M)",
            tail_fit.seconds,
            _holdout(tail_fit.before, tail_fit.after),
            cut=cut,
            note=f"epoch {tail_fit.best} of {tail_fit.epochs}, {tail_fit.epoch_seconds:.1f} s/epoch",
        )
        measure(row, tail, features, val, shop)
        rows.append(row)
        tail_examples = vectors_of(tail, examples(features, train, shop))
        head_fit = fit_supervised(
            with_views(tail_examples, [tail.embed(v) for v in features.train_views.values()]), held_out_by="example"
        )
        both = Row(
            f"tail {count} + linear head",
            tail_fit.seconds + head_fit.seconds,
            _holdout(head_fit.before, head_fit.after),
            cut=cut,
            note=f"head epoch {head_fit.best} of {head_fit.epochs}",
        )
        measure(both, tail, features, val, shop, head_fit.head)
        rows.append(both)

    header = (
        f"Fitted on grocery train ({len(train.paths)} in-store photos; 1/7 held out for early stopping), measured "
        f"on val ({len(val.paths)} photos) against the {len(shop.paths)} shop photos; {encoder.name} "
        f"({encoder.precision} trunk, float32 tail), {torch.get_num_threads()} torch thread(s). Trunk features "
        f"cached entering block {first.start} ({first.feature_bytes / 1024:.1f} KiB a photo view, fp16): "
        f"{cached} photo views computed this run in {cache_s:.0f} s, the rest from the cache. Crops: the photo "
        f"and its {', '.join(map(str, crops))} centre crops, mean direction (the query path). Tails: lr {lr}, "
        f"batch {batch_size}, at most {epochs} epochs, patience {patience}, train crops as views "
        f"{'on' if train_views else 'off'}, flip {'on' if flip else 'off'}; heads after a tail get the same "
        "crops as extra examples.\n\n"
    )
    return header + finetune_table(rows)


def finetune_table(rows: list[Row]) -> str:
    head = (
        "| method | fit s | held-out R@1 | val R@1 | val R@5 | val crops R@1 | val crops R@5 "
        "| trunk cut, cache per photo | stopped |"
    )
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        cells = " | ".join(f"{r.recall[k]:.3f}" for k in ("R@1", "R@5", "crops R@1", "crops R@5"))
        lines.append(f"| {r.method} | {r.fit_s:.1f} | {r.holdout} | {cells} | {r.cut} | {r.note} |")
    return "\n".join(lines)
