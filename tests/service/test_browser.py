"""The search page in a real browser: headless Chromium (Debian's package, installed by `make test`) driven by
Playwright against the real service on loopback, with the sample catalogue and a second shop ingested.

Not skipped when Chromium is missing: the test fails and says how to get it."""

from __future__ import annotations

import base64
import io
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from PIL import Image

try:
    from playwright.sync_api import Browser, FilePayload, Page, Route, ViewportSize, expect, sync_playwright
except ImportError:  # pragma: no cover - a setup problem, said plainly
    pytest.fail("playwright is not installed: run `make test` (or pip install -e '.[dev]')", pytrace=False)

from ingest.pipeline import Ingestor
from retrieval.encoders import ImageEncoder, TextEncoder
from retrieval.match.model import fit, labelled_candidates
from retrieval.search import SearchEngine
from retrieval.settings import Settings
from retrieval.store import ProductStore
from schemas.search import LabelledPair, ProductRef
from service.app import create_app
from service.state import AppState
from tests.conftest import SAMPLE, sample_rows, two_currency_rows, write_catalogue

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT: ViewportSize = {"width": 1280, "height": 900}
# The README's picture is refreshed on purpose (`make screenshot`), never as a side effect of a test run.
SCREENSHOT_OUT = os.environ.get("SCREENSHOT_OUT")
QUERY_PHOTO = SAMPLE.parent / "queries" / "Granny-Smith_001.jpg"  # an in-store photo, not a catalogue one
UPLOAD_CAP = 1024 * 1024  # the served app's MAX_UPLOAD_BYTES, so that a 413 is cheap to provoke
APPLES = ["0", "1", "2", "3", "4"]  # "Fruit > Apple" in the sample; "1" is Granny Smith
OTHERSHOP = [*APPLES, "41", "44"]  # listed again by a second shop: the apples, Arla Standard Milk, Oatly Oatghurt


def othershop_rows() -> list[dict[str, str]]:
    rows = [r for r in sample_rows(1_000) if r["id"] in OTHERSHOP]
    return [
        {**r, "retailer": "othershop", "id": f"os-{r['id']}", "price": f"{19.9 + i:.2f}", "currency": "SEK"}
        for i, r in enumerate(rows)
    ]


# (category folder, file name, the sample photo it holds): ids such as `Fruit/Apple/Granny Smith #1`
FOLDER_PHOTOS = [
    ("Fruit/Apple", "Granny Smith #1.jpg", "Granny-Smith_Iconic.jpg"),
    ("Fruit/Pear", "Anjou 100%.jpg", "Anjou_Iconic.jpg"),
    ("Dairy/Milk", "Arla Standard?.jpg", "Arla-Standard-Milk_Iconic.jpg"),
]


