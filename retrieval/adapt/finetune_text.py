"""Fine-tuning a catalogue's text encoder on labelled pairs: every layer of the sentence-transformers model
trained with in-batch negatives (MultipleNegativesRankingLoss) plus one hard negative per pair, mined from
the catalogue itself: the stored products that the catalogue's current text vectors rank above (or close
below) an anchor's true match without being labelled the same.

The anchors are the labelled lines (a stored product, or a text) and their matches the expected products,
both read as the text their `text` vector embeds (rebuilt from the payload). A held-out share of the anchors
measures recall@1 against the catalogue's products: first with the vectors in use now (the number to beat),
then after every epoch (or every `eval_every` steps); the best evaluated model is kept, and training stops
once `patience` evaluations in a row did not beat it."""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from retrieval.adapt.data import Groups
from retrieval.adapt.heads import ActiveHead, Adapters, EncoderHead, Head
from retrieval.adapt.train import split
from retrieval.encoders.base import EncoderError, TextEncoder, resolve_precision
from retrieval.records import TEXT_FIELDS, payload_text
from retrieval.store import ADAPTED_VECTORS, TEXT_VECTOR, ProductStore
from retrieval.weights import keep_model
from schemas.adapters import AdaptExample

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

PAGE = 256
EVAL_GALLERY_MAX = 4096  # products a held-out measure embeds; a larger catalogue is measured on a candidate set
EVAL_CANDIDATES = 100  # per held-out anchor, its nearest products under the current vectors (larger catalogues)
MAX_POSITIVES = 4  # training pairs per anchor: one per expected product, at most this many
EMBED_BATCH = 64

Encode = Callable[[list[str]], np.ndarray]


@dataclass(frozen=True)
class FinetuneOptions:
    """How long and how hard to train. `near`: a product scoring within this cosine below an anchor's true
    match is hard enough to be its negative; `pool`: the hardest ones kept per anchor, one drawn per epoch."""

    epochs: int = 3
    patience: int = 1
    lr: float = 3e-5
    batch_size: int = 32
    max_length: int = 64
    holdout: float = 1 / 7
    seed: int = 0
    eval_every: int | None = None  # steps between held-out measures (default: once per epoch)
    max_steps: int | None = None  # a cap on the optimiser steps, whatever the epochs
    near: float = 0.05
    pool: int = 5
    scale: float = 20.0  # MultipleNegativesRankingLoss: cosine x scale (1 / temperature)
    precision: str = "auto"  # held-out embedding: bf16 where the CPU has it, as the served model runs


@dataclass
class TextCatalogue:
    """The catalogue's products with a text: (retailer, id), the text, its current vector (one row each)."""

    ids: list[tuple[str, str]]
    texts: list[str]
    vectors: np.ndarray
    by_id: dict[str, list[int]] = field(default_factory=dict)
    by_text: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for index, ((_, product_id), text) in enumerate(zip(self.ids, self.texts, strict=True)):
            self.by_id.setdefault(product_id, []).append(index)
            self.by_text.setdefault(text, index)


def read_text_catalogue(store: ProductStore, catalogue: str, *, using: str = TEXT_VECTOR) -> TextCatalogue:
    """Every product's embedded text (from its payload) and its stored vector `using` (the raw `text`, or the
    adapted twin where a text head is active); products without both are left out."""
    ids: list[tuple[str, str]] = []
    texts: list[str] = []
    rows: list[list[float]] = []
    fields = ["retailer", "product_id", *TEXT_FIELDS]
    for points in store.scroll_pages(catalogue, page=PAGE, with_payload=fields, with_vectors=[using]):
        for point in points:
            payload = point.payload or {}
            vector = (point.vector if isinstance(point.vector, dict) else {}).get(using)
            text = payload_text(payload)
            if not text or not isinstance(vector, list) or not vector or isinstance(vector[0], list):
                continue
            ids.append((str(payload.get("retailer")), str(payload.get("product_id"))))
            texts.append(text)
            rows.append([float(x) for x in vector])
    if not ids:
        raise ValueError(f"catalogue {catalogue!r} has no stored texts with {using} vectors to learn from")
    return TextCatalogue(ids, texts, np.asarray(rows, dtype=np.float32))


