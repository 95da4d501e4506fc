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
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from qdrant_client import models

from retrieval.lexical import bm25_vector, normalise, sparse_vector

ENGINE = "rapidocr-onnxruntime:PP-OCRv4"
MIN_LINE_SCORE = 0.5  # a line the recogniser is less sure of is left out (0-0.8 measured the same)
MIN_READ_CHARACTERS = 10  # a query photo that shows less text than this searches without it (an apple)
# BM25 length normalisation against a fixed typical document (trigrams of the photo's text, title and
# brand): a running average would change every stored weight as a catalogue grows.
AVERAGE_LENGTH = 25.0  # the mean over the grocery catalogue (81 products)
_NOT_WORD = re.compile(r"[^a-z0-9]+")
# What one read may cost (class TextReader): a photo full of small print (2000 x 2000 px, 1,000 lines) took 41-51 s
# to read whole. The recogniser's cost grows with the width of what it reads, in line heights (a box 2000 px
# wide and 18 px high is 110 heights: as much work as 20 words of a pack), so that is what is budgeted.
MAX_SIDE = 1024  # pixels, the longer side the detector sees at most (every grocery photo is smaller)
# The detector sees a photo's shorter side scaled to at least this many pixels (rapidocr's own default, 736):
# small print on a 348-pixel shopper photo is found only when enlarged. Measured against 544 and 416, which
# read 1.6x and 2.5x as fast and lose photo-query recall (`python -m bench.ocr_side`, docs/BENCHMARKS.md).
DETECT_SIDE = 736
MAX_BOXES = 64  # text boxes recognised at most, the largest first
MAX_LINE_HEIGHTS = 40  # a box wider than this many of its heights is read from its start only
READ_HEIGHTS = 400  # line heights recognised at most in one photo (a pack shows 50-150)
REC_BATCH = 8  # boxes recognised in one call; the deadline is checked between calls


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
    return bm25_vector(counts, AVERAGE_LENGTH)


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


class ReadTimeout(TimeoutError):
    """A photo's text was not read by its deadline (a photo covered in small print): search without it."""


def _area(box: Any) -> float:
    """The area of a detected text box (four corners), by the shoelace formula."""
    xs, ys = box[:, 0], box[:, 1]
    return 0.5 * abs(float(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))))


def _scaled(image: Image.Image, max_side: int) -> Image.Image:
    image = image.convert("RGB")
    if max(image.size) <= max_side:
        return image
    ratio = max_side / max(image.size)
    size = (max(1, round(image.width * ratio)), max(1, round(image.height * ratio)))
    return image.resize(size, Image.Resampling.BILINEAR)


class TextReader:
    """OCR of photos, loaded on first use; one photo at a time per reader (onnxruntime sessions are shared,
    a lock keeps calls apart), `threads` onnxruntime threads for each.

    What one read costs is bounded whatever the photo shows: it is scaled to at most MAX_SIDE pixels a side,
    only the largest text boxes are recognised (MAX_BOXES, READ_HEIGHTS; in reading order), and recognition
    runs in batches of REC_BATCH boxes with the deadline (if any) checked between them. The steps are
    rapidocr's own (its detector, cropper and recogniser); the budget and the deadline, which its one-call API
    lacks, are added between them."""

    def __init__(self, threads: int = 1, *, max_side: int = MAX_SIDE, max_boxes: int = MAX_BOXES) -> None:
        self._threads = threads
        self.max_side = max_side
        self.max_boxes = max_boxes
        self._engine: Any = None
        self._lock = threading.Lock()

    def _load(self) -> Any:
        if self._engine is None:
            from rapidocr_onnxruntime import RapidOCR  # onnxruntime and the models load only when used

            self._engine = RapidOCR(
                use_cls=False,
                det_limit_side_len=DETECT_SIDE,
                text_score=MIN_LINE_SCORE,
                intra_op_num_threads=self._threads,
                inter_op_num_threads=1,
            )
        return self._engine

    def _budgeted(self, crops: list[Any], boxes: list[Any]) -> list[Any]:
        """The crops to recognise, in reading order: the largest boxes first until MAX_BOXES boxes or
        READ_HEIGHTS line heights, each cut to MAX_LINE_HEIGHTS heights."""
        kept: list[int] = []
        spent = 0.0
        for i in sorted(range(len(boxes)), key=lambda i: -_area(boxes[i])):
            height, width = crops[i].shape[:2]
            cost = min(width / max(height, 1), MAX_LINE_HEIGHTS)
            if len(kept) == self.max_boxes or spent + cost > READ_HEIGHTS:
                break
            kept.append(i)
            spent += cost
        return [crops[i][:, : max(1, crops[i].shape[0]) * MAX_LINE_HEIGHTS] for i in sorted(kept)]

    def lines(self, image: Image.Image, *, deadline: float | None = None) -> list[Line]:
        """The lines read, in reading order. `deadline` (a `time.monotonic()` value): ReadTimeout once it has
        passed, checked before detection and between recognition batches."""
        with self._lock:
            if deadline is not None and time.monotonic() > deadline:
                raise ReadTimeout("the photo's text was not read in time")
            engine = self._load()
            picture, _, _ = engine.preprocess(engine.load_img(_scaled(image, self.max_side)))
            picture, _ = engine.maybe_add_letterbox(picture, {})
            boxes, _ = engine.auto_text_det(picture)
            if not boxes:
                return []
            crops = self._budgeted(engine.get_crop_img_list(picture, boxes), boxes)
            found: list[Line] = []
            for start in range(0, len(crops), REC_BATCH):
                if deadline is not None and time.monotonic() > deadline:
                    raise ReadTimeout(f"the photo's text was not read in time ({start} of {len(crops)} boxes)")
                recognised, _ = engine.text_rec(crops[start : start + REC_BATCH])
                found += [Line(str(hit[0]), float(hit[1])) for hit in recognised]
        return [line for line in found if line.score >= MIN_LINE_SCORE and line.text]

    def read(self, image: Image.Image, *, deadline: float | None = None) -> str:
        """The text of a photo, line by line (`deadline`: as for `lines`)."""
        return "\n".join(line.text for line in self.lines(image, deadline=deadline))
