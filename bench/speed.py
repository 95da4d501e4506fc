"""`python -m bench speed ingest`: how fast ingest runs against what the image model alone allows, and
against a naive one-image-at-a-time loop, measured side by side in one run; then a re-ingest of an
unchanged catalogue and of one where a tenth of the prices changed."""

from __future__ import annotations

import csv
import random
import resource
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ingest.pipeline import Ingestor
from retrieval.encoders import ImageEncoder, TextEncoder, load_image_encoder
from retrieval.settings import Settings
from retrieval.store import ProductStore, open_client
from schemas.report import IngestReport


@dataclass
class Row:
    what: str
    images: int
    seconds: float
    note: str = ""

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def photos(shared: Path) -> list[Path]:
    """The Grocery Store Dataset's in-store photos (train, then val): real JPEGs, one product each."""
    root = shared / "grocery" / "dataset"
    found = sorted((root / "train").rglob("*.jpg")) + sorted((root / "val").rglob("*.jpg"))
    found = [p.resolve() for p in found]
    if not found:
        raise SystemExit(f"no photos under {root}: run from the project folder with ../shared beside it")
    return found


def timed(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def model_alone(encoder: ImageEncoder, images: Sequence[Image.Image], batch: int) -> float:
    """Seconds to embed pre-decoded, pre-processed tensors in batches (after one warm-up batch)."""
    tensors = [encoder.preprocess(image) for image in images]
    encoder.embed_tensors(torch.stack(tensors[:batch]))
    return timed(
        lambda: [encoder.embed_tensors(torch.stack(tensors[i : i + batch])) for i in range(0, len(tensors), batch)]
    )


def naive_loop(encoder: ImageEncoder, paths: Sequence[Path]) -> float:
    """Seconds for the seed notebooks' way: open, preprocess and embed one image at a time."""

    def run() -> None:
        for path in paths:
            with Image.open(path) as image:
                encoder.embed_tensors(encoder.preprocess(image.convert("RGB")).unsqueeze(0))

    encoder.embed_tensors(encoder.preprocess(Image.new("RGB", (64, 64))).unsqueeze(0))
    return timed(run)


def write_catalogue(folder: Path, paths: Sequence[Path], products: int, *, seed: int = 0) -> Path:
    """`products` rows over the photos (cycling when there are more rows than photos), with prices."""
    rng = random.Random(seed)
    path = folder / "catalogue.csv"
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["id", "retailer", "title", "category", "price", "image"])
        for i in range(products):
            photo = paths[i % len(paths)]
            kind = photo.parent.name.replace("-", " ").replace("_", " ")
            writer.writerow(
                [f"p{i}", "shop", f"{kind} {i}", f"Grocery > {photo.parent.parent.name}", rng.randint(5, 99), photo]
            )
    return path


def change_prices(path: Path, share: float, *, seed: int = 1) -> int:
    rng = random.Random(seed)
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    changed = 0
    for row in rows[1:]:
        if rng.random() < share:
            row[4] = str(int(row[4]) + 1)
            changed += 1
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return changed


def ingest(
    settings: Settings, store: ProductStore, image: ImageEncoder, text: TextEncoder, path: Path, catalogue: str
) -> IngestReport:
    return Ingestor(settings, store, image, text).run(path, catalogue, progress=False)


def run_ingest(shared: Path, *, images: int, products: int, text_encoder: TextEncoder, settings: Settings) -> str:
    paths = photos(shared)
    batch = settings.batch_size
    encoder = load_image_encoder(settings.image_model, settings.image_precision)
    fp32 = load_image_encoder(settings.image_model, "fp32")
    precision = str(getattr(encoder, "precision", "fp32"))
    sample = paths[:images]
    decoded = [Image.open(p).convert("RGB") for p in sample]
    rows = [
        Row(
            f"image model alone, fp32, batch {batch}",
            len(decoded),
            model_alone(fp32, decoded, batch),
        ),
    ]
    if encoder is not fp32:
        rows.append(
            Row(
                f"image model alone, {precision}, batch {batch}",
                len(decoded),
                model_alone(encoder, decoded, batch),
            )
        )
    model_rate = rows[-1].rate
    naive_n = min(len(sample), 200)
    rows.append(
        Row(
            "naive loop: open, preprocess, embed one image at a time (fp32)",
            naive_n,
            naive_loop(fp32, sample[:naive_n]),
        )
    )
    naive_rate = rows[-1].rate
    lines = []
    with tempfile.TemporaryDirectory(prefix="bench-speed-") as tmp:
        folder = Path(tmp)
        run_settings = settings.model_copy(update={"qdrant_path": folder / "store", "qdrant_url": None})
        store = ProductStore(open_client(run_settings))
        try:
            (folder / "a").mkdir()
            throughput = write_catalogue(folder / "a", sample, len(sample))
            first = ingest(run_settings, store, encoder, text_encoder, throughput, "throughput")
            rows.append(
                Row(
                    f"ingest end to end, {len(sample)} products with one photo each, fresh store",
                    first.images_embedded,
                    first.seconds,
                    f"{first.new} new",
                )
            )
            e2e_rate = rows[-1].rate
            big = folder / "b"
            big.mkdir()
            catalogue = write_catalogue(big, paths, products)
            full = ingest(run_settings, store, encoder, text_encoder, catalogue, "reingest")
            again = ingest(run_settings, store, encoder, text_encoder, catalogue, "reingest")
            changed = change_prices(catalogue, 0.1)
            edited = ingest(run_settings, store, encoder, text_encoder, catalogue, "reingest")
        finally:
            store.close()
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    lines.append("| what | images | s | images/s |")
    lines.append("| --- | --- | --- | --- |")
    lines += [f"| {r.what} | {r.images} | {r.seconds:.1f} | {r.rate:.1f} |" for r in rows]
    lines.append("")
    lines.append(f"- end to end / model alone ({precision}): **{e2e_rate / model_rate:.2f}** (target >= 0.85)")
    lines.append(f"- end to end / naive loop: **{e2e_rate / naive_rate:.2f}x** (target >= 2.5x)")
    lines.append("")
    lines.append("| catalogue run | products | new / updated / unchanged | images embedded | s |")
    lines.append("| --- | --- | --- | --- | --- |")
    for label, report in (
        ("first ingest", full),
        ("again, unchanged", again),
        (f"again, {changed} prices changed", edited),
    ):
        lines.append(
            f"| {label} | {report.read} | {report.new} / {report.updated} / {report.unchanged} | "
            f"{report.images_embedded} | {report.seconds:.1f} |"
        )
    lines.append("")
    lines.append(f"- unchanged re-ingest speed-up: **{full.seconds / max(again.seconds, 1e-9):.1f}x** (target >= 20x)")
    lines.append(f"- peak RSS of the run: {peak_gib:.2f} GiB")
    return "\n".join(lines)
