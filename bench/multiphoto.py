"""`python -m bench.multiphoto`: several photos per product, a multivector point versus a point per photo.

Issue 5. The Grocery Store Dataset's fine classes are the products: each gets K of its train photos
(K = 1, 3, 5 by default, evenly spaced through the class's photo list so the K shots are not neighbours),
and the val photos are the queries (the right answer is their class). Every photo is embedded once with
the project's image encoder and the same vectors feed both layouts and every K:

- A: one point per product, the photos as an `image` multivector with MAX_SIM (the project's layout);
  queried with a one-row multivector, top 10 points.
- B: one point per photo (a plain cosine vector, payload `product_id`), queried with
  `query_points_groups(group_by="product_id", group_size=1)`, top 10 groups.

Both run in qdrant-client's embedded local mode (`QdrantClient(path=...)`). With one query row, MAX_SIM
is the best photo's cosine, which is exactly what best-photo grouping ranks by, so the two should rank
the same products in the same order; the script checks that query by query and reports any difference.
`--distractors N` adds N synthetic products (K random unit vectors each) to both collections, for speed
at a larger size (they never match, so recall is unaffected apart from displacing real products).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from qdrant_client import QdrantClient, models

IMAGE_VECTOR = "image"
DEFAULT_DATASET = Path("../shared/data/grocery/dataset")
DEFAULT_OUT = Path("docs/benchmarks/multiphoto.md")
DEFAULT_MODEL = "timm:tf_efficientnet_lite0"
TOP = 10
BATCH = 256
CONCLUSION = "## Conclusion"


@dataclass(frozen=True)
class Photo:
    path: Path
    label: str  # the fine class id, used as product_id


@dataclass
class Run:
    layout: str
    k: int
    points: int
    products: int
    ranked: list[list[str]]  # per query, product ids best first
    scores: list[list[float]]
    latencies_ms: list[float]
    build_s: float


def read_split(dataset: Path, split: str) -> list[Photo]:
    """`train.txt` / `val.txt`: `relative/path.jpg, fine class id, coarse class id` per line."""
    photos = []
    for line in (dataset / f"{split}.txt").read_text().splitlines():
        if not line.strip():
            continue
        rel, fine, _coarse = (part.strip() for part in line.split(","))
        photos.append(Photo(dataset / rel, fine))
    return photos


def pick_evenly(items: list[Photo], k: int) -> list[Photo]:
    """k items spread evenly through the list (the first when k = 1)."""
    if k >= len(items):
        return list(items)
    return [items[(i * len(items)) // k] for i in range(k)]


def cap_queries(photos: list[Photo], per_class: int | None) -> list[Photo]:
    if per_class is None:
        return photos
    by_class: dict[str, list[Photo]] = defaultdict(list)
    for photo in photos:
        by_class[photo.label].append(photo)
    return [p for label in sorted(by_class, key=int) for p in pick_evenly(by_class[label], per_class)]


def embed(model: str, paths: list[Path]) -> np.ndarray:
    from retrieval.encoders import load_image_encoder
    from retrieval.encoders.base import embed_images

    encoder = load_image_encoder(model)
    out = []
    for start in range(0, len(paths), BATCH):
        images = []
        for path in paths[start : start + BATCH]:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        out.append(embed_images(encoder, images))
    return np.concatenate(out).astype(np.float32)


def point_uuid(*parts: object) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "\x1f".join(map(str, parts))))


def random_unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    normalised: np.ndarray = x / np.linalg.norm(x, axis=1, keepdims=True)
    return normalised


def build_a(client: QdrantClient, products: dict[str, np.ndarray], dim: int) -> int:
    name = "a"
    client.create_collection(
        name,
        vectors_config={
            IMAGE_VECTOR: models.VectorParams(
                size=dim,
                distance=models.Distance.COSINE,
                multivector_config=models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM),
            )
        },
    )
    points = [
        models.PointStruct(id=point_uuid(pid), vector={IMAGE_VECTOR: rows.tolist()}, payload={"product_id": pid})
        for pid, rows in products.items()
    ]
    for start in range(0, len(points), 512):
        client.upsert(name, points[start : start + 512], wait=True)
    return client.count(name, exact=True).count


def build_b(client: QdrantClient, products: dict[str, np.ndarray], dim: int) -> int:
    name = "b"
    client.create_collection(name, vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE))
    points = [
        models.PointStruct(id=point_uuid(pid, i), vector=row.tolist(), payload={"product_id": pid})
        for pid, rows in products.items()
        for i, row in enumerate(rows)
    ]
    for start in range(0, len(points), 512):
        client.upsert(name, points[start : start + 512], wait=True)
    return client.count(name, exact=True).count


def query_a(client: QdrantClient, vector: np.ndarray) -> tuple[list[str], list[float]]:
    points = client.query_points("a", query=[vector.tolist()], using=IMAGE_VECTOR, limit=TOP, with_payload=True).points
    return [str((p.payload or {})["product_id"]) for p in points], [p.score for p in points]


def query_b(client: QdrantClient, vector: np.ndarray) -> tuple[list[str], list[float]]:
    groups = client.query_points_groups(
        "b", query=vector.tolist(), group_by="product_id", group_size=1, limit=TOP, with_payload=False
    ).groups
    return [str(g.id) for g in groups], [g.hits[0].score for g in groups]


def run_layout(layout: str, k: int, products: dict[str, np.ndarray], queries: np.ndarray, warmup: int) -> Run:
    folder = Path(tempfile.mkdtemp(prefix=f"multiphoto-{layout}{k}-"))
    try:
        client = QdrantClient(path=str(folder))
        dim = queries.shape[1]
        started = time.perf_counter()
        points = (build_a if layout == "A" else build_b)(client, products, dim)
        build_s = time.perf_counter() - started
        search = query_a if layout == "A" else query_b
        for vector in queries[:warmup]:
            search(client, vector)
        ranked, scores, latencies = [], [], []
        for vector in queries:
            began = time.perf_counter()
            ids, sc = search(client, vector)
            latencies.append((time.perf_counter() - began) * 1000)
            ranked.append(ids)
            scores.append(sc)
        client.close()
        return Run(layout, k, points, len(products), ranked, scores, latencies, build_s)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def recall_at(run: Run, answers: list[str], n: int) -> float:
    return float(np.mean([answer in ids[:n] for ids, answer in zip(run.ranked, answers, strict=True)]))


def mrr(run: Run, answers: list[str]) -> float:
    return float(
        np.mean(
            [
                1.0 / (ids.index(answer) + 1) if answer in ids else 0.0
                for ids, answer in zip(run.ranked, answers, strict=True)
            ]
        )
    )


def compare(a: Run, b: Run, tolerance: float = 1e-4) -> str:
    """Queries whose top-10 product lists differ, and of those how many differ only where scores tie."""
    differ = tie_only = 0
    worst = 0.0
    for ids_a, ids_b, sc_a, sc_b in zip(a.ranked, b.ranked, a.scores, b.scores, strict=True):
        worst = max(worst, float(np.max(np.abs(np.array(sc_a) - np.array(sc_b)))) if sc_a and sc_b else 0.0)
        if ids_a == ids_b:
            continue
        differ += 1
        if np.allclose(sc_a, sc_b, atol=tolerance) and set(ids_a[:-1]) <= set(ids_b):
            tie_only += 1
    text = f"{differ} of {len(a.ranked)} differ"
    if differ:
        text += f" ({tie_only} only among tied scores)"
    return f"{text}; max score gap {worst:.1e}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.multiphoto", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 3, 5], help="train photos per product")
    parser.add_argument("--queries-per-class", type=int, default=None, help="cap val queries per class (all)")
    parser.add_argument("--distractors", type=int, default=0, help="synthetic extra products (speed at size)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown report ('-' to skip)")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    train = read_split(args.dataset, "train")
    by_class: dict[str, list[Photo]] = defaultdict(list)
    for photo in train:
        by_class[photo.label].append(photo)
    max_k = max(args.ks)
    chosen = {label: pick_evenly(photos, max_k) for label, photos in by_class.items()}
    gallery = [p for label in sorted(chosen, key=int) for p in chosen[label]]
    queries = cap_queries(read_split(args.dataset, "val"), args.queries_per_class)
    answers = [q.label for q in queries]

    embed_started = time.perf_counter()
    vectors = embed(args.model, [p.path for p in gallery] + [q.path for q in queries])
    embed_s = time.perf_counter() - embed_started
    n_photos = len(gallery) + len(queries)
    print(f"embedded {n_photos} photos in {embed_s:.1f} s ({n_photos / embed_s:.0f} img/s)", file=sys.stderr)
    gallery_vectors = vectors[: len(gallery)]
    query_vectors = vectors[len(gallery) :]
    index = {p.path: i for i, p in enumerate(gallery)}

    rng = np.random.default_rng(0)
    distractor_rows = random_unit(rng, args.distractors * max_k, vectors.shape[1])
    rows = ["| K | layout | products | points | R@1 | R@5 | MRR | query p50 ms | query p95 ms | build s |"]
    rows.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    checks = []
    for k in args.ks:
        products = {
            label: gallery_vectors[[index[p.path] for p in pick_evenly(photos, k)]] for label, photos in chosen.items()
        }
        for d in range(args.distractors):
            products[f"distractor-{d}"] = distractor_rows[d * max_k : d * max_k + k]
        runs = [run_layout(layout, k, products, query_vectors, args.warmup) for layout in ("A", "B")]
        for run in runs:
            p50, p95 = np.percentile(run.latencies_ms, [50, 95])
            name = "A multivector MAX_SIM" if run.layout == "A" else "B point per photo, grouped"
            rows.append(
                f"| {k} | {name} | {run.products} | {run.points} | {recall_at(run, answers, 1):.3f} "
                f"| {recall_at(run, answers, 5):.3f} | {mrr(run, answers):.3f} | {p50:.2f} | {p95:.2f} "
                f"| {run.build_s:.2f} |"
            )
        checks.append(f"- K={k}: top-10 product lists of A vs B: {compare(runs[0], runs[1])}")
        print(rows[-2], rows[-1], sep="\n", file=sys.stderr)

    total_s = time.perf_counter() - started
    command = " ".join(["python -m bench.multiphoto", *(sys.argv[1:] if argv is None else argv)])
    setup = (
        f"{len(chosen)} products (grocery fine classes), K train photos each (evenly spaced in the class's list), "
        f"{len(queries)} val photo queries over {len(set(answers))} classes"
        + (f" (capped at {args.queries_per_class} per class)" if args.queries_per_class else "")
        + (f", plus {args.distractors} synthetic distractor products" if args.distractors else "")
        + f"; encoder {args.model}; top {TOP}; embedded local mode; {n_photos} photos embedded once "
        f"in {embed_s:.1f} s; total {total_s:.0f} s."
    )
    report = "\n".join([*rows, "", setup, "", "Same ranking check (A and B should agree exactly):", *checks])
    print(report)
    if str(args.out) != "-":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        # A hand-written "## Conclusion" section already in the file is kept below the new numbers.
        old = args.out.read_text() if args.out.is_file() else ""
        kept = old[old.index(CONCLUSION) :] if CONCLUSION in old else ""
        title = "# Several photos per product: multivector vs point per photo"
        args.out.write_text(f"{title}\n\n`{command}`\n\n{report}\n" + (f"\n{kept}" if kept else ""))
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
