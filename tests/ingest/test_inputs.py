"""More inputs for `python -m ingest PATH` (folders, zips) and image URLs fetched from a real local HTTP server."""

from __future__ import annotations

import http.server
import socket
import stat
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ingest.inputs import InputError, extract_zip
from ingest.pipeline import Ingestor
from ingest.readers import CatalogueError
from ingest.sources import BlockedAddress, SourceError, UrlFetcher
from retrieval.encoders import ImageEncoder, TextEncoder
from retrieval.records import point_id
from retrieval.settings import Settings
from retrieval.store import ProductStore
from tests.conftest import SAMPLE
from tests.ingest.test_ingest import run_cli

PHOTOS = SAMPLE.parent / "images"
JPEG = (PHOTOS / "Anjou_Iconic.jpg").read_bytes()


def photo_bytes(name: str) -> bytes:
    return (PHOTOS / name).read_bytes()


def image_count(store: ProductStore, catalogue: str, retailer: str, product_id: str) -> int:
    (point,) = store.retrieve(catalogue, [point_id(retailer, product_id)], with_vectors=True)
    assert isinstance(point.vector, dict)
    photos = point.vector.get("image", [])
    assert isinstance(photos, list)
    return len(photos)


def image_vectors_equal(store: ProductStore, catalogue: str, *products: tuple[str, str]) -> bool:
    """Whether the listed products' first photos have the very same stored vector."""
    vectors = []
    for retailer, product_id in products:
        (point,) = store.retrieve(catalogue, [point_id(retailer, product_id)], with_vectors=True)
        assert isinstance(point.vector, dict) and isinstance(point.vector["image"], list)
        vectors.append(point.vector["image"][0])
    return all(vector == vectors[0] for vector in vectors)


def payload(store: ProductStore, catalogue: str, retailer: str, product_id: str) -> dict[str, Any]:
    record = store.get(catalogue, point_id(retailer, product_id))
    assert record is not None and record.payload is not None
    return record.payload


def make_tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


SHOP_TREE = {  # the seed projects' layout: root/<category>/<sub-category>/<image>
    "Fruit/Apple/Granny-Smith_001.jpg": photo_bytes("Granny-Smith_Iconic.jpg"),
    "Fruit/Apple/Pink_Lady.002.png": photo_bytes("Pink-Lady_Iconic.jpg"),  # a suffix that lies: still decoded
    "Fruit/Banana.jpg": photo_bytes("Banana_Iconic.jpg"),
    "Vegetables/carrot.JPG": photo_bytes("Carrots_Iconic.jpg"),
    "Vegetables/notes.txt": b"not a product",
    "Vegetables/.DS_Store": b"\x00\x00",
    "Thumbs.db": b"\x00",
}


# ---------------------------------------------------------------- folders


def test_a_folder_of_images_by_category_is_one_product_per_image(
    tmp_path: Path, ingestor: Ingestor, store: ProductStore, catalogue_name: str
) -> None:
    root = make_tree(tmp_path / "corner-shop", SHOP_TREE)
    report = ingestor.run(root, catalogue_name, progress=False)

    assert (report.read, report.new, report.images_embedded) == (5, 4, 4)
    assert report.skipped_images == []
    (rejected,) = report.rejected_rows
    assert (rejected.id, rejected.field) == ("Vegetables/notes.txt", "file") and "not an image" in rejected.reason
    assert store.count(catalogue_name) == 4
    apple = payload(store, catalogue_name, "corner-shop", "Fruit/Apple/Granny-Smith_001")
    assert apple["title"] == "Granny Smith 001" and apple["category"] == ["Fruit", "Apple"]
    assert apple["category_prefixes"] == ["Fruit", "Fruit > Apple"]
    assert Path(apple["images"][0]) == root / "Fruit/Apple/Granny-Smith_001.jpg"
    assert payload(store, catalogue_name, "corner-shop", "Fruit/Apple/Pink_Lady.002")["title"] == "Pink Lady 002"
    assert payload(store, catalogue_name, "corner-shop", "Fruit/Banana")["category_path"] == "Fruit"
    assert payload(store, catalogue_name, "corner-shop", "Vegetables/carrot")["title"] == "carrot"

    again = ingestor.run(root, catalogue_name, progress=False)
    assert (again.new, again.updated, again.unchanged) == (0, 0, 4)


