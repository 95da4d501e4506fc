"""Fitting adaptation heads on cached vectors (never on pixels): supervised with a contrastive or triplet
loss against the catalogue's own vectors, or unsupervised by spreading the catalogue's vectors apart.

The data are anchors (labelled query photos or texts, or stored products) and a gallery (the catalogue's
stored vectors, one row per photo), each row labelled by the condition (same product, same category, ...).
The head is shared by both sides, as it is at search time, where it maps the query and the stored vectors.
Early stopping uses recall@1 of held-out anchors against the gallery; the version without a head (the
identity) is the first candidate, so a head that does not beat doing nothing is reported as such."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.nn import functional as F

from retrieval.adapt.heads import Head
from schemas.adapters import HeadKind, Loss

log = logging.getLogger(__name__)

EVAL_CHUNK = 512
GALLERY_MAX = 4096  # gallery rows per training batch beyond the batch's positives
SPREAD_SAMPLE = 2048  # rows the label-free spread measure looks at
# How the held-out share that chooses the epoch (and the switch) is drawn: whole products (what a head does for
# products nobody labelled) or example by example (new photos of labelled products; near-duplicates of one
# product can fall on both sides).
HeldOutBy = Literal["product", "example"]


@dataclass
class Examples:
    """Anchors and the gallery they are matched against. `owners` name the gallery product an anchor *is*
    (its own rows never count for it), -1 for a photo or text from outside the catalogue."""

    anchors: np.ndarray  # (n, d)
    labels: np.ndarray  # (n,) int
    owners: np.ndarray  # (n,) int
    gallery: np.ndarray  # (m, d)
    gallery_labels: np.ndarray  # (m,) int
    gallery_owners: np.ndarray  # (m,) int
    products: np.ndarray | None = None  # (n,) int: the product (group of same products) each anchor shows; None: labels

    def __len__(self) -> int:
        return len(self.anchors)

    def take(self, index: np.ndarray) -> Examples:
        return Examples(
            self.anchors[index],
            self.labels[index],
            self.owners[index],
            self.gallery,
            self.gallery_labels,
            self.gallery_owners,
            self.products[index] if self.products is not None else None,
        )

    def groups(self) -> np.ndarray:
        """What a held-out split keeps on one side: the product each anchor shows."""
        return self.products if self.products is not None else self.labels

    def answerable(self) -> np.ndarray:
        """Which anchors have a positive in the gallery other than their own rows."""
        out = np.zeros(len(self), dtype=bool)
        for label in np.unique(self.labels):
            owners_there = set(self.gallery_owners[self.gallery_labels == label].tolist())
            for i in np.flatnonzero(self.labels == label):
                own = int(self.owners[i])
                out[i] = len(owners_there) > (1 if own in owners_there else 0)
        return out


@dataclass
class Fit:
    head: Head
    before: float  # the measure without a head
    after: float  # the measure through the head
    epochs: int  # epochs (supervised) or steps (spread) run
    best: int  # the epoch / step kept (0: the identity, no improvement)
    seconds: float
    holdout: int  # anchors measured
    spread: tuple[float, float] | None = None  # spread only: mean pairwise cosine of the gallery before, after


Transform = Callable[[np.ndarray], np.ndarray]


def recall_at_1(examples: Examples, head: Transform | None = None) -> float:
    """Share of anchors whose nearest gallery row (leaving out their own product) has their label."""
    if not len(examples):
        return 0.0
    gallery = head(examples.gallery) if head else examples.gallery
    hits = 0
    for start in range(0, len(examples), EVAL_CHUNK):
        part = slice(start, start + EVAL_CHUNK)
        anchors = examples.anchors[part]
        scores = (head(anchors) if head else anchors) @ gallery.T
        owners = examples.owners[part]
        own = (owners[:, None] == examples.gallery_owners[None, :]) & (owners[:, None] >= 0)
        scores[own] = -np.inf
        hits += int(np.sum(examples.gallery_labels[scores.argmax(axis=1)] == examples.labels[part]))
    return hits / len(examples)


class ResidualMLP(torch.nn.Module):
    """x + W2 gelu(W1 x + b1) + b2 with W2 = 0 at the start: the identity until it learns."""

    def __init__(self, dim: int, hidden: int = 512) -> None:
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(hidden, dim) / dim**0.5)
        self.b1 = torch.nn.Parameter(torch.zeros(hidden))
        self.w2 = torch.nn.Parameter(torch.zeros(dim, hidden))
        self.b2 = torch.nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.gelu(x @ self.w1.T + self.b1) @ self.w2.T + self.b2


def new_module(kind: HeadKind, dim: int) -> torch.nn.Module:
    if kind == "mlp":
        return ResidualMLP(dim)
    linear = torch.nn.Linear(dim, dim)
    torch.nn.init.eye_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    return linear


def split(count: int, share: float, seed: int, groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held out) anchor indexes: about a random `share` held out, at least one each side. With `groups`
    (the product each anchor shows), whole products fall on one side, so that near-duplicate photos or texts of
    one product never sit on both and the held-out measure is one of products nothing learnt from; with fewer
    than two products, anchors are split one by one."""
    generator = np.random.default_rng(seed)
    held = min(max(1, round(count * share)), count - 1)
    if groups is None or len(np.unique(groups)) < 2:
        order = generator.permutation(count)
        return order[held:], order[:held]
    chosen: list[int] = []
    taken = 0
    products = generator.permutation(np.unique(groups))
    for product in products[:-1]:  # the last is never held out: something is left to learn from
        if taken >= held:
            break
        chosen.append(int(product))
        taken += int(np.sum(groups == product))
    out = np.isin(groups, chosen)
    return generator.permutation(np.flatnonzero(~out)), np.flatnonzero(out)


