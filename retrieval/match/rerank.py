"""The pairwise re-ranker: a cross-encoder that reads two listings together and scores how likely they are
the same product.

The bi-encoders embed each listing alone, so two siblings that differ in one word ("... 2008 upgrade" vs
"... 2008") land next to each other. A cross-encoder attends across both texts at once and learns from a
marketplace's labels which differences matter. No cross-encoder weights ship offline, so it starts from the
offline MiniLM sentence encoder (the library adds a fresh one-logit classifier on top) and is trained on the
labelled pairs: every true pair, plus the candidates the catalogue's own search ranks highest that are not
the same product (the siblings that fool it today). Its weights are kept by digest (retrieval/weights.py);
its probability becomes a feature of the match model, which re-ranks a product's first `depth` candidates.

The training loop is sentence-transformers' own `CrossEncoderTrainer` (binary cross-entropy, the held-out
pairs' average precision judged after each epoch by its classification evaluator, early stopping and the best
epoch kept by the transformers Trainer underneath), not a loop of ours."""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retrieval.encoders.base import resolve_precision
from retrieval.encoders.sentence import resolve_model_path
from retrieval.lexical import clean
from retrieval.weights import keep_model, kept_model
from schemas.payload import Product

log = logging.getLogger("retrieval.rerank")

MAX_LENGTH = 64  # word pieces of the pair together: titles decide; long descriptions cost 3x and add noise
DESCRIPTION_WORDS = 12  # the first words of a description carry the model and edition where titles lack them
DEFAULT_RERANK_DEPTH = 10  # candidates per product the cross-encoder reads (each costs one forward pass)
HARD_NEGATIVES = 4  # the highest-ranked non-matches per labelled product that training reads
_lock = threading.Lock()
_loaded: dict[str, Reranker] = {}


def listing_text(product: Product) -> str:
    """What the cross-encoder reads of one listing: brand, title, model number, price and the description's
    first words, cleaned of markup the way the lexical signal cleans it."""
    head = " ".join(part for part in (product.brand, product.title, product.mpn) if part)
    price = f"{product.price:g}" if product.price and product.price > 0 else ""
    words = clean(product.description or "").split()[:DESCRIPTION_WORDS]
    text = " ".join(filter(None, [clean(head), price]))
    return f"{text} | {' '.join(words)}" if words else text


@dataclass
class PairSet:
    """Labelled pairs of listings, as the cross-encoder reads them, with the labelled product they come from."""

    left: list[str] = field(default_factory=list)
    right: list[str] = field(default_factory=list)
    labels: list[bool] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)

    def add(self, query: Product, candidate: Product, same: bool, group: int) -> None:
        self.left.append(listing_text(query))
        self.right.append(listing_text(candidate))
        self.labels.append(same)
        self.groups.append(group)

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, rows: Sequence[int]) -> PairSet:
        return PairSet(
            [self.left[i] for i in rows],
            [self.right[i] for i in rows],
            [self.labels[i] for i in rows],
            [self.groups[i] for i in rows],
        )


@dataclass
class RerankFit:
    """What training a cross-encoder did: held-out average precision before and after, epochs, seconds."""

    folder: Path
    epochs: int
    best_epoch: int
    before: float
    after: float
    pairs: int
    held_out: int
    seconds: float


def _base_model() -> str:
    """The offline MiniLM folder (the text encoder's default package)."""
    return resolve_model_path("all-MiniLM-L6-v2")[0]


def _average_precision(model: object, pairs: PairSet) -> float:
    from sklearn.metrics import average_precision_score

    if not pairs.labels or all(pairs.labels) or not any(pairs.labels):
        return 0.0
    scores = model.predict(  # type: ignore[attr-defined]
        list(zip(pairs.left, pairs.right, strict=True)), batch_size=64, show_progress_bar=False
    )
    return float(average_precision_score(pairs.labels, np.asarray(scores)))