@dataclass
class Anchors:
    """Labelled anchors: their texts, the stored product each one is (-1: a text from outside), the expected
    products, and a label (its group of same products) per anchor and per catalogue product.

    A stored product whose matches are all in other shops is matched as `/matches` does, against the other
    shops only: `shops` holds its retailer's code (-1: nothing left out but itself), and the held-out
    measure and the negatives leave that retailer's products out."""

    texts: list[str]
    owners: np.ndarray
    positives: list[list[int]]
    labels: np.ndarray
    shops: np.ndarray
    product_labels: np.ndarray
    product_shops: np.ndarray
    skipped: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def excluded(self, index: int) -> np.ndarray:
        """Which catalogue products anchor `index` is never matched to (itself, its shop's when left out)."""
        out = (
            self.product_shops == self.shops[index]
            if self.shops[index] >= 0
            else np.zeros(len(self.product_shops), bool)
        )
        if self.owners[index] >= 0:
            out[self.owners[index]] = True
        return out


def labelled_anchors(catalogue: TextCatalogue, lines: Sequence[tuple[int, AdaptExample]]) -> Anchors:
    """Anchors of the lines that name stored products: a line's `product` (its stored text) or its `text`
    (a text identical to a stored product's is that product), matched to its expected ids."""
    groups = Groups(len(catalogue.ids))
    by_ref = {ref: i for i, ref in enumerate(catalogue.ids)}
    found: dict[tuple[int, str], set[int]] = {}  # (owner, text) -> expected products, lines merged
    skipped: list[str] = []
    for number, example in lines:
        expected = {i for product_id in example.expect for i in catalogue.by_id.get(product_id, [])}
        if example.product is not None:
            owner = by_ref.get((example.product.retailer, example.product.id))
            if owner is None:
                skipped.append(
                    f"line {number}: no stored product with a text {example.product.retailer}/{example.product.id}"
                )
                continue
            text = catalogue.texts[owner]
        elif example.text and example.text.strip():
            text = example.text
            owner = catalogue.by_text.get(text, -1)
        else:
            skipped.append(f"line {number}: no text to learn from")
            continue
        expected.discard(owner)
        if not expected:
            reason = "no expected product" if not example.expect else "none of its expected ids is stored with a text"
            skipped.append(f"line {number}: {reason}")
            continue
        groups.join(([owner] if owner >= 0 else []) + sorted(expected))
        found.setdefault((owner, text), set()).update(expected)
    product_labels = np.asarray([groups.find(i) for i in range(len(catalogue.ids))], dtype=np.int64)
    codes: dict[str, int] = {}
    product_shops = np.asarray([codes.setdefault(shop, len(codes)) for shop, _ in catalogue.ids], dtype=np.int64)
    keys = list(found)
    shops = []
    for owner, text in keys:
        own_shop = int(product_shops[owner]) if owner >= 0 else -1
        elsewhere = own_shop >= 0 and all(product_shops[i] != own_shop for i in found[(owner, text)])
        shops.append(own_shop if elsewhere else -1)
    return Anchors(
        texts=[text for _, text in keys],
        owners=np.asarray([owner for owner, _ in keys], dtype=np.int64),
        positives=[sorted(found[key]) for key in keys],
        labels=np.asarray([product_labels[min(found[key])] for key in keys], dtype=np.int64),
        shops=np.asarray(shops, dtype=np.int64),
        product_labels=product_labels,
        product_shops=product_shops,
        skipped=skipped,
    )


def current_vectors(catalogue: TextCatalogue, anchors: Anchors, encode: Encode) -> np.ndarray:
    """The anchors as the catalogue's current text vectors see them: a stored product's own vector, a text
    embedded by the encoder in use (`encode`)."""
    out = np.zeros((len(anchors), catalogue.vectors.shape[1]), dtype=np.float32)
    outside = [i for i, owner in enumerate(anchors.owners) if owner < 0]
    inside = [i for i, owner in enumerate(anchors.owners) if owner >= 0]
    if inside:
        out[inside] = catalogue.vectors[anchors.owners[inside]]
    if outside:
        out[outside] = encode([anchors.texts[i] for i in outside])
    return out