def test_product_folders_and_retailer_option_through_the_cli(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    image_encoder: ImageEncoder,
    text_encoder: TextEncoder,
) -> None:
    root = make_tree(
        tmp_path / "export",
        {
            "Shoes/Sneakers/AB-123/1-front.jpg": photo_bytes("Alpro-Fresh-Soy-Milk_Iconic.jpg"),
            "Shoes/Sneakers/AB-123/2-side.jpg": photo_bytes("Alpro-Shelf-Soy-Milk_Iconic.jpg"),
            "Shoes/Sneakers/AB-123/3-back.png": photo_bytes("Alpro-Vanilla-Soyghurt_Iconic.jpg"),
            "Shoes/Sneakers/CD_9/only.jpg": photo_bytes("Anjou_Iconic.jpg"),
            "Shoes/loose-shoe.jpg": photo_bytes("Banana_Iconic.jpg"),  # beside sub-folders: a product of its own
        },
    )
    env = {"QDRANT_PATH": str(tmp_path / "store")}
    args = [str(root), "--catalogue", "shoes", "--retailer", "shoe-shop", "--product-folders"]
    code, out, _ = run_cli(args, monkeypatch, env, capsys)
    assert code == 0 and "new 3, updated 0, unchanged 0, rejected rows 0, skipped images 0, images embedded 5" in out

    store = ProductStore.open(Settings(qdrant_path=tmp_path / "store"))  # the CLI has closed it
    try:
        sneaker = payload(store, "shoes", "shoe-shop", "Shoes/Sneakers/AB-123")
        assert sneaker["title"] == "AB 123" and sneaker["category_path"] == "Shoes > Sneakers"
        assert [Path(p).name for p in sneaker["images"]] == ["1-front.jpg", "2-side.jpg", "3-back.png"]
        assert image_count(store, "shoes", "shoe-shop", "Shoes/Sneakers/AB-123") == 3  # one multivector
        assert payload(store, "shoes", "shoe-shop", "Shoes/Sneakers/CD_9")["title"] == "CD 9"
        assert payload(store, "shoes", "shoe-shop", "Shoes/loose-shoe")["category_path"] == "Shoes"
    finally:
        store.close()


def test_a_folder_with_a_catalogue_file_is_read_as_that_catalogue(
    tmp_path: Path, ingestor: Ingestor, store: ProductStore, catalogue_name: str
) -> None:
    root = make_tree(tmp_path / "feed", {"photos/pear.jpg": JPEG, "Fruit/ignored.jpg": JPEG})
    (root / "catalogue.csv").write_text(
        "id,retailer,title,image\n1,,Pear without retailer,photos/pear.jpg\n2,own-shop,Pear with one,photos/pear.jpg\n"
    )
    report = ingestor.run(root, catalogue_name, progress=False, retailer="filled-in")
    assert report.source == str(root / "catalogue.csv")
    # one photo file under two listings of the same chunk: embedded once (README: "embedded once")
    assert (report.read, report.new, report.images_embedded) == (2, 2, 1)
    assert image_vectors_equal(store, catalogue_name, ("filled-in", "1"), ("own-shop", "2"))
    assert payload(store, catalogue_name, "filled-in", "1")["title"] == "Pear without retailer"
    assert payload(store, catalogue_name, "own-shop", "2")["title"] == "Pear with one"

    (root / "catalogue.jsonl").write_text("{}\n")
    with pytest.raises(CatalogueError, match="keep one catalogue file"):
        ingestor.run(root, catalogue_name, progress=False)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    with pytest.raises(CatalogueError, match="no catalogue file .* and no image files"):
        ingestor.run(empty, catalogue_name, progress=False)


# ---------------------------------------------------------------- zips


def write_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path


def test_a_zip_of_a_folder_is_extracted_beside_the_store_and_stays(
    tmp_path: Path, ingestor: Ingestor, store: ProductStore, catalogue_name: str
) -> None:
    archive = write_zip(tmp_path / "upload.zip", {f"corner-shop/{name}": data for name, data in SHOP_TREE.items()})
    report = ingestor.run(archive, catalogue_name, progress=False)
    assert (report.new, report.images_embedded, len(report.rejected_rows)) == (4, 4, 1)

    (extracted,) = (tmp_path / "sources" / catalogue_name).iterdir()  # <store folder>/../sources/<catalogue>/
    assert extracted.name.startswith("upload-")
    apple = payload(store, catalogue_name, "corner-shop", "Fruit/Apple/Granny-Smith_001")  # retailer: the top folder
    assert Path(apple["images"][0]) == extracted / "corner-shop/Fruit/Apple/Granny-Smith_001.jpg"
    assert Path(apple["images"][0]).read_bytes() == SHOP_TREE["Fruit/Apple/Granny-Smith_001.jpg"]
    assert str(extracted) in report.source and str(archive) in report.source

    again = ingestor.run(archive, catalogue_name, progress=False)  # the same bytes: the same folder, nothing redone
    assert (again.new, again.updated, again.unchanged) == (0, 0, 4)
    assert list((tmp_path / "sources" / catalogue_name).iterdir()) == [extracted]


