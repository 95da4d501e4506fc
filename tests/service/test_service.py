"""The HTTP API on the ingested sample: search by upload and text, and a 4xx with a message for bad input."""

from __future__ import annotations

import csv
import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from ingest.pipeline import Ingestor
from retrieval.search import SearchEngine
from retrieval.settings import Settings
from tests.conftest import SAMPLE, SHARED_DATA

PHOTO = SAMPLE.parent / "images" / "Arla-Standard-Milk_Iconic.jpg"


SERVICE_SETTINGS = {"max_upload_bytes": 2 * 1024 * 1024}  # read by the `client` fixture (conftest)


def png_bytes(size: tuple[int, int] = (64, 48), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 128 if mode != "RGB" else (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_health_page_and_docs(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    page = client.get("/")
    assert page.status_code == 200 and "<form" in page.text and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/search", "/healthz", "/catalogues"} <= set(paths)


def test_search_by_uploaded_photo_returns_that_product_first(client: TestClient) -> None:
    response = client.post(
        "/search", files={"image": (PHOTO.name, PHOTO.read_bytes(), "image/jpeg")}, data={"limit": "3"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["catalogue"] == "grocery" and body["modes"] == ["image"]
    top = body["results"][0]
    assert (top["id"], top["retailer"], top["product"]["title"]) == ("41", "hemkop", "Arla Standard Milk")
    assert set(top["scores"]) == {"image", "text", "lexical", "ocr"} and top["scores"]["image"] > 0.9  # crops: not 1
    assert top["scores"]["text"] is None and top["scores"]["lexical"] is None  # a photo-only query
    assert len(body["results"]) == 3
    photo = client.get(top["product"]["image_urls"][0])
    assert photo.status_code == 200 and photo.content == PHOTO.read_bytes()


def test_text_and_category_filter_over_http(client: TestClient) -> None:
    body = client.post("/search", data={"text": "apple", "category": "Packages > Juice", "limit": "30"}).json()
    assert {r["product"]["category_path"] for r in body["results"]} == {"Packages > Juice"}
    fused = client.post(
        "/search",
        files={"image": (PHOTO.name, PHOTO.read_bytes(), "image/jpeg")},
        data={"text": "standard milk", "catalogue": "grocery", "exclude_retailer": "nobody"},
    ).json()
    assert fused["fusion"] == "dbsf" and fused["results"][0]["product"]["title"] == "Arla Standard Milk"


def test_browser_style_empty_fields_are_ignored(client: TestClient) -> None:
    response = client.post(
        "/search",
        files={"image": ("", b"", "application/octet-stream")},
        data={"text": "oat milk", "category": "", "catalogue": "", "retailer": ""},
    )
    assert response.status_code == 200, response.text
    assert response.json()["modes"] == ["text", "lexical"]


@pytest.mark.parametrize(
    ("files", "data", "status", "message"),
    [
        (None, {"limit": "3"}, 422, "give an image, a text, or both"),
        (None, {"text": "   "}, 422, "give an image, a text, or both"),
        ({"image": ("notes.txt", b"just some text", "text/plain")}, None, 422, "not a recognised image format"),
        ({"image": ("cut.png", png_bytes()[:60], "image/png")}, None, 422, "cannot be used"),
        ({"image": ("huge.png", png_bytes((30_000, 30_000), "1"), "image/png")}, None, 422, "image too large"),
        ({"image": ("wide.png", png_bytes((8_000, 6_000), "1"), "image/png")}, None, 422, "over the limit of 40000000"),
        ({"image": ("big.bin", b"\0" * (2 * 1024 * 1024 + 1), "image/png")}, None, 413, "larger than"),
        (None, {"text": "milk", "catalogue": "nope"}, 404, "does not exist"),
        (None, {"text": "milk", "catalogue": "../etc"}, 422, "catalogue name"),
        (None, {"text": "milk", "limit": "0"}, 422, "greater than or equal to 1"),
        (None, {"text": "milk", "limit": "101"}, 422, "less than or equal to 100"),
        (None, {"text": "milk", "limit": "many"}, 422, "valid integer"),
        (None, {"text": "m" * 2001}, 422, "at most 2000"),
    ],
)
def test_bad_requests_get_a_4xx_with_a_message(
    client: TestClient,
    files: dict[str, tuple[str, bytes, str]] | None,
    data: dict[str, str] | None,
    status: int,
    message: str,
) -> None:
    response = client.post("/search", files=files, data=data)
    assert response.status_code == status, response.text
    assert message in response.text


def test_catalogue_listing_and_photo_route_errors(client: TestClient) -> None:
    body = client.get("/catalogues").json()
    (grocery,) = [c for c in body["catalogues"] if c["name"] == "grocery"]
    assert grocery["products"] == 81 and body["default"] == "grocery"
    assert grocery["categories"]["Packages"] == 31 and grocery["categories"]["Packages > Juice"] == 10
    assert grocery["retailers"] == {"hemkop": 81}
    assert grocery["image_encoder"].startswith("timm:tf_efficientnet_lite0/")
    assert client.get("/catalogues/grocery/products/hemkop/41/images/5").status_code == 404
    assert client.get("/catalogues/grocery/products/hemkop/nope/images/0").status_code == 404
    assert client.get("/catalogues/nope/products/hemkop/41/images/0").status_code == 404
    assert client.get("/catalogues/grocery/products/hemkop/41/images/-1").status_code == 422


MYNTRA = SHARED_DATA / "myntra-100" / "data"


def myntra_styles() -> list[dict[str, str]]:
    with (MYNTRA / "styles.csv").open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def fashion(engine: SearchEngine, sample_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> str:
    """40 Myntra fashion products (shared data) as a second catalogue beside the sample's grocery."""
    styles = myntra_styles()[:40]
    rows = [
        {
            "id": s["id"],
            "retailer": "myntra",
            "title": s["productDisplayName"],
            "brand": s["productDisplayName"].split()[0],
            "category": f"{s['masterCategory']} > {s['subCategory']} > {s['articleType']}",
            "image": str(MYNTRA / "images" / f"{s['id']}.jpg"),
            "colour": s["baseColour"],
        }
        for s in styles
    ]
    path = tmp_path_factory.mktemp("fashion") / "catalogue.csv"
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    report = Ingestor(sample_settings, engine.store, engine.image_encoder, engine.text_encoder).run(
        path, "fashion", progress=False, photo_roots=[MYNTRA]
    )
    assert report.new == 40 and not report.skipped_images
    return "fashion"


def test_fashion_and_grocery_catalogues_side_by_side(client: TestClient, fashion: str) -> None:
    listed = {c["name"]: c for c in client.get("/catalogues").json()["catalogues"]}
    assert listed["fashion"]["products"] == 40 and listed["grocery"]["products"] == 81
    assert listed["fashion"]["retailers"] == {"myntra": 40} and "Apparel" in listed["fashion"]["categories"]
    assert "Packages" not in listed["fashion"]["categories"]

    shoe = next(
        s for s in csv.DictReader((MYNTRA / "styles.csv").open(encoding="utf-8")) if s["subCategory"] == "Shoes"
    )
    photo = (MYNTRA / "images" / f"{shoe['id']}.jpg").read_bytes()
    found = client.post("/search", files={"image": ("shoe.jpg", photo, "image/jpeg")}, data={"catalogue": "fashion"})
    assert found.json()["results"][0]["id"] == shoe["id"]
    in_grocery = client.post("/search", files={"image": ("shoe.jpg", photo, "image/jpeg")}, data={"limit": "3"})
    assert {r["retailer"] for r in in_grocery.json()["results"]} == {"hemkop"}  # the default catalogue
    red = client.post(
        "/search/json",
        json={
            "catalogue": "fashion",
            "text": "shirt",
            "filters": {"where": [{"key": "attributes.colour", "match": "Red"}]},
        },
    ).json()["results"]
    assert red and all(r["product"]["attributes"]["colour"] == "Red" for r in red)
