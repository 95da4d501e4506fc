"""The sample's photo guard: grocery val's in-store phone photos find the web shop's product, image only, through
the whole pipeline. On the default engine only: the engines' parity is tests/store/test_edge_backend.py's, and
the search suite (tests/search/test_search.py) runs on both."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

from PIL import Image

from bench.crops_skip import Counting
from retrieval.encoders import load_image_encoder
from retrieval.encoders.onnx_backbone import OnnxImageEncoder
from retrieval.search import SearchEngine
from retrieval.search.engine import DECISIVE_MARGIN
from retrieval.settings import DEFAULT_IMAGE_MODEL
from schemas.search import SearchOptions
from tests.conftest import GROCERY, SAMPLE

MIN_R1, MIN_R5 = 0.40, 0.72  # measured 0.422 and 0.747 (296 photos; the photo and its centre crops)


def sample_products() -> list[dict[str, str]]:
    with SAMPLE.open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_in_store_photos_find_their_shop_product_as_measured(engine: SearchEngine) -> None:
    """Grocery val: in-store phone photo -> the shop's web photo, image only, through the whole pipeline.

    A broken preprocessing, a wrong weight mapping, a lost vector or lost query crops falls below the guards
    (DESIGN.md measured the whole photo alone at R@1 0.39, R@5 0.71).
    """
    ids = {row["title"].replace(" ", "-"): row["id"] for row in sample_products()}
    lines = (GROCERY / "val.txt").read_text().splitlines()
    at1 = at5 = 0
    for line in lines:
        photo = line.split(",")[0].strip()
        expected = ids[Path(photo).parent.name]
        with Image.open(GROCERY / photo) as image:
            found = [
                r.id
                for r in engine.search("grocery", image=image.convert("RGB"), options=SearchOptions(limit=5)).results
            ]
        at1 += found[0] == expected
        at5 += expected in found
    recall1, recall5 = at1 / len(lines), at5 / len(lines)
    print(f"\ngrocery val, in-store photo -> web photo: R@1 {recall1:.3f}, R@5 {recall5:.3f}")
    assert recall1 >= MIN_R1, recall1
    assert recall5 >= MIN_R5, recall5


def test_a_photo_that_already_answers_skips_its_crops(engine: SearchEngine) -> None:
    """A catalogue's own web photo (exactly the decisive case: its product's photo at cosine 1) costs one forward;
    a shopper's photo whose best two products are close costs the whole photo and both crops, and searches as
    it does without the check (the same vector). The check is off by default (QUERY_CROPS_MARGIN 0)."""
    engine = replace(engine, crops_margin=DECISIVE_MARGIN)
    own = sorted((SAMPLE.parent / "images").glob("*.jpg"))[0]
    with Image.open(own) as opened:
        photo = opened.convert("RGB")
    counting = Counting(engine)
    engine.search("grocery", image=photo, embedder=counting)
    assert counting.views == 1
    views: dict[str, int] = {}
    for path in sorted((SAMPLE.parent / "queries").glob("*.jpg")):
        with Image.open(path) as opened:
            query = opened.convert("RGB")
        counting = Counting(engine)
        found = engine.search("grocery", image=query, embedder=counting, options=SearchOptions(limit=5))
        views[path.name] = counting.views
        if counting.views > 1:  # doubtful: the crops were embedded, as with the check off
            always = replace(engine, crops_margin=0.0)
            assert found.results == always.search("grocery", image=query, options=SearchOptions(limit=5)).results
    assert views == dict.fromkeys(views, 1 + len(engine.query_crops)), views  # all four are close calls


def test_the_services_onnx_runtime_finds_what_torch_finds(engine: SearchEngine, tmp_path: Path) -> None:
    """The service runs the image backbone on ONNX Runtime (INFERENCE=auto, `serving`) against catalogues that
    ingest embedded with torch: on every fourth grocery val photo (74, the photo and its crops), its first
    product is torch's for all but at most two photos (measured: one), and recall@1 moves by at most one photo
    (measured: none)."""
    served = load_image_encoder(DEFAULT_IMAGE_MODEL, inference="auto", onnx_cache=tmp_path, serving=True)
    assert isinstance(served, OnnxImageEncoder)
    on_onnx = replace(engine, image_encoder=served)
    # torch as ingest runs it (bf16 where the CPU has it), named explicitly: on a CPU without bf16 the session's
    # encoder is ONNX Runtime too, and the comparison would be with itself
    engine = replace(engine, image_encoder=load_image_encoder(DEFAULT_IMAGE_MODEL, inference="torch"))
    ids = {row["title"].replace(" ", "-"): row["id"] for row in sample_products()}
    lines = (GROCERY / "val.txt").read_text().splitlines()[::4]
    hits = {"torch": 0, "onnx": 0}
    differ = 0
    for line in lines:
        photo = line.split(",")[0].strip()
        with Image.open(GROCERY / photo) as image:
            query = image.convert("RGB")
        first = {
            name: e.search("grocery", image=query, options=SearchOptions(limit=1)).results[0].id
            for name, e in (("torch", engine), ("onnx", on_onnx))
        }
        differ += first["torch"] != first["onnx"]
        for name, found in first.items():
            hits[name] += found == ids[Path(photo).parent.name]
    print(f"\n74 grocery val photos: R@1 torch {hits['torch']}, onnx {hits['onnx']}; first products differ on {differ}")
    assert len(lines) == 74 and differ <= 2, differ
    assert abs(hits["torch"] - hits["onnx"]) <= 1, hits