def held_out_split(
    examples: Examples, share: float, seed: int, by: HeldOutBy = "product"
) -> tuple[np.ndarray, np.ndarray]:
    """`split` of the examples, whole products or one by one."""
    return split(len(examples), share, seed, examples.groups() if by == "product" else None)


def fit_supervised(
    examples: Examples,
    *,
    kind: HeadKind = "linear",
    loss: Loss = "contrastive",
    epochs: int = 60,
    patience: int = 8,
    lr: float = 1e-3,
    temperature: float = 0.05,
    margin: float = 0.2,
    batch_size: int = 256,
    holdout: float = 1 / 7,
    held_out_by: HeldOutBy = "product",
    seed: int = 0,
) -> Fit:
    """Train a head so that anchors land nearest to gallery rows of their label; keep the epoch with the
    best held-out recall@1 (`held_out_by`: whole products or single examples held out) and stop after
    `patience` epochs without a better one."""
    started = time.perf_counter()
    if len(examples) < 4:
        raise ValueError(f"{len(examples)} labelled examples with a match in the catalogue: at least 4 are needed")
    torch.manual_seed(seed)
    fit_index, held_index = held_out_split(examples, holdout, seed, held_out_by)
    held = examples.take(held_index)
    dim = examples.anchors.shape[1]
    module = new_module(kind, dim)
    optimiser = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.0)
    anchors = torch.from_numpy(examples.anchors)
    labels = torch.from_numpy(examples.labels)
    owners = torch.from_numpy(examples.owners)
    gallery = torch.from_numpy(examples.gallery)
    gallery_labels = torch.from_numpy(examples.gallery_labels)
    gallery_owners = torch.from_numpy(examples.gallery_owners)
    rows_of = rows_by_label(examples.gallery_labels)
    generator = np.random.default_rng(seed)
    before = recall_at_1(held)

    def one_epoch() -> None:
        module.train()
        shuffled = generator.permutation(fit_index)
        for start in range(0, len(shuffled), batch_size):
            batch = torch.from_numpy(shuffled[start : start + batch_size])
            rows = torch.from_numpy(gallery_rows(rows_of, examples.labels[batch.numpy()], len(gallery), generator))
            value = batch_loss(
                F.normalize(module(anchors[batch]), dim=-1),
                F.normalize(module(gallery[rows]), dim=-1),
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
        module.eval()

    best, best_epoch, epoch = early_stopped(
        module,
        epochs=epochs,
        patience=patience,
        before=before,
        one_epoch=one_epoch,
        measure=lambda: recall_at_1(held, Head.from_module(kind, module)),
    )
    return Fit(
        Head.from_module(kind, module), before, best, epoch, best_epoch, time.perf_counter() - started, len(held)
    )


def early_stopped(
    module: torch.nn.Module,
    *,
    epochs: int,
    patience: int,
    before: float,
    one_epoch: Callable[[], None],
    measure: Callable[[], float],
    on_epoch: Callable[[int, float], None] | None = None,
) -> tuple[float, int, int]:
    """Run `one_epoch` up to `epochs` times and `measure` after each; keep the module's best state (the state it
    starts in counts, scored `before`: a fit never ends worse than where it began) and stop after `patience`
    epochs without a better score. Returns (the best score, its epoch, the epochs run)."""
    best, best_epoch, best_state = before, 0, copy.deepcopy(module.state_dict())
    epoch = 0
    for epoch in range(1, epochs + 1):
        one_epoch()
        measured = measure()
        log.info("epoch %d: held-out recall@1 %.3f (best %.3f)", epoch, measured, best)
        if on_epoch is not None:
            on_epoch(epoch, measured)
        if measured > best:
            best, best_epoch, best_state = measured, epoch, copy.deepcopy(module.state_dict())
        elif epoch - best_epoch >= patience:
            break
    module.load_state_dict(best_state)
    return best, best_epoch, epoch


def batch_loss(
    query: torch.Tensor,
    stored: torch.Tensor,
    query_side: tuple[torch.Tensor, torch.Tensor],
    stored_side: tuple[torch.Tensor, torch.Tensor],
    *,
    loss: Loss = "contrastive",
    temperature: float = 0.05,
    margin: float = 0.2,
) -> torch.Tensor | None:
    """The mean loss of a batch of L2-normalised anchors (`query`) against L2-normalised gallery rows
    (`stored`), each side given with its (labels, owners); None when no anchor has a positive among the
    rows. Contrastive: the softmax over the rows (at `temperature`) of the positives' share; triplet: the
    hardest positive against the hardest negative with `margin`. An anchor's own rows never count."""
    labels, owners = query_side
    row_labels, row_owners = stored_side
    scores = query @ stored.T
    own = (owners[:, None] == row_owners[None, :]) & (owners[:, None] >= 0)
    positive = (labels[:, None] == row_labels[None, :]) & ~own
    keep = positive.any(dim=1)
    if not bool(keep.any()):
        return None
    if loss == "triplet":
        hardest_positive = scores.masked_fill(~positive, float("inf")).min(dim=1).values
        hardest_negative = scores.masked_fill(positive | own, float("-inf")).max(dim=1).values
        per_anchor = F.relu(margin + hardest_negative - hardest_positive)
    else:
        logits = (scores / temperature).masked_fill(own, float("-inf"))
        per_anchor = torch.logsumexp(logits, dim=1) - torch.logsumexp(
            logits.masked_fill(~positive, float("-inf")), dim=1
        )
    return per_anchor[keep].mean()


def rows_by_label(labels: np.ndarray) -> dict[int, np.ndarray]:
    order = np.argsort(labels, kind="stable")
    values, starts = np.unique(labels[order], return_index=True)
    return {int(v): part for v, part in zip(values, np.split(order, starts[1:]), strict=True)}


def gallery_rows(
    rows_of: dict[int, np.ndarray],
    batch_labels: np.ndarray,
    size: int,
    generator: np.random.Generator,
    *,
    limit: int = GALLERY_MAX,
) -> np.ndarray:
    """The whole gallery when small; else the batch's positives and `limit` random rows (negatives)."""
    if size <= limit:
        return np.arange(size)
    positives = np.concatenate([rows_of[int(label)] for label in np.unique(batch_labels)])
    sample = generator.choice(size, limit, replace=False)
    return np.unique(np.concatenate([positives, sample]))


def mean_cosine(rows: np.ndarray, seed: int = 0) -> float:
    """Mean cosine between different rows (a sample of them): how bunched up a set of vectors is."""
    if len(rows) > SPREAD_SAMPLE:
        rows = rows[np.random.default_rng(seed).choice(len(rows), SPREAD_SAMPLE, replace=False)]
    if len(rows) < 2:
        return 0.0
    gram = rows @ rows.T
    return float((gram.sum() - np.trace(gram)) / (len(rows) * (len(rows) - 1)))


def fit_spread(
    gallery: np.ndarray,
    *,
    kind: HeadKind = "linear",
    steps: int = 20,
    lr: float = 1e-4,
    batch_size: int = 256,
    seed: int = 0,
    check: Examples | None = None,
    every: int = 5,
) -> Fit:
    """Unsupervised: minimise the mean pairwise dot product of the catalogue's own (head-mapped) vectors
    for a few steps. Without labels it runs `steps` steps and reports the mean pairwise cosine before and
    after (`before`/`after`); with a small labelled `check` it measures recall@1 every `every` steps and
    keeps the best step, the identity (step 0) included."""
    started = time.perf_counter()
    if len(gallery) < 2:
        raise ValueError("spreading needs at least 2 stored vectors")
    torch.manual_seed(seed)
    generator = np.random.default_rng(seed)
    module = new_module(kind, gallery.shape[1])
    before = recall_at_1(check) if check is not None else mean_cosine(gallery, seed)
    best_score, best_step, best_state = before, 0, copy.deepcopy(module.state_dict())  # step 0: the identity
    with torch.no_grad():  # a seed-dependent start near the identity: the seeds' variance is part of the result
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter) * 1e-3)
    optimiser = torch.optim.Adam(module.parameters(), lr=lr)
    rows = torch.from_numpy(gallery)
    for step in range(1, steps + 1):
        module.train()
        batch = rows[torch.from_numpy(generator.choice(len(gallery), min(batch_size, len(gallery)), replace=False))]
        mapped = F.normalize(module(batch), dim=-1)
        gram = mapped @ mapped.T
        off_diagonal = (gram.sum() - gram.diagonal().sum()) / (len(batch) * (len(batch) - 1))
        optimiser.zero_grad()
        off_diagonal.backward()  # type: ignore[no-untyped-call]
        optimiser.step()
        if check is not None and (step % every == 0 or step == steps):
            module.eval()
            score = recall_at_1(check, Head.from_module(kind, module))
            if score > best_score:
                best_score, best_step, best_state = score, step, copy.deepcopy(module.state_dict())
    if check is None:
        best_step, best_state = steps, module.state_dict()
    module.load_state_dict(best_state)
    head = Head.from_module(kind, module)
    spread = (mean_cosine(gallery, seed), mean_cosine(head(gallery), seed))
    after = recall_at_1(check, head) if check is not None else spread[1]
    seconds = time.perf_counter() - started
    return Fit(head, before, after, steps, best_step, seconds, len(check) if check else 0, spread)
