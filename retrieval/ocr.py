"""Text on the package as a matching signal: what a photo shows in print, read by OCR, and the sparse vector
it becomes.

The engine is rapidocr-onnxruntime: PP-OCRv4 detection and recognition shipped inside its wheel and run by
onnxruntime, so it works offline. Chosen by measurement on grocery val (docs/BENCHMARKS.md, "Text on the
package"): usable words on most packaged photos at about 0.2 s a photo on one core; the angle classifier
is off (no loss measured).

OCR mangles letters (`MELLANMIOU` for `mellanmjölk`), so words are matched by their character trigrams with
boundary marks (`#mel`, `mel`, ... `iou#`): a misread letter costs three trigrams, not the word. A product's
document is the text read off its photos plus its title and brand, weighted as BM25 with IDF applied by the
engine (the `ocr` sparse vector's modifier), as the lexical signal is."""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image
from qdrant_client import models

from retrieval.lexical import normalise, sparse_vector

ENGINE = "rapidocr-onnxruntime:PP-OCRv4"
MIN_LINE_SCORE = 0.5  # a line the recogniser is less sure of is left out (0-0.8 measured the same)
MIN_READ_CHARACTERS = 10  # a query photo that shows less text than this searches without it (an apple)
K1 = 1.2
B = 0.75
# BM25 length normalisation against a fixed typical document (trigrams of the photo's text, title and
# brand): a running average would change every stored weight as a catalogue grows.
AVERAGE_LENGTH = 25.0  # the mean over the grocery catalogue (81 products)
_NOT_WORD = re.compile(r"[^a-z0-9]+")


@dataclass(frozen=True)
class Line:
    text: str
    score: float


def words(text: str) -> list[str]:
    """Words of 2+ letters or digits, lower case, accents removed (å, ä -> a; ö -> o); anything else (the
    recogniser's stray glyphs included) separates words."""
    return [w for w in _NOT_WORD.split(normalise(text)) if len(w) >= 2]


def trigrams(word: str) -> list[str]:
    marked = f"#{word}#"
    return [marked[i : i + 3] for i in range(len(marked) - 2)]


def readable_characters(text: str) -> int:
    """How much text a photo showed: the letters and digits of its words."""
    return sum(len(w) for w in words(text))


def document_vector(read: Iterable[str], title: str | None, brand: str | None) -> models.SparseVector | None:
    """BM25 trigram weights of what a product's photos read, its title and its brand."""
    counts: Counter[str] = Counter()
    for text in [*read, title or "", brand or ""]:
        for word in words(text):
            counts.update(trigrams(word))
    if not counts:
        return None
    norm = K1 * (1 - B + B * sum(counts.values()) / AVERAGE_LENGTH)
    return sparse_vector({g: f * (K1 + 1) / (f + norm) for g, f in counts.items()})


def query_vector(read: str) -> models.SparseVector | None:
    """A query photo's trigrams, weight 1 each; None when it showed too little text to search with."""
    if readable_characters(read) < MIN_READ_CHARACTERS:
        return None
    return sparse_vector({g: 1.0 for word in words(read) for g in trigrams(word)})


def matched_words(read: str, product_text: Sequence[str]) -> list[str]:
    """The words a query photo read that the product's text also has (exactly, after normalising), to show
    why it matched."""
    have = {w for text in product_text for w in words(text)}
    return list(dict.fromkeys(w for w in words(read) if w in have))


class TextReader:
    """OCR of photos, loaded on first use; one photo at a time per reader (onnxruntime sessions are shared,
    a lock keeps calls apart), `threads` onnxruntime threads for each."""

    def __init__(self, threads: int = 1) -> None:
        self._threads = threads
        self._engine: Any = None
        self._lock = threading.Lock()

    def _load(self) -> Any:
        if self._engine is None:
            from rapidocr_onnxruntime import RapidOCR  # onnxruntime and the models load only when used

            self._engine = RapidOCR(
                use_cls=False,
                text_score=MIN_LINE_SCORE,
                intra_op_num_threads=self._threads,
                inter_op_num_threads=1,
            )
        return self._engine

    def lines(self, image: Image.Image) -> list[Line]:
        with self._lock:
            found, _ = self._load()(image.convert("RGB"))
        return [Line(str(text), float(score)) for _, text, score in found or [] if float(score) >= MIN_LINE_SCORE]

    def read(self, image: Image.Image) -> str:
        """The text of a photo, line by line."""
        return "\n".join(line.text for line in self.lines(image))