@pytest.fixture(scope="module")
def service_url(
    image_encoder: ImageEncoder, text_encoder: TextEncoder, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The service (real app, real store, real encoders) on a loopback port, in a thread of this process."""
    root = tmp_path_factory.mktemp("browser")
    settings = Settings(qdrant_path=root / "qdrant", default_catalogue="grocery", max_upload_bytes=UPLOAD_CAP)
    store = ProductStore.open(settings)
    try:
        ingestor = Ingestor(settings, store, image_encoder, text_encoder)
        assert ingestor.run(SAMPLE, "grocery", progress=False).new == 81
        second = write_catalogue(root / "othershop", othershop_rows())
        assert ingestor.run(second, "grocery", progress=False).new == len(OTHERSHOP)
        # Calibrate the match decisions as `python -m ingest calibrate` does: the shared listings, and a few
        # products the second shop does not sell.
        engine = SearchEngine(store, image_encoder, text_encoder)
        pairs = [LabelledPair(product=ProductRef(retailer="hemkop", id=i), expect=[f"os-{i}"]) for i in OTHERSHOP]
        pairs += [LabelledPair(product=ProductRef(retailer="hemkop", id=i), expect=[]) for i in ("5", "6", "16", "79")]
        store.save_calibration("grocery", fit(labelled_candidates(engine, "grocery", pairs), source="browser test"))
        # Two shops' folders of photos by category: every id holds `/` (and `#`, spaces), retailers `/` and `%`.
        for retailer, photos in (("shop/a", FOLDER_PHOTOS), ("shop%b", FOLDER_PHOTOS[::-1])):
            folder = root / retailer.replace("/", "_").replace("%", "_")
            for category, name, source in photos:
                (folder / category).mkdir(parents=True, exist_ok=True)
                (folder / category / name).write_bytes((SAMPLE.parent / "images" / source).read_bytes())
            assert ingestor.run(folder, "folders", retailer=retailer, progress=False).new == len(photos)

        # A catalogue nobody labelled, for the review tab: two shops in two currencies (tests/conftest.py), where
        # the default model decides no true pair 'match'.
        review = write_catalogue(root / "review", two_currency_rows())
        assert ingestor.run(review, "review", progress=False).new == 60

        app = create_app(settings, state=AppState(settings, store, engine))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the service did not start"
            time.sleep(0.05)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            thread.join(timeout=15)
            listener.close()
    finally:
        store.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: `make test` installs it, or run "
            "`apt-get install -y --no-install-recommends chromium chromium-driver`",
            pytrace=False,
        )
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Browser, service_url: str) -> Iterator[Page]:
    """The search page, loaded, with the catalogues listed; fails the test on any uncaught script error."""
    context = browser.new_context(viewport=VIEWPORT, base_url=service_url, locale="en-US")
    context.set_default_timeout(15_000)
    tab = context.new_page()
    script_errors: list[str] = []
    tab.on("pageerror", lambda error: script_errors.append(str(error)))
    tab.goto("/")
    expect(tab.locator("#catalogue")).to_have_value("grocery")
    expect(tab.locator("#status")).to_contain_text("Catalogue grocery is ready")
    yield tab
    context.close()
    assert not script_errors, f"the page raised: {script_errors}"


def drop_file(page: Page, path: Path) -> None:
    """Drop a file on the drop zone as a drag from the desktop does: a `drop` event carrying it."""
    page.evaluate(
        """([name, data]) => {
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: "image/jpeg" }));
            const zone = document.getElementById("drop");
            zone.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));
        }""",
        [path.name, base64.b64encode(path.read_bytes()).decode()],
    )


def paste_file(page: Page, path: Path) -> None:
    """Paste a photo into the page as Ctrl+V does after copying an image: a `paste` event carrying it."""
    page.evaluate(
        """([name, data]) => {
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: "image/jpeg" }));
            const event = new ClipboardEvent("paste", { clipboardData: transfer, bubbles: true, cancelable: true });
            document.activeElement.dispatchEvent(event);
        }""",
        [path.name, base64.b64encode(path.read_bytes()).decode()],
    )


def wait_for_photos(page: Page, scope: str) -> None:
    """Every photo under `scope` is loaded from the API and decoded (a broken link has naturalWidth 0)."""
    page.wait_for_function(
        """(scope) => {
            const photos = [...document.querySelectorAll(scope + " img")];
            return photos.length > 0 && photos.every((img) => img.complete && img.naturalWidth > 0);
        }""",
        arg=scope,
    )


def save_screenshot(png: bytes, folder: Path) -> Path:
    """Write the page's picture to `folder` (or to SCREENSHOT_OUT, for the README), unless the target already
    shows the same page: Chromium's anti-aliasing differs by a shade on a few dozen pixels from run to run, and
    rewriting the file for that would dirty the tree."""
    target = Path(SCREENSHOT_OUT) if SCREENSHOT_OUT else folder / "screenshot.png"
    if target.exists():
        old = np.asarray(Image.open(target).convert("RGB"), dtype=np.int16)
        new = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
        if old.shape == new.shape and (np.abs(old - new).max(axis=2) > 0).mean() < 5e-4:
            return target
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(png)
    return target


def test_photo_search_with_filters_then_the_same_product_elsewhere(page: Page, tmp_path: Path) -> None:
    drop_file(page, QUERY_PHOTO)
    expect(page.locator("#preview")).to_be_visible()
    expect(page.locator("#drop-hint")).to_contain_text(QUERY_PHOTO.name)
    page.select_option("#category", "Fruit > Apple")
    page.select_option('#retailers select[data-retailer="othershop"]', "exclude")
    page.click("#submit")

    cards = page.locator("#results > li")
    expect(cards).to_have_count(5)  # the five apples of hemkop; othershop's are excluded
    expect(page.locator("#status")).to_have_text("5 results from grocery by photo.")
    first = cards.first
    expect(first.locator(".title")).to_have_text("Granny Smith")
    expect(first).to_contain_text("#1")
    expect(first.locator(".retailer-name")).to_have_text("hemkop")
    expect(first.locator(".category")).to_have_text("Fruit > Apple")
    expect(first.locator(".bar")).to_have_count(1)  # a photo-only query: one modality, one bar
    expect(first.locator(".bar-label")).to_have_text("photo")
    expect(first.locator(".score")).to_contain_text("photo cosine")
    assert all(text == "hemkop" for text in page.locator("#results .retailer-name").all_inner_texts())
    assert all(text == "Fruit > Apple" for text in page.locator("#results .category").all_inner_texts())
    wait_for_photos(page, "#results")
    expect(page.locator("#pager")).to_be_hidden()  # one page only

    opener = first.get_by_role("button", name="Same product elsewhere")
    opener.click()
    panel = page.locator("#matches")
    expect(panel).to_be_visible()
    expect(panel.locator("#matches-source")).to_contain_text("Granny Smith")
    matches = panel.locator("#matches-list > li")
    expect(matches).to_have_count(len(OTHERSHOP))  # every othershop product is a candidate, best first
    best = matches.first
    expect(best.locator(".title")).to_have_text("Granny Smith")
    expect(best.locator(".retailer-name")).to_have_text("othershop")
    expect(best.locator(".price")).to_have_text("SEK 20.90")
    expect(best.locator(".decision")).to_have_text("match")
    expect(best.locator(".confidence")).to_have_text(re.compile(r"^confidence (> )?\d+ %$"))
    assert "hemkop" not in panel.locator("#matches-list").inner_text()  # other shops only
    expect(panel.locator("#matches-status")).to_have_text(f"{len(OTHERSHOP)} candidates in other shops, best first.")
    expect(panel.locator("#matches-warning")).to_be_hidden()  # a reliable model: nothing to warn about
    wait_for_photos(page, "#matches")

    shot = save_screenshot(page.screenshot(), tmp_path)
    assert Image.open(shot).size[0] > 600  # a real picture of the page

    page.keyboard.press("Escape")
    expect(panel).to_be_hidden()
    expect(opener).to_be_focused()


def test_products_whose_ids_hold_slashes_show_photos_and_matches(page: Page) -> None:
    """Issue 27: a folder-per-category feed's ids (`Fruit/Apple/Granny Smith #1`) and retailers with `/` or `%`
    reach their photos and their matches from the page."""
    page.select_option("#catalogue", "folders")
    page.fill("#text", "Granny Smith")
    page.click("#submit")
    first = page.locator("#results > li").first
    expect(first.locator(".title")).to_have_text("Granny Smith #1")
    wait_for_photos(page, "#results")  # every photo URL carries the id percent-encoded, and answers
    first.get_by_role("button", name="Same product elsewhere").click()
    panel = page.locator("#matches")
    best = panel.locator("#matches-list > li").first
    expect(best.locator(".title")).to_have_text("Granny Smith #1")
    other = "shop%b" if first.locator(".retailer-name").inner_text() == "shop/a" else "shop/a"
    expect(best.locator(".retailer-name")).to_have_text(other)
    wait_for_photos(page, "#matches")


def test_the_panel_shows_why_decisions_are_unreliable(page: Page) -> None:
    """The page's side of an unreliable match model (tests/match/test_unreliable.py has the service's): the
    real answer, with the `reliable` / `warning` fields such a model gives, is shown beside the candidates."""
    warning = "the match model reached no threshold with out-of-fold precision 0.95 (at best 0.40 at recall 0.20)"

    def unreliable(route: Route) -> None:
        body = route.fetch().json()
        body.update(reliable=False, warning=warning)
        for match in body["matches"]:
            match["decision"] = "uncertain"
        route.fulfill(json=body)

    page.route("**/matches?*", unreliable)
    page.fill("#text", "Granny Smith apple")
    page.click("#submit")
    page.locator("#results > li").first.get_by_role("button", name="Same product elsewhere").click()
    panel = page.locator("#matches")
    expect(panel.locator("#matches-list > li").first.locator(".decision")).to_have_text("uncertain")
    expect(panel.locator("#matches-warning")).to_be_visible()
    expect(panel.locator("#matches-warning")).to_have_text(f"Decisions unreliable: {warning}.")
    page.keyboard.press("Escape")


def test_every_upload_error_gets_a_message(page: Page, tmp_path: Path) -> None:
    not_a_photo = tmp_path / "notes.jpg"
    not_a_photo.write_text("a text file with a photo's name\n")
    page.set_input_files("#image", str(not_a_photo))
    expect(page.locator("#drop-hint")).to_contain_text("no preview")
    page.click("#submit")
    error = page.locator("#error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("This file cannot be used as a photo")
    expect(error).to_contain_text("the uploaded image cannot be used")  # the API's own reason
    expect(page.locator("#results > li")).to_have_count(0)

    huge: FilePayload = {"name": "huge.jpg", "mimeType": "image/jpeg", "buffer": b"\xff" * (UPLOAD_CAP + 1)}
    page.set_input_files("#image", files=huge)
    page.click("#submit")
    expect(error).to_contain_text("This photo is too large to send")
    expect(error).to_contain_text(f"larger than {UPLOAD_CAP} bytes")

    page.click("#clear-image")
    expect(page.locator("#preview")).to_be_hidden()
    page.click("#submit")
    expect(error).to_have_text("Nothing to search for: add a photo or some words, then search again.")

    # After the errors, a good search clears the message: a pasted photo and words, fused.
    page.focus("#text")
    paste_file(page, QUERY_PHOTO)
    expect(page.locator("#preview")).to_be_visible()
    expect(page.locator("#status")).to_contain_text("Photo pasted")
    page.fill("#text", "granny smith apple")
    page.keyboard.press("Enter")
    expect(error).to_be_hidden()
    first = page.locator("#results > li").first
    expect(first.locator(".title")).to_have_text("Granny Smith")
    expect(first.locator(".bar-label")).to_have_text(["photo", "text", "words"])
    expect(page.locator("#status")).to_contain_text("by photo + text + words fused by DBSF")


def test_keyboard_only_search_and_pages(page: Page) -> None:
    # Playwright asks the browser to intercept file choosers without waiting for the answer: subscribe now, well
    # before the key press, or a fast press can open an unintercepted chooser that no test ever sees.
    page.on("filechooser", lambda chooser: None)
    page.keyboard.press("Tab")  # the "API docs" link
    page.keyboard.press("Tab")  # the views' tab list: one stop, on the view shown
    expect(page.get_by_role("tab", name="Search")).to_be_focused()
    page.keyboard.press("Tab")
    drop = page.locator("#drop")
    expect(drop).to_be_focused()
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline == "solid", f"no visible focus on the drop zone: outline {outline}"
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Enter")
    chooser.value.set_files(str(QUERY_PHOTO))
    expect(page.locator("#preview")).to_be_visible()

    page.select_option("#category", "Fruit > Apple")
    page.select_option('#retailers select[data-retailer="hemkop"]', "only")
    page.fill("#limit", "2")
    page.focus("#text")
    page.keyboard.press("Enter")

    cards = page.locator("#results > li")
    info = page.locator("#page-info")
    expect(info).to_have_text("Page 1: results 1–2")
    expect(cards.first.locator(".title")).to_have_text("Granny Smith")
    expect(page.locator("#prev")).to_be_disabled()
    seen = page.locator("#results .title").all_inner_texts()

    page.focus("#next")
    page.keyboard.press("Enter")
    expect(info).to_have_text("Page 2: results 3–4")
    expect(cards.first).to_contain_text("#3")
    seen += page.locator("#results .title").all_inner_texts()
    page.click("#next")
    expect(info).to_have_text("Page 3: results 5–5")
    expect(page.locator("#next")).to_be_disabled()  # fewer results than a page: the last one
    seen += page.locator("#results .title").all_inner_texts()
    assert sorted(seen) == ["Golden Delicious", "Granny Smith", "Pink Lady", "Red Delicious", "Royal Gala"]

    page.click("#prev")
    expect(info).to_have_text("Page 2: results 3–4")

    # The panel opens from the keyboard and Escape closes it.
    button = cards.first.get_by_role("button", name="Same product elsewhere")
    button.focus()
    page.keyboard.press("Enter")
    expect(page.locator("#matches")).to_be_visible()
    expect(page.locator("#matches-list > li").first.locator(".retailer-name")).to_have_text("othershop")
    page.keyboard.press("Escape")
    expect(page.locator("#matches")).to_be_hidden()
    expect(button).to_be_focused()


def test_review_answers_with_the_keyboard_then_training_changes_the_model(page: Page) -> None:
    """The Review tab end to end on two shops in two currencies: pairs asked by the default model's doubts,
    answered with S / D (a reviewer who knows product n is o-n), one skipped with K, then Train: the table of
    figures on products no model learnt from (the default decided no match; the trained model does), and the
    next pairs chosen by the catalogue's own model."""
    page.get_by_role("tab", name="Search").focus()
    page.keyboard.press("ArrowRight")  # the tab list's arrow keys, as a tab list's should
    expect(page.get_by_role("tab", name="Review")).to_be_focused()
    expect(page.get_by_role("tab", name="Review")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#review-view")).to_be_visible()
    expect(page.locator("#search-view")).to_be_hidden()
    page.select_option("#review-catalogue", "review")
    page.select_option("#review-retailer", "hemkop")
    page.click("#review-load")
    expect(page.locator("#review-status")).to_contain_text("chosen by the default match model")
    expect(page.locator("#review-counter")).to_have_text("0 labels stored for review")
    pair = page.locator("#review-pair")
    expect(pair).to_be_visible()
    wait_for_photos(page, "#review-pair")
    page.locator("#review-pair").click(position={"x": 5, "y": 5})  # focus on the page, not in a field
    skipped = pair.locator("#review-left h3").inner_text()
    page.keyboard.press("k")
    expect(page.locator("#review-status")).to_have_text("Skipped.")
    expect(pair.locator("#review-left h3")).not_to_have_text(skipped)
    answered = 0
    while answered < 24:
        expect(pair).to_be_visible()
        left_id = pair.locator("#review-left .meta").nth(1).inner_text().split("id ")[-1]
        right_id = pair.locator("#review-right .meta").nth(1).inner_text().split("id ")[-1]
        page.keyboard.press("s" if right_id == f"o-{left_id}" else "d")
        answered += 1
        expect(page.locator("#review-counter")).to_have_text(f"{answered} labels stored for review")
    page.click("#review-train")
    training = page.locator("#review-training")
    expect(training).to_contain_text("Trained on", timeout=120_000)
    rows = training.locator("tbody tr")
    expect(rows).to_have_count(2)  # what was active, and the model trained
    expect(rows.nth(0)).to_contain_text("default model")
    expect(rows.nth(0)).to_contain_text("decides no match")  # prices 11x apart: "not the same" to the default
    expect(rows.nth(1)).to_contain_text("precision")
    expect(training).to_contain_text("is now this catalogue's match model")
    expect(page.locator("#review-status")).to_contain_text("chosen by this catalogue's own match model")
