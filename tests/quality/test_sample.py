"""What `make run` shows a newcomer, guarded: the bundled sample's two shops in one catalogue, its query photos
(in-store photos neither shop lists) finding their product, and the same product found in the other shop and
decided by the default match model without a single label."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from PIL import Image

from ingest.pipeline import Ingestor
from retrieval.encoders import ImageEncoder, TextEncoder
from retrieval.match.model import active_model, find_matches
from retrieval.match.review import review_queue
from retrieval.search import SearchEngine
from retrieval.settings import Settings
from retrieval.store import ProductStore
from schemas.search import SearchOptions
from tests.conftest import SAMPLE

SHELF = SAMPLE.parent / "corner-store.csv"


@pytest.fixture(scope="module")
def both_shops(
    tmp_path_factory: pytest.TempPathFactory, image_encoder: ImageEncoder, text_encoder: TextEncoder
) -> Iterator[SearchEngine]:
    settings = Settings(qdrant_path=tmp_path_factory.mktemp("sample") / "store", ocr="off")
    with ProductStore.open(settings) as store:
        for feed in (SAMPLE, SHELF):  # as `make run` does
            report = Ingestor(settings, store, image_encoder, text_encoder).run(feed, "grocery", progress=False)
            assert (report.new, report.rejected_count, report.skipped_count) == (81, 0, 0)
        yield SearchEngine(store, image_encoder, text_encoder)


def _class(product_id: str) -> str:
    return product_id.removeprefix("c-")


def test_three_of_the_four_query_photos_find_their_product_first(both_shops: SearchEngine) -> None:
    ids = {row_title: row_id for row_id, row_title in _titles(both_shops).items()}
    found = {}
    for photo in sorted((SAMPLE.parent / "queries").glob("*.jpg")):
        wanted = ids[photo.stem.rsplit("_", 1)[0].replace("-", " ")]
        first = both_shops.search("grocery", image=Image.open(photo), options=SearchOptions(limit=3)).results
        classes = [_class(r.id) for r in first]  # either shop's listing of the product counts
        found[photo.stem] = classes.index(wanted) if wanted in classes else None
    print(f"\nquery photos, rank of their product: {found}")  # `pytest -s`: the figures docs/BENCHMARKS.md quotes
    # measured: all four first here (OCR off); with OCR=auto, as `make run` serves it, the Oatghurt comes third
    assert sum(rank == 0 for rank in found.values()) >= 3, found
    assert all(rank is not None for rank in found.values()), found


def _titles(engine: SearchEngine) -> dict[str, str]:
    return {
        str(p.payload["product_id"]): str(p.payload["title"])
        for p in engine.store.points("grocery", with_payload=["product_id", "title", "retailer"])
        if p.payload and p.payload["retailer"] == "hemkop"
    }


def test_the_other_shop_holds_the_same_product_and_the_default_model_decides(both_shops: SearchEngine) -> None:
    active = active_model(both_shops.store, "grocery")
    assert active.name == "default" and active.calibration is not None
    first_right, decided, decided_right = 0, 0, 0
    for product_id in _titles(both_shops):
        _, matches = find_matches(both_shops, "grocery", "hemkop", product_id, calibration=active.calibration, limit=3)
        right = matches[0].id == f"c-{product_id}"
        first_right += right
        decided += sum(m.decision == "match" for m in matches)
        decided_right += right and matches[0].decision == "match"
    print(f"\nother shop's listing first: {first_right} of 81; decided match: {decided}, right: {decided_right}")
    assert first_right >= 79, first_right  # measured 81 of 81 (78 before the reverse rank)
    assert decided_right >= 78 and decided_right == decided, (decided_right, decided)  # measured 81, none wrong


def test_the_review_tab_has_pairs_to_ask_from_the_first_start(both_shops: SearchEngine) -> None:
    """The Review tab's queue on the bundled sample as `make run` serves it: pairs of the web shop's products and
    the corner store's listings, each with why it is asked, the model that chose them the default one."""
    active, pairs = review_queue(both_shops, "grocery", "hemkop", against=["corner-store"], limit=10)
    assert active.name == "default" and len(pairs) == 10
    assert len({p.left.id for p in pairs}) == 10  # one pair per product
    assert all(p.right is not None and p.right.retailer == "corner-store" and p.why for p in pairs)