def mine_hard_negatives(
    catalogue: TextCatalogue, anchors: Anchors, vectors: np.ndarray, *, near: float = 0.05, pool: int = 5
) -> list[list[int]]:
    """Per anchor, up to `pool` products of another label that score above its best true match or less than
    `near` below it, hardest first (none qualify: the hardest product of another label)."""
    out: list[list[int]] = []
    for start in range(0, len(anchors), 512):
        scores = vectors[start : start + 512] @ catalogue.vectors.T
        for row, index in zip(scores, range(start, start + len(scores)), strict=True):
            same = (anchors.product_labels == anchors.labels[index]) | anchors.excluded(index)
            true = float(row[anchors.positives[index]].max())
            order = np.argsort(-row, kind="stable")
            others = order[~same[order]]
            hard = others[row[others] >= true - near][:pool]
            out.append([int(i) for i in (hard if len(hard) else others[:1])])
    return out


@dataclass
class TextFit:
    """A fine-tuning run: the best model saved under `folder`, the held-out recall@1 of the vectors in use
    before it (`before`) and of the kept model (`after`)."""

    folder: Path
    before: float
    after: float
    epochs: int  # epochs started
    steps: int  # optimiser steps run
    best_step: int  # the step of the kept model
    seconds: float
    holdout: int  # anchors measured
    pairs: int  # training pairs (anchor, match)
    hard_negatives: int  # training anchors with a mined negative above or near their match
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out recall@1)


@dataclass(frozen=True)
class _Pair:
    anchor: int
    positive: int
    label: int


def base_model(encoder: TextEncoder) -> SentenceTransformer:
    """A trainable copy of a sentence-transformers text encoder's model (the loaded encoder is shared and
    stays as it is)."""
    from retrieval.encoders.sentence import SentenceTextEncoder

    if not isinstance(encoder, SentenceTextEncoder):
        raise EncoderError(f"only a sentence-transformers text encoder can be fine-tuned, not {encoder.name}")
    return copy.deepcopy(encoder.model)


def finetune(
    model: SentenceTransformer,
    catalogue: TextCatalogue,
    anchors: Anchors,
    vectors: np.ndarray,
    out: Path,
    *,
    options: FinetuneOptions | None = None,
) -> TextFit:
    """Train `model` (all layers, in place) on the anchors' pairs; the best held-out model is saved to `out`.
    `vectors`: the anchors under the current text vectors (`current_vectors`), which mine the negatives
    and give the number to beat."""
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    options = options or FinetuneOptions()
    started = time.perf_counter()
    if len(anchors) < 4:
        raise ValueError(f"{len(anchors)} labelled anchors with a stored match: at least 4 are needed")
    torch.manual_seed(options.seed)
    generator = np.random.default_rng(options.seed)
    fit_index, held_index = split(len(anchors), options.holdout, options.seed, anchors.labels)
    gallery = _eval_gallery(catalogue, anchors, vectors, held_index, generator)
    before = _recall(anchors, held_index, vectors[held_index], gallery, catalogue.vectors[gallery])
    negatives = mine_hard_negatives(catalogue, anchors, vectors, near=options.near, pool=options.pool)
    hard = sum(1 for i in fit_index if _above_or_near(catalogue, anchors, vectors, int(i), negatives, options.near))
    pairs = [_Pair(int(i), p, int(anchors.labels[i])) for i in fit_index for p in anchors.positives[i][:MAX_POSITIVES]]
    model.max_seq_length = options.max_length
    loss = MultipleNegativesRankingLoss(model, scale=options.scale)
    optimiser = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=0.01)
    first = list(_batches(pairs, negatives, anchors, options.batch_size, generator))
    per_epoch = len(first)  # a batch leaves out pairs that would clash with it, so epochs can run longer
    total = min(options.max_steps or per_epoch * options.epochs, per_epoch * options.epochs)
    warmup = max(1, total // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup)))
    )
    precision = resolve_precision(options.precision, "text")
    log.info(
        "fine-tuning on %d pairs (%d anchors held out, gallery %d): held-out recall@1 now %.3f",
        len(pairs),
        len(held_index),
        len(gallery),
        before,
    )
    best, best_step, stale = -1.0, 0, 0
    best_state: dict[str, torch.Tensor] | None = None
    history: list[tuple[int, float]] = []
    step = epoch = 0

    def evaluate() -> bool:
        """Measure the model on the held-out anchors, keep it if best; True when training should stop."""
        nonlocal best, best_step, best_state, stale
        measured = _measure(model, catalogue, anchors, held_index, gallery, precision)
        history.append((step, measured))
        log.info("epoch %d, step %d: held-out recall@1 %.3f (best so far %.3f)", epoch, step, measured, best)
        if measured > best:
            best, best_step, stale = measured, step, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
        return stale >= options.patience

    stop = False
    while not stop and epoch < options.epochs and step < total:
        epoch += 1
        for batch in first if epoch == 1 else _batches(pairs, negatives, anchors, options.batch_size, generator):
            model.train()
            columns = [
                [anchors.texts[p.anchor] for p, _ in batch],
                [catalogue.texts[p.positive] for p, _ in batch],
                [catalogue.texts[n] for _, n in batch],
            ]
            features = [_on(model.preprocess(c), model.device) for c in columns]
            value = loss(features, torch.empty(0))
            optimiser.zero_grad()
            value.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            schedule.step()
            step += 1
            if step >= total:
                break
            if options.eval_every and step % options.eval_every == 0 and (stop := evaluate()):
                break
        if not stop and not options.eval_every:  # once per epoch
            stop = evaluate()
    if not history or history[-1][0] != step:  # the last steps are measured too
        evaluate()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    model.save(str(out))
    return TextFit(
        out,
        before,
        best,
        epoch,
        step,
        best_step,
        time.perf_counter() - started,
        len(held_index),
        len(pairs),
        hard,
        history,
    )


