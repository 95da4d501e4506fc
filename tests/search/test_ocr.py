"""Text on the package: OCR of real photos at ingest and at query time, the `ocr` ranking, OCR=auto's
decision, and that a photo is read once. The rest of the suite runs with OCR=off (conftest): reading costs
a fraction of a second a photo, so only these tests pay it."""

from __future__ import annotations

import csv
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bench.hostile import text_wall
from ingest.pipeline import Ingestor
from retrieval.encoders import ImageEncoder, TextEncoder
from retrieval.ocr import (
    MAX_BOXES,
    MAX_LINE_HEIGHTS,
    MIN_READ_CHARACTERS,
    READ_HEIGHTS,
    ReadTimeout,
    TextReader,
    matched_words,
    query_vector,
    readable_characters,
    trigrams,
    words,
)
from retrieval.search import SearchEngine
from retrieval.search.engine import QUERY_CROPS
from retrieval.settings import Settings
from retrieval.store import OCR_VECTOR, ProductStore
from schemas.search import SearchOptions
from tests.conftest import GROCERY, SAMPLE, sample_rows, write_catalogue

OATLY_QUERY = SAMPLE.parent / "queries" / "Oatly-Natural-Oatghurt_001.jpg"


class CountingReader(TextReader):
    """The real OCR, counting the photos it reads."""

    def __init__(self) -> None:
        super().__init__()
        self.photos = 0

    def read(self, image: Image.Image, *, deadline: float | None = None) -> str:
        self.photos += 1
        return super().read(image, deadline=deadline)


def test_words_and_trigrams_survive_accents_and_stray_glyphs() -> None:
    assert words("GARANT EKOLOGISK MJÖLK 1,5% 福") == ["garant", "ekologisk", "mjolk"]
    assert trigrams("oat") == ["#oa", "oat", "at#"]
    assert readable_characters("1 福 ok") == 2
    assert query_vector("OATLY") is None  # too little text to search with: an apple's sticker
    vector = query_vector("OATLY HAVRE DRYCK")
    assert vector is not None and len(vector.indices) == len(set(vector.indices)) >= 3 * MIN_READ_CHARACTERS // 2
    assert matched_words("OATLY HAVRE DRYCK", ["Oatly Oat Drink", "havre"]) == ["oatly", "havre"]


def test_the_setting_and_the_engine_agree_on_the_default_crops() -> None:
    assert Settings().query_crop_shares == QUERY_CROPS == (0.8, 0.6)
    assert Settings(query_crops="").query_crop_shares == ()


def test_a_package_photo_is_read() -> None:
    read = TextReader().read(Image.open(OATLY_QUERY))
    assert readable_characters(read) >= MIN_READ_CHARACTERS
    assert "original" in words(read)  # "THE ORIGINAL", printed on the Oatly pack


def _settings(tmp_path: Path, ocr: str) -> Settings:
    return Settings(qdrant_path=tmp_path / "store", ocr=ocr)


def test_auto_reads_packages_once_and_keeps_the_decision(
    tmp_path: Path, image_encoder: ImageEncoder, text_encoder: TextEncoder
) -> None:
    rows = [r for r in sample_rows(81) if r["category"].startswith("Packages")][:12]
    feed = write_catalogue(tmp_path / "feed", rows)
    settings = _settings(tmp_path, "auto")
    with ProductStore.open(settings) as store:
        ingestor = Ingestor(settings, store, image_encoder, text_encoder)
        ingestor.reader = reader = CountingReader()
        report = ingestor.run(feed, "packs", progress=False)
        assert report.new == len(rows)
        assert store.info("packs").reads_text is True
        assert store.metadata("packs")["ocr"]["on"] is True
        read_once = reader.photos
        assert read_once <= 8 + len(rows)  # the sample that decided, then each photo once
        points = list(store.points("packs", with_vectors=[OCR_VECTOR]))
        texts = [p.payload["image_text"] for p in points if p.payload]
        assert sum(readable_characters(" ".join(t)) >= MIN_READ_CHARACTERS for t in texts) >= len(rows) // 3
        assert all(isinstance(p.vector, dict) and OCR_VECTOR in p.vector for p in points)
        again = ingestor.run(feed, "packs", progress=False)  # unchanged: nothing is read again
        assert again.unchanged == len(rows) and reader.photos == read_once


def test_auto_leaves_fruit_unread(tmp_path: Path, image_encoder: ImageEncoder, text_encoder: TextEncoder) -> None:
    rows = [r for r in sample_rows(81) if r["category"].startswith("Fruit")][:10]
    settings = _settings(tmp_path, "auto")
    with ProductStore.open(settings) as store:
        ingestor = Ingestor(settings, store, image_encoder, text_encoder)
        ingestor.run(write_catalogue(tmp_path / "feed", rows), "fruit", progress=False)
        assert store.info("fruit").reads_text is False
        assert all(not p.payload["image_text"] for p in store.points("fruit") if p.payload)


def test_switching_reading_on_rebuilds_the_catalogue_without_embedding_again(
    tmp_path: Path, image_encoder: ImageEncoder, text_encoder: TextEncoder
) -> None:
    rows = [r for r in sample_rows(81) if r["category"].startswith("Packages")][:6]
    feed = write_catalogue(tmp_path / "feed", rows)
    with ProductStore.open(_settings(tmp_path, "off")) as store:
        first = Ingestor(_settings(tmp_path, "off"), store, image_encoder, text_encoder).run(feed, "c", progress=False)
        assert first.images_embedded == len(rows) and store.info("c").reads_text is False
        ingestor = Ingestor(_settings(tmp_path, "on"), store, image_encoder, text_encoder)
        ingestor.reader = reader = CountingReader()
        again = ingestor.run(feed, "c", progress=False)
        assert again.updated == len(rows) and again.images_embedded == 0  # photo vectors reused by hash
        assert reader.photos == len(rows) and store.info("c").reads_text is True
        assert all(len(p.payload["image_text"]) == 1 for p in store.points("c") if p.payload)


