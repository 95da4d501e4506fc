"""`python -m bench.ocr_side [SIDE ...]`: the size the text detector sees a photo at (retrieval/ocr.py
DETECT_SIDE, the shorter side scaled up to at least this many pixels) against what package reading buys.

For each side, side by side in one run: milliseconds to read one of 60 packaged grocery val photos (one thread,
as a query's read runs), the words read, and grocery val's photo-query recall@1 (the photo's embedding and
its read text, `photo` rows of `bench quality`) over all 296 photos and the packaged ones, the catalogue
(grocery val's 81 products) ingested with OCR on at the same side."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from PIL import Image

from bench.evalset import load_set
from bench.quality import ingested, recall_at, run_set
from retrieval import ocr
from retrieval.encoders import load_image_encoder, load_text_encoder
from retrieval.settings import Settings

SETS = Path(__file__).resolve().parent / "out" / "sets"
SIDES = (736, 544, 416)


def read_cost(evalset_dir: Path) -> tuple[float, int]:
    evalset = load_set(evalset_dir)
    paths = [evalset.image_path(q) for q in evalset.queries if q.group == "packaged"][::2][:60]
    photos = []
    for path in paths:
        if path is not None:
            with Image.open(path) as opened:
                photos.append(opened.convert("RGB"))
    reader = ocr.TextReader()
    reader.read(photos[0])  # the models load
    started = time.perf_counter()
    texts = [reader.read(photo) for photo in photos]
    seconds = (time.perf_counter() - started) / len(photos)
    return seconds * 1000, sum(len(ocr.words(text)) for text in texts)


def main(argv: list[str]) -> int:
    sides = [int(a) for a in argv] or list(SIDES)
    folder = SETS / "grocery-val"
    if not (folder / "queries.jsonl").is_file():
        raise SystemExit(f"{folder} is missing: run `python -m bench prepare` first")
    settings = Settings(ocr="on")
    image_encoder = load_image_encoder(settings.image_model, settings.image_precision)
    text_encoder = load_text_encoder(settings.text_model, settings.text_precision)
    print("| detector side | read ms (packaged photo) | words read (60 photos) | photo R@1 all | photo R@1 packaged |")
    print("| --- | --- | --- | --- | --- |")
    for side in sides:
        ocr.DETECT_SIDE = side  # every reader made from here on loads its detector at this side
        ms, words = read_cost(folder)
        evalset = load_set(folder)
        with ingested(evalset, image_encoder, text_encoder, settings=settings) as (engine, _):
            tallies = run_set(evalset, engine, evalset.name, only=("photo",), filtered_rows=False)
        every = recall_at(tallies, "photo")
        packaged = next(t.recall(1) for k, t in tallies.items() if k.group == "packaged" and not k.filtered)
        print(f"| {side} | {ms:.0f} | {words} | {every:.3f} | {packaged:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