def _on(features: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}


def _above_or_near(
    catalogue: TextCatalogue, anchors: Anchors, vectors: np.ndarray, index: int, negatives: list[list[int]], near: float
) -> bool:
    if not negatives[index]:
        return False
    row = vectors[index]
    true = float((catalogue.vectors[anchors.positives[index]] @ row).max())
    return float(catalogue.vectors[negatives[index][0]] @ row) >= true - near


def _batches(
    pairs: list[_Pair],
    negatives: list[list[int]],
    anchors: Anchors,
    size: int,
    generator: np.random.Generator,
) -> Iterator[list[tuple[_Pair, int]]]:
    """Shuffled batches of (pair, its negative this epoch) in which no text is another anchor's match: an
    anchor's label appears once, and no negative belongs to another anchor's label (in-batch negatives
    would otherwise count a true match as wrong)."""
    chosen = [(pair, negatives[pair.anchor][int(generator.integers(len(negatives[pair.anchor])))]) for pair in pairs]
    waiting = [chosen[i] for i in generator.permutation(len(chosen))]
    while waiting:
        batch: list[tuple[_Pair, int]] = []
        labels: set[int] = set()  # the anchors' labels in the batch
        docs: set[int] = set()  # every label a text of the batch has
        later = []
        for pair, negative in waiting:
            negative_label = int(anchors.product_labels[negative])
            if len(batch) < size and pair.label not in docs and negative_label not in labels:
                batch.append((pair, negative))
                labels.add(pair.label)
                docs.update((pair.label, negative_label))
            else:
                later.append((pair, negative))
        if len(batch) < 2:  # what is left cannot share a batch: one pair has no in-batch negatives
            batch += later
            later = []
        yield batch
        waiting = later