def train_cross_encoder(
    pairs: PairSet,
    out: Path,
    *,
    held_out: PairSet | None = None,
    base: str | None = None,
    epochs: int = 3,
    batch_size: int = 16,
    lr: float = 5e-5,
    seed: int = 0,
    max_length: int = MAX_LENGTH,
    precision: str = "auto",
) -> RerankFit:
    """Fine-tune every layer of a cross-encoder on `pairs` (binary cross-entropy) with `CrossEncoderTrainer`; the
    epoch with the best average precision on `held_out` is saved to `out`, and training stops at the first epoch
    that does not beat the best. Epoch 0, the untrained model, counts too: a fit never saves something worse than
    where it began. `precision`: bf16 autocast where the CPU computes it natively (auto; about twice as fast
    here), or fp32."""
    from datasets import Dataset
    from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.evaluation import CrossEncoderClassificationEvaluator
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss
    from transformers import EarlyStoppingCallback, PrinterCallback, set_seed

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if len(pairs) < 8 or all(pairs.labels) or not any(pairs.labels):
        raise ValueError(f"a cross-encoder needs at least 8 labelled pairs of both kinds, got {len(pairs)}")
    if held_out is not None and (all(held_out.labels) or not any(held_out.labels)):
        # every epoch would score 0 on it, and the untrained model would be kept without a word
        raise ValueError(
            f"the cross-encoder's early-stopping pairs ({len(held_out)}) are all of one kind: it cannot be judged"
        )
    amp = resolve_precision(precision, "cross-encoder") == "bf16"
    set_seed(seed)
    started = time.perf_counter()
    model = CrossEncoder(base or _base_model(), num_labels=1, max_length=max_length)
    train = Dataset.from_dict({"left": pairs.left, "right": pairs.right, "label": [float(y) for y in pairs.labels]})
    evaluator = (
        CrossEncoderClassificationEvaluator(
            [[a, b] for a, b in zip(held_out.left, held_out.right, strict=True)],
            [int(y) for y in held_out.labels],
            name="held",
            write_csv=False,
            show_progress_bar=False,
        )
        if held_out is not None
        else None
    )
    before = float(evaluator(model)["held_average_precision"]) if evaluator else 0.0
    steps = -(-len(pairs) // batch_size)
    with tempfile.TemporaryDirectory(prefix="rerank-") as scratch:
        untrained = Path(scratch) / "untrained"
        model.save_pretrained(str(untrained))  # epoch 0, kept if no epoch beats it
        judged = "epoch" if evaluator else "no"
        args = CrossEncoderTrainingArguments(
            output_dir=str(Path(scratch) / "checkpoints"),
            num_train_epochs=epochs,
            per_device_train_batch_size=batch_size,
            learning_rate=lr,
            warmup_steps=max(1, steps // 10),  # the first tenth of the first epoch
            seed=seed,
            bf16=amp,
            use_cpu=True,
            eval_strategy=judged,
            save_strategy=judged,
            save_total_limit=1,
            load_best_model_at_end=evaluator is not None,
            metric_for_best_model="eval_held_average_precision",
            greater_is_better=True,
            logging_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = CrossEncoderTrainer(
            model=model,
            args=args,
            train_dataset=train,
            loss=BinaryCrossEntropyLoss(model),
            evaluator=evaluator,
            callbacks=[EarlyStoppingCallback(early_stopping_patience=1)] if evaluator else [],
        )
        trainer.remove_callback(PrinterCallback)  # its epoch lines go to the log below, not to stdout
        trainer.train()
        scores = [
            float(entry["eval_held_average_precision"])
            for entry in trainer.state.log_history
            if "eval_held_average_precision" in entry
        ]
        for epoch, score in enumerate(scores, start=1):
            log.info("cross-encoder epoch %d: held-out average precision %.3f", epoch, score)
        done = len(scores) if evaluator else epochs
        best_epoch = 1 + int(np.argmax(scores)) if scores else epochs
        best = max(scores) if scores else float(epochs)
        out.mkdir(parents=True, exist_ok=True)
        if evaluator is not None and best <= before:  # no epoch beat the untrained model: it is what is kept
            best_epoch, best = 0, before
            for item in untrained.iterdir():
                os.replace(item, out / item.name)
        else:
            model.save_pretrained(str(out))
    return RerankFit(
        folder=out,
        epochs=done,
        best_epoch=best_epoch,
        before=before,
        after=best,
        pairs=len(pairs),
        held_out=len(held_out) if held_out else 0,
        seconds=time.perf_counter() - started,
    )


class Reranker:
    """A kept cross-encoder: `score` gives the probability that each candidate is the query's product."""

    def __init__(self, folder: Path, digest: str) -> None:
        from sentence_transformers import CrossEncoder

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.digest = digest
        self._model = CrossEncoder(str(folder), max_length=MAX_LENGTH, local_files_only=True)
        self._lock = threading.Lock()  # one forward at a time: the service calls it from worker threads

    def score(self, query: Product, candidates: Sequence[Product]) -> np.ndarray:
        if not candidates:
            return np.zeros(0)
        left = listing_text(query)
        with self._lock:
            scores = self._model.predict(
                [(left, listing_text(c)) for c in candidates], batch_size=32, show_progress_bar=False
            )
        return np.asarray(scores, dtype=np.float64).reshape(-1)


def keep_reranker(folder: Path, models_root: Path) -> str:
    """Keep a trained cross-encoder's folder by digest; returns the digest the catalogue's model records."""
    return keep_model(folder, models_root)


def load_reranker(models_root: Path, digest: str) -> Reranker:
    """The kept cross-encoder named by `digest` (verified against it), loaded once per process."""
    with _lock:
        if digest not in _loaded:
            _loaded[digest] = Reranker(kept_model(models_root, digest), digest)
        return _loaded[digest]
