"""Fusion modes, more filters, paging, the JSON API, and a product's matches in other shops."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from retrieval.search import SearchEngine
from schemas.search import SearchFilters, SearchOptions, SearchResult
from tests.conftest import SAMPLE, sample_rows

PHOTO = SAMPLE.parent / "images" / "Arla-Standard-Milk_Iconic.jpg"


def query_photo() -> Image.Image:
    with Image.open(SAMPLE.parent / "queries" / "Oatly-Natural-Oatghurt_001.jpg") as image:
        return image.convert("RGB")


def test_weighted_fusion_with_one_weight_zero_follows_that_modality(engine: SearchEngine) -> None:
    photo = query_photo()
    image_only = [r.id for r in engine.search("grocery", image=photo, options=SearchOptions(limit=8)).results]
    dense = SearchOptions(limit=8, lexical=False)
    text_only = [r.id for r in engine.search("grocery", text="oat yoghurt", options=dense).results]
    assert image_only != text_only

    def fused(image_weight: float, text_weight: float) -> list[str]:
        options = SearchOptions(
            fusion="weighted", image_weight=image_weight, text_weight=text_weight, lexical_weight=0, limit=8
        )
        response = engine.search("grocery", image=photo, text="oat yoghurt", options=options)
        assert response.fusion == "weighted"
        return [r.id for r in response.results]

    assert fused(1.0, 0.0) == image_only
    assert fused(0.0, 1.0) == text_only
    dbsf = engine.search("grocery", image=photo, text="oat yoghurt", options=SearchOptions(fusion="dbsf", limit=8))
    assert dbsf.fusion == "dbsf" and len(dbsf.results) == 8


def test_offset_pages_and_score_threshold_cuts(engine: SearchEngine) -> None:
    whole = engine.search("grocery", text="juice", options=SearchOptions(limit=10)).results
    second = engine.search("grocery", text="juice", options=SearchOptions(limit=5, offset=5)).results

    def by_score(results: list[SearchResult]) -> list[tuple[float, str]]:  # products tied on score: any order
        return sorted((-round(r.score, 6), r.id) for r in results)

    assert by_score(second) == by_score(whole[5:]) and len(second) == 5
    cut = engine.search("grocery", text="juice", options=SearchOptions(limit=100, score_threshold=0.4)).results
    assert cut and all(r.score >= 0.4 for r in cut) and len(cut) < 81


def test_brand_and_price_filters(engine: SearchEngine, two_shops: str) -> None:
    arla = engine.search("grocery", text="milk", filters=SearchFilters(brand=["Arla"]), options=SearchOptions(limit=50))
    assert arla.results and {r.product.brand for r in arla.results} == {"Arla"}
    priced = engine.search(
        two_shops, text="fruit", filters=SearchFilters(price_min=12, price_max=14), options=SearchOptions(limit=50)
    )
    prices = sorted(r.product.price for r in priced.results if r.product.price is not None)
    assert prices == [12.0, 12.5, 13.0, 13.5, 14.0]


def test_free_payload_conditions_in_the_json_body(client: TestClient) -> None:
    def ids(where: list[dict[str, Any]]) -> list[dict[str, Any]]:
        body = {"catalogue": "grocery", "text": "juice", "filters": {"where": where}, "options": {"limit": 100}}
        response = client.post("/search/json", json=body)
        assert response.status_code == 200, response.text
        return [r["product"] for r in response.json()["results"]]

    litre = ids([{"key": "attributes.volume", "match": "1l"}])
    assert len(litre) == 21 and {p["attributes"]["volume"] for p in litre} == {"1l"}
    sizes = ids([{"key": "attributes.volume", "any": ["2l", "3dl"]}])
    assert sorted(p["attributes"]["volume"] for p in sizes) == ["2l", "2l", "3dl", "3dl"]
    not_arla = ids([{"key": "attributes.volume", "match": "1l"}, {"key": "brand", "match": "Arla", "negate": True}])
    assert len(not_arla) == 14 and all(p["brand"] != "Arla" for p in not_arla)
    excepted = ids([{"key": "attributes.volume", "except": ["1l", "1kg"]}])
    assert {p["attributes"].get("volume") for p in excepted} == {"2l", "3dl", "750g"}


def test_product_and_its_matches_in_other_shops(client: TestClient, two_shops: str) -> None:
    rows = sample_rows(30)
    product = client.get(f"/catalogues/{two_shops}/products/hemkop/{rows[7]['id']}").json()
    assert product["title"] == rows[7]["title"] and product["price"] == 17.0
    body = client.get(f"/catalogues/{two_shops}/products/hemkop/{rows[7]['id']}/matches", params={"limit": 3}).json()
    assert body["calibrated"] is False and body["product"]["id"] == rows[7]["id"]
    first = body["matches"][0]
    assert (first["id"], first["retailer"]) == (f"o-{rows[7]['id']}", "other-shop")
    # another shop's listing, not a copy: a shelf photo against a web photo, a kind-first title
    assert 0.2 < first["scores"]["image"] < 0.9 and 0.6 < first["scores"]["text"] < 0.99
    assert {m["retailer"] for m in body["matches"]} == {"other-shop"}
    assert body["model"] == "default" and first["decision"] == "match"  # no labels: the default model decides
    missing = client.get(f"/catalogues/{two_shops}/products/hemkop/nope/matches")
    assert missing.status_code == 404 and "no product 'nope'" in missing.json()["detail"]


def test_json_api_accepts_base64_photos_and_stored_products(client: TestClient, two_shops: str) -> None:
    photo = base64.b64encode(PHOTO.read_bytes()).decode()
    body = client.post("/search/json", json={"catalogue": "grocery", "image_base64": photo, "options": {"limit": 3}})
    assert body.status_code == 200, body.text
    assert body.json()["results"][0]["product"]["title"] == "Arla Standard Milk"
    by_ref = client.post(
        "/search/json",
        json={
            "catalogue": two_shops,
            "product": {"retailer": "hemkop", "id": "3"},
            "filters": {"exclude_retailer": ["hemkop"]},
            "options": {"fusion": "weighted", "image_weight": 2, "text_weight": 1, "limit": 2},
        },
    ).json()
    assert by_ref["fusion"] == "weighted" and by_ref["results"][0]["id"] == "o-3"
    itself = client.post("/search/json", json={"catalogue": two_shops, "product": {"retailer": "hemkop", "id": "3"}})
    assert "3" not in [r["id"] for r in itself.json()["results"] if r["retailer"] == "hemkop"]


@pytest.mark.parametrize(
    ("path", "payload", "status", "message"),
    [
        ("/search/json", {"text": "milk", "image_base64": "not base64!"}, 422, "not valid base64"),
        ("/search/json", {"text": "milk", "product": {"retailer": "hemkop", "id": "1"}}, 422, "not both"),
        ("/search/json", {}, 422, "give an image, a text"),
        ("/search/json", {"text": "milk", "filters": {"price_min": 5, "price_max": 1}}, 422, "above price_max"),
        ("/search/json", {"text": "milk", "options": {"fusion": "best"}}, 422, "rrf"),
        ("/search/json", {"text": "milk", "unknown": 1}, 422, "Extra inputs"),
        ("/search/json", {"text": "milk", "filters": {"where": [{"key": "x.y", "match": 1}]}}, 422, "pattern"),
        ("/search/json", {"text": "milk", "filters": {"where": [{"key": "brand"}]}}, 422, "exactly one of"),
        ("/search/json", {"product": {"retailer": "hemkop", "id": "nope"}}, 404, "no product"),
        (
            "/search/json",
            {"image_base64": base64.b64encode(b"plain words").decode()},
            422,
            "not a recognised image format",
        ),
    ],
)
def test_json_api_errors(client: TestClient, path: str, payload: dict[str, object], status: int, message: str) -> None:
    response = client.post(path, json={"catalogue": "grocery", **payload})
    assert response.status_code == status, response.text
    assert message in response.text


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"text": "milk", "price_min": "5", "price_max": "1"}, "above price_max"),
        (
            {"text": "milk", "fusion": "weighted", "image_weight": "0", "text_weight": "0", "lexical_weight": "0"},
            "cannot all be 0",
        ),
        ({"text": "milk", "fusion": "maximum"}, "rrf"),
        ({"text": "milk", "offset": "-1"}, "greater than or equal to 0"),
    ],
)
def test_form_cross_field_errors_are_422(client: TestClient, data: dict[str, str], message: str) -> None:
    response = client.post("/search", data=data)
    assert response.status_code == 422 and message in response.text


def test_browser_sends_empty_numbers(client: TestClient) -> None:
    response = client.post("/search", data={"text": "milk", "price_min": "", "price_max": "", "score_threshold": ""})
    assert response.status_code == 200, response.text


def test_stored_product_photo_url_is_served(client: TestClient, two_shops: str) -> None:
    product = client.get(f"/catalogues/{two_shops}/products/other-shop/o-1").json()
    assert client.get(product["image_urls"][0]).status_code == 200


def test_the_api_docs_load_nothing_from_elsewhere(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200 and "SwaggerUIBundle" in page.text
    assert "cdn" not in page.text.lower() and "https://" not in page.text  # every file from the service itself
    for asset in ("/docs-assets/swagger-ui-bundle.js", "/docs-assets/swagger-ui.css"):
        served = client.get(asset)
        assert served.status_code == 200 and len(served.content) > 100_000, asset
    assert client.get("/openapi.json").json()["info"]["title"] == "product-match"


def test_empty_answers_say_why(client: TestClient) -> None:
    wrong_case = client.post("/search", data={"text": "apple", "category": "fruit > apple"}).json()
    assert wrong_case["results"] == [] and "'Fruit > Apple'" in wrong_case["warnings"][0]
    assert client.post("/search", data={"text": "apple", "category": "Fruit > Apple"}).json()["warnings"] == []
    alone = client.get("/catalogues/grocery/products/hemkop/1/matches").json()
    assert alone["matches"] == [] and "holds one retailer (hemkop)" in alone["warning"]