def test_a_zip_of_a_catalogue_file_with_its_images(
    tmp_path: Path, ingestor: Ingestor, store: ProductStore, catalogue_name: str
) -> None:
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(JPEG)
    archive = write_zip(
        tmp_path / "feed.zip",
        {
            "catalogue.csv": (
                "id,retailer,title,image\n"
                "1,shop,Pear,images/pear.jpg\n"
                "2,shop,Two photos,images/pear.jpg|images/banana.jpg\n"
                f"3,shop,Absolute path,{outside}\n"
                "4,shop,Climbs out,../../../secret.jpg\n"
                "5,shop,Text only,\n"
            ).encode(),
            "images/pear.jpg": JPEG,
            "images/banana.jpg": photo_bytes("Banana_Iconic.jpg"),
        },
    )
    report = ingestor.run(archive, catalogue_name, progress=False)
    assert report.new == 3 and store.count(catalogue_name) == 3
    assert image_count(store, catalogue_name, "shop", "2") == 2
    outside_rows = {r.line: r for r in report.rejected_rows}
    assert set(outside_rows) == {4, 5}
    assert all(r.field == "image" and "points outside the zip" in r.reason for r in outside_rows.values())


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("../evil.jpg", "climbs out of the folder"),
        ("shop/../../evil.jpg", "climbs out of the folder"),
        ("..\\evil.jpg", "climbs out of the folder"),
        ("/tmp/evil.jpg", "absolute path"),
        ("C:/evil.jpg", "absolute path"),
        ("link.jpg", "symbolic link"),
    ],
)
def test_unsafe_zip_entries_refuse_the_archive(tmp_path: Path, name: str, message: str) -> None:
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as out:
        out.writestr("shop/Fruit/pear.jpg", JPEG)
        entry = zipfile.ZipInfo(name)
        if name == "link.jpg":
            entry.create_system = 3
            entry.external_attr = (stat.S_IFLNK | 0o777) << 16
            out.writestr(entry, "/etc/passwd")
        else:
            out.writestr(entry, JPEG)
    dest = tmp_path / "x" / "y" / "sources"
    with pytest.raises(InputError, match=message):
        extract_zip(archive, dest)
    assert not (tmp_path / "evil.jpg").exists() and not (tmp_path / "x" / "evil.jpg").exists()
    assert not dest.exists() or list(dest.iterdir()) == []  # nothing written at all


def test_zip_bombs_are_refused_by_size_and_count(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    image_encoder: ImageEncoder,
    text_encoder: TextEncoder,
) -> None:
    bomb = write_zip(tmp_path / "bomb.zip", {"shop/zeros.jpg": bytes(20 * 1024 * 1024)})
    assert bomb.stat().st_size < 100_000  # 20 MiB of zeros in a few KB
    many = write_zip(tmp_path / "many.zip", {f"shop/{i}.jpg": JPEG for i in range(30)})
    env = {"QDRANT_PATH": str(tmp_path / "store"), "MAX_ARCHIVE_BYTES": str(10 * 1024 * 1024)}
    code, _, err = run_cli([str(bomb), "--catalogue", "z"], monkeypatch, env, capsys)
    assert code == 2 and "unpacks to more than 10,485,760 bytes (MAX_ARCHIVE_BYTES)" in err and "zip bomb" in err
    code, _, err = run_cli([str(many), "--catalogue", "z"], monkeypatch, {**env, "MAX_ARCHIVE_ENTRIES": "20"}, capsys)
    assert code == 2 and "has 30 entries, over the limit of 20 (MAX_ARCHIVE_ENTRIES)" in err
    assert not (tmp_path / "sources").exists()  # refused before anything was written

    (tmp_path / "not.zip").write_bytes(b"PK\x03\x04 truncated")
    code, _, err = run_cli([str(tmp_path / "not.zip"), "--catalogue", "z"], monkeypatch, env, capsys)
    assert code == 2 and "is not a readable zip file" in err

    env["MAX_ARCHIVE_ENTRIES"] = "30"
    code, out, _ = run_cli([str(many), "--catalogue", "z"], monkeypatch, env, capsys)  # within both limits: lands
    assert code == 0 and "new 30," in out


