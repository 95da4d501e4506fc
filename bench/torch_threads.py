"""`python -m bench.torch_threads`: why the service gives each model its own worker thread and splits
torch's threads between them. One photo forward (the default image encoder, batch 1) timed from the main
thread in a fresh process, then after a second thread has run a forward too (each thread that runs torch
ops gets an OpenMP team of its own), and the service's layout: torch at half the cores, the photo and the
text model on two worker threads side by side, and what a batch of 8 saves per photo there (what
micro-batching can gain)."""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from retrieval.encoders import load_image_encoder, load_text_encoder
from retrieval.settings import Settings

TEXT = "Arla standard milk"


def median_ms(fn: Callable[[], object], repeats: int = 30) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> int:
    settings = Settings()
    image = load_image_encoder(settings.image_model, settings.image_precision)
    text = load_text_encoder(settings.text_model, settings.text_precision)
    photo = torch.randn(1, 3, 224, 224)
    rows = [("photo forward, main thread, fresh process", median_ms(lambda: image.embed_tensors(photo)))]
    other = ThreadPoolExecutor(1)
    rows.append(
        ("photo forward on a second thread", median_ms(lambda: other.submit(image.embed_tensors, photo).result()))
    )
    rows.append(("photo forward, main thread again", median_ms(lambda: image.embed_tensors(photo))))
    both = ThreadPoolExecutor(1)
    rows.append(
        (
            "photo then text, one thread",
            median_ms(lambda: both.submit(lambda: (image.embed_tensors(photo), text.embed_texts([TEXT]))).result()),
        )
    )
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    photos, texts = ThreadPoolExecutor(1), ThreadPoolExecutor(1)

    def side_by_side() -> None:
        pending = photos.submit(image.embed_tensors, photo), texts.submit(text.embed_texts, [TEXT])
        for future in pending:
            future.result()

    rows.append(
        (f"photo and text side by side, {torch.get_num_threads()} torch thread(s) each", median_ms(side_by_side))
    )
    eight = torch.randn(8, 3, 224, 224)
    one_ms = median_ms(lambda: photos.submit(image.embed_tensors, photo).result())
    eight_ms = median_ms(lambda: photos.submit(image.embed_tensors, eight).result()) / 8
    rows += [("per photo, batch 1, model worker thread", one_ms), ("per photo, batch 8, model worker thread", eight_ms)]
    print(f"{image.name}, {text.name}, {os.cpu_count()} cores\n")
    print("| case | median ms |\n| --- | --- |")
    for label, ms in rows:
        print(f"| {label} | {ms:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
