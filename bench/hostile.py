"""`python -m bench hostile`: what hostile inputs cost, measured side by side with the unbounded ways they
were handled before issue 27: text cleaning of `1,1,1,...` (the unit patterns as they were, kept here as the
reference) and reading a photo covered in small print (rapidocr's one-call read of every box, against the
bounded `TextReader`)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from retrieval import lexical
from retrieval.ocr import TextReader

# The unit patterns before the fix: a number could start after `1,`, so each digit of `1,1,1,...` began a scan.
_OLD_UNITS = [re.compile(r"(?<![0-9a-z./-])(\d+(?:[.,]\d+)*)\s*" + written) for written, _ in lexical._UNITS]


def text_wall(side: int = 2000, size: int = 18) -> Image.Image:
    """A photo covered in small print (the attack of issue 27: 2000 x 2000 px, ~70 full-width lines)."""
    words = "oat milk organic natural whole grain barley juice apple orange tomato yoghurt cream butter".split()
    image = Image.new("RGB", (side, side), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=size)
    for number, y in enumerate(range(4, side - size, int(size * 1.6))):
        line = " ".join(words[(number * 7 + i) % len(words)] for i in range(side // (size * 4)))
        draw.text((4, y), line, fill="black", font=font)
    return image


def _seconds(run: Callable[[], object]) -> float:
    began = time.perf_counter()
    run()
    return time.perf_counter() - began


def _old_clean(text: str) -> None:
    for pattern in _OLD_UNITS:
        pattern.sub(" ", text)


def _serve_beside(lines: list[str]) -> None:
    """The service (real app, real store, OCR on) in this process on a loopback port: a text search's latency
    alone, then while a photo covered in print is being searched; and that photo search's own time."""
    import io
    import socket
    import statistics
    import tempfile
    import threading

    import httpx
    import uvicorn

    from ingest.pipeline import Ingestor
    from retrieval.runtime import open_runtime
    from retrieval.settings import Settings
    from service.app import create_app
    from service.state import AppState

    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as folder:
        settings = Settings(qdrant_path=Path(folder) / "store", ocr="on", default_catalogue="grocery")
        runtime = open_runtime(settings)
        engine = runtime.engine
        Ingestor(settings, runtime.store, engine.image_encoder, engine.text_encoder).run(
            Path("sample/grocery/catalogue.csv"), "grocery", progress=False
        )
        server = uvicorn.Server(uvicorn.Config(create_app(settings, state=AppState(settings, runtime.store, engine))))
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        png = io.BytesIO()
        text_wall().save(png, "PNG")
        try:
            with httpx.Client(base_url=url, timeout=120) as client:

                def text_search() -> float:
                    began = time.perf_counter()
                    client.post("/search", data={"text": "oat milk", "limit": "5"}).raise_for_status()
                    return time.perf_counter() - began

                text_search()  # warm
                alone = statistics.median(text_search() for _ in range(9))
                photo: dict[str, object] = {}

                def photo_search() -> None:
                    began = time.perf_counter()
                    answer = client.post("/search", files={"image": ("wall.png", png.getvalue(), "image/png")})
                    photo["seconds"] = time.perf_counter() - began
                    photo["answer"] = answer.json()

                beside_thread = threading.Thread(target=photo_search)
                beside_thread.start()
                time.sleep(0.2)
                beside = [text_search() for _ in range(5)]
                beside_thread.join()
        finally:
            server.should_exit = True
            thread.join(timeout=15)
            listener.close()
            runtime.store.close()
    answer = photo["answer"]
    assert isinstance(answer, dict)
    lines.append(
        f"| `POST /search` of that photo (OCR on; read: {'yes' if answer.get('read') else 'no'}, "
        f"warnings: {len(answer.get('warnings', []))}) | | {photo['seconds']:.1f} | |"
    )
    lines.append(
        f"| a text search alone / beside it (median of 9 / of 5) | {alone:.3f} | {statistics.median(beside):.3f} "
        f"| {statistics.median(beside) / alone:.1f}x |"
    )


def run(out: Path) -> int:
    lines = ["| input | before (s) | now (s) | ratio |", "| --- | ---: | ---: | ---: |"]
    for length in (2_000, 5_000, 20_000):
        text = "1," * (length // 2)
        now = _seconds(lambda text=text: lexical.clean(text))  # type: ignore[misc]
        before = _seconds(lambda text=text: _old_clean(text)) if length <= 5_000 else float("nan")  # type: ignore[misc]
        shown = f"{before:.2f}" if before == before else "(not run: minutes)"
        ratio = f"{before / now:.0f}x" if before == before else ""
        lines.append(f"| `clean('1,1,...')`, {length:,} characters | {shown} | {now:.4f} | {ratio} |")
    wall = text_wall()
    reader = TextReader()
    engine = reader._load()
    whole: list[object] = []
    before = _seconds(lambda: whole.extend(engine(wall)[0] or []))
    bounded: list[object] = []
    now = _seconds(lambda: bounded.extend(reader.lines(wall)))
    lines.append(
        f"| read a 2000 x 2000 photo of small print ({len(whole)} lines read before, {len(bounded)} now) "
        f"| {before:.1f} | {now:.1f} | {before / now:.0f}x |"
    )
    _serve_beside(lines)
    table = "\n".join(lines)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "hostile.md").write_text(table + "\n", encoding="utf-8")
    return 0