# ---------------------------------------------------------------- image URLs


@dataclass
class Server:
    """A real HTTP server on 127.0.0.1 with a few misbehaving routes; counts hits per path."""

    port: int = 0
    hits: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0
    most_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


def make_handler(server: Server) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def reply(self, status: int, body: bytes = b"", kind: str = "image/jpeg", length: bool = True) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            if length:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            with server.lock:
                server.hits[self.path] += 1
                hits = server.hits[self.path]
            self.route(hits)

        def route(self, hits: int) -> None:
            if self.path == "/photo.jpg":
                self.reply(200, JPEG)
            elif self.path == "/flaky.jpg" and hits <= 2:  # two 503s, then the photo
                self.reply(503, b"busy", "text/plain")
            elif self.path == "/flaky.jpg":
                self.reply(200, JPEG)
            elif self.path == "/down.jpg":
                self.reply(503, b"busy", "text/plain")
            elif self.path == "/missing.jpg":
                self.reply(404, b"no such photo", "text/plain")
            elif self.path == "/big.jpg":  # 2 MB, no Content-Length: only counting the body catches it
                self.reply(200, b"\xff" * 2_000_000, length=False)
            elif self.path == "/declared-big.jpg":
                self.reply(200, b"\xff" * 2_000_000)
            elif self.path == "/page.jpg":
                self.reply(200, b"<html><body>Sign in</body></html>", "text/html; charset=utf-8")
            elif self.path == "/to-loopback.jpg":
                self.send_response(302)
                self.send_header("Location", server.url("/photo.jpg"))
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path == "/slow.jpg":  # counts the requests being served at once
                with server.lock:
                    server.in_flight += 1
                    server.most_in_flight = max(server.most_in_flight, server.in_flight)
                time.sleep(0.15)
                with server.lock:
                    server.in_flight -= 1  # before replying: the client cannot start another one before this
                self.reply(200, JPEG)
            else:
                self.reply(404, b"", "text/plain")

    return Handler


@pytest.fixture
def server() -> Iterator[Server]:
    state = Server()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def fetcher(**options: Any) -> UrlFetcher:
    return UrlFetcher(**{"backoff_s": 0.01, **options})


def test_private_addresses_are_refused_unless_allowed(server: Server) -> None:
    with UrlFetcher.from_settings(Settings(allow_private_urls=False)) as default:
        with pytest.raises(BlockedAddress, match=r"127\.0\.0\.1 is a loopback address.*ALLOW_PRIVATE_URLS=true"):
            default.fetch(server.url("/photo.jpg"))
        with pytest.raises(BlockedAddress, match=r"localhost resolves to .*, a loopback address"):
            default.fetch(server.url("/photo.jpg", host="localhost"))
        for private in ("10.1.2.3", "192.168.0.10", "169.254.169.254", "0.0.0.0", "[::1]", "[fe80::1]"):
            with pytest.raises(BlockedAddress, match="refused"):
                default.fetch(f"http://{private}:9/photo.jpg")  # refused before any connection is tried
    assert server.hits["/photo.jpg"] == 0

    with UrlFetcher.from_settings(Settings(allow_private_urls=True)) as allowed:
        assert allowed.fetch(server.url("/photo.jpg")) == JPEG
    assert server.hits["/photo.jpg"] == 1


def test_retries_back_off_on_503_then_succeed(server: Server) -> None:
    with fetcher(allow_private=True, retries=3) as http:
        assert http.fetch(server.url("/flaky.jpg")) == JPEG
        assert server.hits["/flaky.jpg"] == 3
        with pytest.raises(SourceError, match=r"HTTP 503 for .*/down.jpg \(gave up after 3 attempts\)"):
            with fetcher(allow_private=True, retries=2) as fewer:
                fewer.fetch(server.url("/down.jpg"))
        assert server.hits["/down.jpg"] == 3