def _eval_gallery(
    catalogue: TextCatalogue,
    anchors: Anchors,
    vectors: np.ndarray,
    held: np.ndarray,
    generator: np.random.Generator,
) -> np.ndarray:
    """The products a held-out measure ranks: all of them up to EVAL_GALLERY_MAX; beyond, each held-out
    anchor's nearest EVAL_CANDIDATES under the current vectors, its matches, and random others."""
    count = len(catalogue.ids)
    if count <= EVAL_GALLERY_MAX:
        return np.arange(count)
    keep: set[int] = set()
    for index in held:
        scores = catalogue.vectors @ vectors[index]
        keep.update(int(i) for i in np.argpartition(-scores, EVAL_CANDIDATES)[:EVAL_CANDIDATES])
        keep.update(int(i) for i in np.flatnonzero(anchors.product_labels == anchors.labels[index]))
        if anchors.owners[index] >= 0:
            keep.add(int(anchors.owners[index]))
    rest = np.setdiff1d(np.arange(count), np.fromiter(keep, dtype=np.int64))
    fill = max(0, EVAL_GALLERY_MAX - len(keep))
    keep.update(int(i) for i in generator.choice(rest, min(fill, len(rest)), replace=False))
    return np.asarray(sorted(keep), dtype=np.int64)


def _recall(
    anchors: Anchors, held: np.ndarray, anchor_rows: np.ndarray, gallery: np.ndarray, gallery_rows: np.ndarray
) -> float:
    """Share of the held-out anchors whose best gallery product (leaving out what each never matches) has
    their label."""
    scores = np.asarray(anchor_rows, dtype=np.float32) @ np.asarray(gallery_rows, dtype=np.float32).T
    for row, index in enumerate(held):
        scores[row, anchors.excluded(int(index))[gallery]] = -np.inf
    best = gallery[scores.argmax(axis=1)]
    return float(np.mean(anchors.product_labels[best] == anchors.labels[held])) if len(held) else 0.0


def _measure(
    model: SentenceTransformer,
    catalogue: TextCatalogue,
    anchors: Anchors,
    held: np.ndarray,
    gallery: np.ndarray,
    precision: str,
) -> float:
    encode = _encoder_of(model, precision)
    return _recall(
        anchors, held, encode([anchors.texts[i] for i in held]), gallery, encode([catalogue.texts[i] for i in gallery])
    )


def _encoder_of(model: SentenceTransformer, precision: str) -> Encode:
    def encode(texts: list[str]) -> np.ndarray:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            rows = model.encode(
                texts, batch_size=EMBED_BATCH, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
            )
        return np.asarray(rows, dtype=np.float32)

    return encode


@dataclass
class Tuned:
    """A fine-tuned encoder kept under `digest`, with the run that made it and the anchors it learnt from."""

    digest: str
    fit: TextFit
    anchors: Anchors
    catalogue: TextCatalogue


def current_encoder(base: TextEncoder, head: ActiveHead | None) -> Encode:
    """How a text becomes the catalogue's current text vector: its fine-tuned encoder, base + head, or base."""
    if isinstance(head, EncoderHead):
        return head.encoder.embed_texts
    if isinstance(head, Head):
        mapped = head
        return lambda texts: mapped(base.embed_texts(texts))
    return base.embed_texts


def finetune_catalogue(
    adapters: Adapters,
    catalogue: str,
    lines: Sequence[tuple[int, AdaptExample]],
    base: TextEncoder,
    *,
    options: FinetuneOptions | None = None,
) -> Tuned:
    """Fine-tune `base` (the catalogue's text encoder) on the labelled lines against the catalogue's
    products, and keep the best model under MODELS_PATH by its digest (nothing is stored in the catalogue:
    that is `Adapters.save`)."""
    adapters.require_slots(catalogue)
    head = adapters.active_heads(catalogue).get(TEXT_VECTOR)
    using = ADAPTED_VECTORS[TEXT_VECTOR] if head is not None else TEXT_VECTOR
    products = read_text_catalogue(adapters.store, catalogue, using=using)
    anchors = labelled_anchors(products, lines)
    if len(anchors) < 4:
        raise ValueError(
            f"{len(anchors)} labelled anchors with a stored match in {catalogue!r}: at least 4 are needed"
            + (f" ({anchors.skipped[0]}, ...)" if anchors.skipped else "")
        )
    vectors = current_vectors(products, anchors, current_encoder(base, head))
    model = base_model(base)
    with tempfile.TemporaryDirectory(prefix="finetune-") as folder:
        fit = finetune(model, products, anchors, vectors, Path(folder) / "model", options=options)
        digest = keep_model(fit.folder, adapters.models_root)
    fit.folder = adapters.models_root / digest
    return Tuned(digest, fit, anchors, products)
