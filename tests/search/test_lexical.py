"""The lexical signal: tokens for words and codes, GTINs as the strongest evidence, the layout guard."""

from __future__ import annotations

from pathlib import Path

import pytest
from qdrant_client import QdrantClient, models

from ingest.pipeline import Ingestor
from retrieval.lexical import (
    clean,
    code_core,
    codes_conflict,
    document_vector,
    identifiers,
    query_terms,
    term_index,
    tokens,
)
from retrieval.search import SearchEngine
from retrieval.settings import Settings
from retrieval.store import EncoderFingerprint, ProductStore, StoreError
from schemas.catalogue import CatalogueRecord
from schemas.search import SearchOptions
from tests.conftest import sample_rows, write_catalogue


def test_tokens_keep_codes_whole_joined_and_split() -> None:
    assert tokens("Sony DSC-W120P, 7.2 MP") == [
        "sony",
        "dsc-w120p",
        "dscw120p",
        "dsc",
        "w120p",
        "7.2",
        "72",
        "7",
        "2",
        "mp",
    ]
    assert tokens("Äpple Juice for the kids") == ["apple", "juice", "kids"]
    assert list(query_terms("oat milk 7310865004703")) == [
        "oat",
        "milk",
        "7310865004703",
        "gtin:07310865004703",
        "#code:7310865004703",
    ]


def test_document_weights_saturate_and_identifiers_weigh_more() -> None:
    record = CatalogueRecord.from_row(
        {"id": "1", "retailer": "r", "title": "milk milk milk", "mpn": "AB-12", "gtin": "7310865004703"}, line=2
    )
    assert record.gtin == "07310865004703"
    vector = document_vector(record)
    assert vector is not None
    weights = dict(zip(vector.indices, vector.values, strict=True))
    assert weights[term_index("milk")] < 3  # three occurrences, saturated below 3x one occurrence
    assert weights[term_index("gtin:07310865004703")] > weights[term_index("ab-12")] > weights[term_index("milk")] / 3


def test_cleaning_drops_shop_debris_and_writes_each_size_one_way() -> None:
    assert clean('"iMac 27"" | macofalltrades"@en') == "imac 27in | macofalltrades"
    assert clean("Sony Bravia 40&quot; &lt;b&gt;LCD&lt;/b&gt; TV (R)") == "sony bravia 40in lcd tv"
    assert clean("27-inch") == clean('27"') == clean("27 in.") == "27in"
    assert clean("1000 ml") == clean("1 L") == clean("1 litre") == "1l"
    assert clean("1,150 Watts, 2 TB") == "1150w , 2000gb"  # a size is a word of its own
    assert clean("D-Link DCS-5030L") == "d-link dcs-5030l"  # a code's digits and letter are not a size


def test_identifiers_are_joined_and_sizes_are_not_codes() -> None:
    assert identifiers(clean("Panasonic KX-TG6313S DECT 6.0, 500GB, 720p, v2.1")) == ["kxtg6313s"]
    assert identifiers(clean("Garmin 010-00715-20 and dvd-1080p8/b")) == ["0100071520", "dvd1080p8b"]
    assert code_core("kxtg6313s") == "kxtg6313" and code_core("ysp3050bk") == "ysp3050"
    assert code_core("kdl40") is None  # the code is its own core


def test_sibling_codes_conflict_and_other_families_do_not() -> None:
    alpina = set(identifiers(clean("Alpina Pilot Quartz Chronograph Watch AL-372N4FBS6")))
    assert codes_conflict(alpina, identifiers(clean("Alpina Pilot Chronograph AL-372B4FBS6")))
    assert not codes_conflict(alpina, identifiers(clean("Alpina AL-372N4FBS6 watch")))
    assert not codes_conflict({"kxtg6313s"}, {"kxtg6313b"})  # the same core: a colour or region suffix
    assert not codes_conflict({"kxtg6313s"}, {"dmcfx37"})  # another product line altogether
    assert not codes_conflict({"kxtg6313s"}, set())


def test_code_terms_outweigh_words_without_lengthening_the_document() -> None:
    def weights(title: str) -> dict[int, float]:
        vector = document_vector(CatalogueRecord.from_row({"id": "1", "retailer": "r", "title": title}, line=2))
        assert vector is not None
        return dict(zip(vector.indices, vector.values, strict=True))

    plain, coded = weights("panasonic cordless phone"), weights("panasonic cordless phone KX-TG6313S")
    code, core = coded[term_index("#code:kxtg6313s")], coded[term_index("#core:kxtg6313")]
    assert code > core > coded[term_index("panasonic")]
    # BM25 over the 7 word tokens (panasonic, cordless, phone, kx-tg6313s, kxtg6313s, kx, tg6313s): the two
    # code terms do not lengthen the document
    assert coded[term_index("panasonic")] == pytest.approx(2.2 / (1 + 1.2 * (0.25 + 0.75 * 7 / 12)))
    assert plain[term_index("panasonic")] > coded[term_index("panasonic")]
    assert query_terms("KX-TG6313S phone")["#code:kxtg6313s"] == 3.0


def test_bad_gtin_is_rejected() -> None:
    with pytest.raises(ValueError, match="gtin must be 8, 12, 13 or 14 digits"):
        CatalogueRecord.from_row({"id": "1", "retailer": "r", "title": "t", "gtin": "12345"}, line=2)


def test_an_identical_gtin_finds_the_product_among_lookalikes(
    tmp_path: Path, ingestor: Ingestor, store: ProductStore, catalogue_name: str
) -> None:
    rows = [r for r in sample_rows(50) if r["brand"] == "Arla"]  # near-identical Arla cartons
    assert len(rows) >= 6
    for i, row in enumerate(rows):
        row["gtin"] = f"731086500{i:04d}"
    ingestor.run(write_catalogue(tmp_path / "feed", rows), catalogue_name, progress=False)
    engine = SearchEngine(store, ingestor.image_encoder, ingestor.text_encoder)
    target = rows[3]
    response = engine.search(catalogue_name, text=f"arla milk {target['gtin']}", options=SearchOptions(limit=3))
    assert response.results[0].id == target["id"]
    assert response.results[0].product.gtin == target["gtin"].zfill(14)
    dense_only = engine.search(
        catalogue_name, text=f"arla milk {target['gtin']}", options=SearchOptions(limit=3, lexical=False)
    )
    assert dense_only.modes == ["text"]


def test_a_collection_of_an_older_layout_is_refused_with_what_to_do(tmp_path: Path) -> None:
    # Layout 1 existed only in qdrant-client's local mode: an old folder written by the client directly.
    old = EncoderFingerprint("timm:x/y", 4, "sentence-transformers:z", 3).as_metadata() | {"layout_version": 1}
    writer = QdrantClient(path=str(tmp_path / "old-store"))
    writer.create_collection(
        "old", vectors_config={"text": models.VectorParams(size=3, distance=models.Distance.COSINE)}, metadata=old
    )
    writer.close()
    store = ProductStore.open(Settings(qdrant_path=tmp_path / "old-store"))
    with pytest.raises(StoreError, match="layout 1, this version needs 4: ingest the catalogue again"):
        store.fingerprint("old")
    store.close()