def test_a_404_is_reported_without_retries(server: Server) -> None:
    with fetcher(allow_private=True, retries=3) as http, pytest.raises(SourceError) as caught:
        http.fetch(server.url("/missing.jpg"))
    assert str(caught.value) == f"HTTP 404 for {server.url('/missing.jpg')}"
    assert server.hits["/missing.jpg"] == 1


def test_connection_errors_are_retried_then_reported(server: Server) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with fetcher(allow_private=True, retries=2) as http, pytest.raises(SourceError) as caught:
        http.fetch(f"http://127.0.0.1:{port}/photo.jpg")
    assert "ConnectError" in str(caught.value) and "gave up after 3 attempts" in str(caught.value)


def test_too_large_and_non_image_responses_are_refused(server: Server) -> None:
    with fetcher(allow_private=True, max_bytes=1_000_000) as http:
        with pytest.raises(SourceError, match="over the limit of 1000000 bytes"):
            http.fetch(server.url("/big.jpg"))
        with pytest.raises(SourceError, match="is 2000000 bytes, over the limit of 1000000"):
            http.fetch(server.url("/declared-big.jpg"))
        with pytest.raises(SourceError, match="is text/html, not an image"):
            http.fetch(server.url("/page.jpg"))
        assert http.fetch(server.url("/photo.jpg")) == JPEG  # under the cap
    assert server.hits["/big.jpg"] == server.hits["/page.jpg"] == 1  # refusals are not retried


def test_each_redirect_hop_is_checked(server: Server) -> None:
    # localhost is trusted by name (URL_ALLOW_HOSTS); its redirect to the loopback address is not.
    with fetcher(allow_hosts=["localhost"]) as http:
        assert http.fetch(server.url("/photo.jpg", host="localhost")) == JPEG
        with pytest.raises(BlockedAddress, match=r"redirected from .* to .*127\.0\.0\.1.*loopback address"):
            http.fetch(server.url("/to-loopback.jpg", host="localhost"))
    assert server.hits["/to-loopback.jpg"] == 1 and server.hits["/photo.jpg"] == 1
    with fetcher(allow_private=True) as http:
        assert http.fetch(server.url("/to-loopback.jpg")) == JPEG  # allowed: the redirect is followed


def test_concurrency_is_bounded_by_the_setting(server: Server) -> None:
    settings = Settings(allow_private_urls=True, url_concurrency=2)
    with UrlFetcher.from_settings(settings) as http, ThreadPoolExecutor(6) as pool:
        bodies = list(pool.map(lambda _: http.fetch(server.url("/slow.jpg")), range(6)))
    assert bodies == [JPEG] * 6
    assert server.most_in_flight == 2


def test_url_images_through_the_pipeline(
    tmp_path: Path, server: Server, store: ProductStore, image_encoder: ImageEncoder, text_encoder: TextEncoder
) -> None:
    path = tmp_path / "urls.csv"
    path.write_text(
        "id,retailer,title,image\n"
        f"1,shop,Photo,{server.url('/photo.jpg')}\n"
        f"2,shop,Missing,{server.url('/missing.jpg')}\n"
        f"3,shop,Html,{server.url('/page.jpg')}\n"
        f"4,shop,Two,{server.url('/photo.jpg')}|{server.url('/slow.jpg')}\n"
    )
    default = Ingestor(Settings(qdrant_path=tmp_path / "qdrant"), store, image_encoder, text_encoder)
    refused = default.run(path, "refused", progress=False)
    assert refused.new == 4 and refused.images_embedded == 0  # every product kept with its title
    assert len(refused.skipped_images) == 5 and all("ALLOW_PRIVATE_URLS" in s.reason for s in refused.skipped_images)
    assert sum(server.hits.values()) == 0

    settings = Settings(qdrant_path=tmp_path / "qdrant", allow_private_urls=True)
    allowed = Ingestor(settings, store, image_encoder, text_encoder).run(path, "allowed", progress=False)
    assert allowed.new == 4 and allowed.images_embedded == 1  # three fetched photos, the same bytes: embedded once
    reasons = {s.id: s.reason for s in allowed.skipped_images}
    assert set(reasons) == {"2", "3"} and "HTTP 404" in reasons["2"] and "text/html" in reasons["3"]
    assert image_count(store, "allowed", "shop", "4") == 2
    assert payload(store, "allowed", "shop", "1")["images"] == [server.url("/photo.jpg")]