@pytest.fixture(scope="module")
def read_catalogue(
    tmp_path_factory: pytest.TempPathFactory, image_encoder: ImageEncoder, text_encoder: TextEncoder
) -> SearchEngine:
    folder = tmp_path_factory.mktemp("read")
    settings = _settings(folder, "on")
    store = ProductStore.open(settings)
    Ingestor(settings, store, image_encoder, text_encoder).run(SAMPLE, "grocery", progress=False)
    return SearchEngine(store, image_encoder, text_encoder)


def test_a_photo_query_reads_the_pack_and_explains_the_match(read_catalogue: SearchEngine) -> None:
    response = read_catalogue.search("grocery", image=Image.open(OATLY_QUERY), options=SearchOptions(limit=5))
    assert response.read and "ocr" in response.modes and "image" in response.modes
    titles = [r.product.title for r in response.results]
    assert "Oatly Natural Oatghurt" in titles[:2], titles  # behind its sibling, the oat drink of the same pack
    found = response.results[titles.index("Oatly Natural Oatghurt")]
    assert found.scores.ocr is not None and found.scores.ocr > 0 and found.ranks.ocr is not None
    assert found.read_words  # the words of the query photo this product's title or pack also has


def test_a_photo_without_text_searches_by_its_look_alone(read_catalogue: SearchEngine) -> None:
    apple = SAMPLE.parent / "queries" / "Granny-Smith_001.jpg"
    response = read_catalogue.search("grocery", image=Image.open(apple), options=SearchOptions(limit=3))
    assert response.modes == ["image"] and all(r.scores.ocr is None for r in response.results)


def _packaged_val_photos(limit: int) -> list[tuple[Path, str]]:
    """In-store photos of packaged products (grocery val), with their product's class name."""
    names = {row["Class ID (int)"]: row["Class Name (str)"] for row in csv.DictReader((GROCERY / "classes.csv").open())}
    out = []
    for line in (GROCERY / "val.txt").read_text().splitlines():
        path, class_id, *_ = (part.strip() for part in line.split(","))
        if "/Packages/" in path:
            out.append((GROCERY / path, names[class_id]))
    return out[:: max(1, len(out) // limit)][:limit]


def test_reading_the_pack_finds_more_packaged_products_first(read_catalogue: SearchEngine) -> None:
    """Quality guard on a real slice: 25 in-store photos of packaged products (grocery val), photo only."""
    titles = {p.payload["product_id"]: p.payload["title"] for p in read_catalogue.store.points("grocery") if p.payload}
    assert titles
    looked, read = 0, 0
    for path, name in _packaged_val_photos(25):
        photo = Image.open(path).convert("RGB")
        with_text = read_catalogue.search("grocery", image=photo, options=SearchOptions(limit=1)).results[0]
        vectors = read_catalogue.encode_query(photo, None)
        alone = read_catalogue.search_vectors("grocery", vectors, options=SearchOptions(limit=1)).results[0]
        wanted = name.replace("-", " ").lower()
        read += with_text.product.title is not None and with_text.product.title.lower() == wanted
        looked += alone.product.title is not None and alone.product.title.lower() == wanted
    assert read >= 13 and read >= looked + 2, (read, looked)  # measured 15 of 25 first, against 12 by look alone


class BudgetReader(TextReader):
    """The real OCR, keeping the widths (in line heights) of the boxes it was asked to recognise."""

    def __init__(self) -> None:
        super().__init__()
        self.heights: list[float] = []

    def _budgeted(self, crops: list[Any], boxes: list[Any]) -> list[Any]:
        kept = super()._budgeted(crops, boxes)
        self.heights = [crop.shape[1] / crop.shape[0] for crop in kept]
        self.detected = len(boxes)
        return kept


def test_a_photo_full_of_print_is_read_within_a_budget() -> None:
    reader = BudgetReader()
    lines = reader.lines(text_wall())
    assert reader.detected > len(reader.heights)  # more print than the budget: the largest boxes only
    assert 0 < len(reader.heights) <= MAX_BOXES and max(reader.heights) <= MAX_LINE_HEIGHTS + 1
    assert sum(reader.heights) <= READ_HEIGHTS + MAX_LINE_HEIGHTS
    assert lines and any("milk" in words(line.text) for line in lines)  # what was read is real text
    with pytest.raises(ReadTimeout):
        reader.read(text_wall(), deadline=time.monotonic() + 0.05)


def test_a_read_past_its_deadline_answers_without_the_ocr_ranking(read_catalogue: SearchEngine) -> None:
    hurried = replace(read_catalogue, read_deadline_s=1e-6)
    response = hurried.search("grocery", image=Image.open(OATLY_QUERY), options=SearchOptions(limit=3))
    assert "ocr" not in response.modes and response.results and response.read is None
    assert response.warnings and "OCR_DEADLINE_S" in response.warnings[0]
    assert not read_catalogue.search("grocery", image=Image.open(OATLY_QUERY)).warnings
