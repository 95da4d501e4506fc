"""`python -m bench.store_scale --points 100000`: the embedded stores at catalogue scale, side by side.

Builds N synthetic products in our collection layout (image: a one-row 1280-d multivector, text: 384-d,
lexical: ~10 sparse terms from a Zipf-like vocabulary; payload with 20 retailers, a 4 x 5 x 10 category
tree of 200 leaves, 300 brands, a price), loads them into qdrant-client local mode on disk and into
`EdgeStore` (qdrant-edge-py), and runs the same queries on both: RRF of image + text + lexical with a
category filter that keeps ~5% of the catalogue (one level-2 category), top 10.

Each backend loads in one child process and is queried in another (reopened from disk), so peak RSS is
per backend and per phase. The parent prints a Markdown table: load and open seconds, query p50 / p95,
peak RSS and, after the filtered queries, resident memory split into the process's own (anonymous) and
mapped files (page cache the kernel may drop), disk bytes per point, and recall@10 of edge against local
mode's exact results on the same data and against its own exact search. `--quantization` adds an edge store
with int8 scalar-quantized vectors in RAM and the original vectors memory-mapped from disk, queried with
rescoring (oversampling 2) as `ProductStore` queries a quantized collection.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from qdrant_client import QdrantClient, models

from retrieval.search import fused_request
from retrieval.store import IMAGE_VECTOR, LEXICAL_VECTOR, TEXT_VECTOR, EncoderFingerprint, ProductStore, QdrantBackend
from retrieval.store.edge import EdgeStore
from retrieval.store.layout import StorageLayout, rescored

IMAGE_DIM = 1280
TEXT_DIM = 384
VOCABULARY = 30_000
RETAILERS = 20
DEPARTMENTS, AISLES, SHELVES = 4, 5, 10  # 200 leaves; one aisle (level 2) is 1/20 = 5% of the catalogue
BRANDS = 300
BLOCK = 1_000  # products per generation block: any product is reproducible from its block's seed
COLLECTION = "bench"
TOP = 10
# Queries run before the timed ones, near other products: a store opened from disk pages its vectors in as
# queries touch them (an int8 store's originals especially, read when rescoring), and a service that has run
# for a while has them in memory. 5 at first; the first quarter of 200 timed queries on an int8 store of
# 500k then had p95 63 ms against 28-32 ms for the other three.
WARMUP = 50
# Local mode commits every point to SQLite on its own (~265 points/s here) and evaluates filters in Python
# (1.8 s per filtered fused query at 20k, growing linearly): at 100k, ~6 min to load and ~30 min for 200
# queries (extrapolated), so by default it is measured at 20k and edge is compared with it at that size too.
LOCAL_POINTS = 20_000
ROOT = Path(__file__).resolve().parent.parent
WORDS = "fresh organic light classic premium original natural extra mild strong small large family pack".split()


# -- synthetic catalogue -------------------------------------------------------------------------------------


def fused(
    store: EdgeStore, rankings: Any, *, rescore: models.SearchParams | None = None, **options: Any
) -> list[models.ScoredPoint]:
    """The rankings fused as the engine fuses them (`fused_request`), on the edge store; `rescore`: the
    search params a quantized store's dense rankings get (as `ProductStore` asks them)."""
    request = fused_request(rankings, **options)
    return store.query(rescored(request, rescore) if rescore is not None else request)


def _unit(a: np.ndarray) -> np.ndarray:
    norms: np.ndarray = np.linalg.norm(a, axis=-1, keepdims=True)
    return np.asarray(a / norms, dtype=np.float32)


def _zipf_probabilities() -> np.ndarray:
    weights = 1.0 / np.arange(1, VOCABULARY + 1) ** 1.1
    return np.asarray(weights / weights.sum())


@dataclass
class Block:
    """Products [start, start + len) of the synthetic catalogue."""

    start: int
    image: np.ndarray  # (n, IMAGE_DIM) unit rows: each product's single photo
    text: np.ndarray  # (n, TEXT_DIM) unit rows
    terms: list[np.ndarray]  # sorted unique term ids per product
    weights: list[np.ndarray]  # BM25-like term weights
    leaf: np.ndarray  # category leaf 0..199
    retailer: np.ndarray
    brand: np.ndarray
    price: np.ndarray


def make_block(seed: int, index: int, points: int, probabilities: np.ndarray) -> Block:
    start = index * BLOCK
    n = min(BLOCK, points - start)
    rng = np.random.default_rng([seed, index])
    image = _unit(rng.standard_normal((n, IMAGE_DIM), dtype=np.float32))
    text = _unit(rng.standard_normal((n, TEXT_DIM), dtype=np.float32))
    drawn = rng.choice(VOCABULARY, size=(n, 12), p=probabilities)
    terms = [np.unique(row) for row in drawn]
    weights = [rng.uniform(0.6, 2.2, size=len(t)).astype(np.float32) for t in terms]
    return Block(
        start=start,
        image=image,
        text=text,
        terms=terms,
        weights=weights,
        leaf=rng.integers(0, DEPARTMENTS * AISLES * SHELVES, size=n),
        retailer=rng.integers(0, RETAILERS, size=n),
        brand=rng.integers(0, BRANDS, size=n),
        price=np.round(rng.lognormal(3.0, 1.0, size=n), 2),
    )


def category(leaf: int) -> list[str]:
    """The product's category prefixes, as `category_prefixes` stores them (department, aisle, shelf)."""
    department, aisle, shelf = leaf // (AISLES * SHELVES), (leaf // SHELVES) % AISLES, leaf % SHELVES
    top = f"Department {department}"
    return [top, f"{top} > Aisle {aisle}", f"{top} > Aisle {aisle} > Shelf {shelf}"]


def point_uuid(index: int) -> str:
    return str(uuid.UUID(int=index + 1))


def block_points(block: Block) -> list[models.PointStruct]:
    points = []
    for i in range(len(block.leaf)):
        index = block.start + i
        prefixes = category(int(block.leaf[i]))
        words = " ".join(WORDS[(index * 7 + k) % len(WORDS)] for k in range(24))
        payload = {
            "product_id": str(index),
            "retailer": f"retailer-{int(block.retailer[i]):02d}",
            "brand": f"brand-{int(block.brand[i]):03d}",
            "title": f"Product {index} {words[:40]}",
            "description": words,
            "category_path": prefixes[-1],
            "category_prefixes": prefixes,
            "price": float(block.price[i]),
            "currency": "EUR",
            "content_hash": f"{index:064x}",
        }
        vector: dict[str, Any] = {
            IMAGE_VECTOR: [block.image[i].tolist()],
            TEXT_VECTOR: block.text[i].tolist(),
            LEXICAL_VECTOR: models.SparseVector.model_construct(
                indices=block.terms[i].tolist(), values=block.weights[i].tolist()
            ),
        }
        # Built without validation for both backends alike: it is the same work for each, not theirs.
        points.append(models.PointStruct.model_construct(id=point_uuid(index), vector=vector, payload=payload))
    return points


def catalogue(seed: int, points: int) -> Iterator[list[models.PointStruct]]:
    probabilities = _zipf_probabilities()
    for index in range((points + BLOCK - 1) // BLOCK):
        yield block_points(make_block(seed, index, points, probabilities))


def make_queries(seed: int, points: int, count: int) -> list[dict[str, Any]]:
    """Queries near random products among the first `points`: a noisy copy of the product's photo and text
    vectors, 3 of its terms plus 2 others, and a filter on its aisle (~5% of the catalogue)."""
    rng = np.random.default_rng([seed, 1_000_003])
    probabilities = _zipf_probabilities()
    picked = np.sort(rng.choice(points, size=count, replace=False))
    blocks: dict[int, Block] = {}
    queries = []
    for index in picked.tolist():
        b = index // BLOCK
        if b not in blocks:
            blocks[b] = make_block(seed, b, points, probabilities)
        block, i = blocks[b], index - b * BLOCK
        own = rng.choice(block.terms[i], size=min(3, len(block.terms[i])), replace=False)
        terms = np.unique(np.concatenate([own, rng.choice(VOCABULARY, size=2, p=probabilities)]))
        queries.append(
            {
                "product": index,
                "image": _unit(block.image[i] + 0.08 * rng.standard_normal(IMAGE_DIM).astype(np.float32)).tolist(),
                "text": _unit(block.text[i] + 0.08 * rng.standard_normal(TEXT_DIM).astype(np.float32)).tolist(),
                "terms": terms.tolist(),
                "category": category(int(block.leaf[i]))[1],
            }
        )
    order = rng.permutation(len(queries))  # generated in product order (one block at a time), run at random
    return [queries[i] for i in order]


def rankings(query: dict[str, Any]) -> list[tuple[str, Any]]:
    lexical = models.SparseVector(indices=query["terms"], values=[1.0] * len(query["terms"]))
    return [(IMAGE_VECTOR, [query["image"]]), (TEXT_VECTOR, query["text"]), (LEXICAL_VECTOR, lexical)]


def category_filter(query: dict[str, Any]) -> models.Filter:
    return models.Filter(
        must=[models.FieldCondition(key="category_prefixes", match=models.MatchValue(value=query["category"]))]
    )


# -- workers (one child process per backend and phase) ---------------------------------------------------


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def local_client(path: Path) -> QdrantClient:
    warnings.filterwarnings("ignore", message=".*[Ll]ocal mode.*")
    warnings.filterwarnings("ignore", message="Payload indexes have no effect")
    return QdrantClient(path=str(path))


def load_local(path: Path, seed: int, points: int) -> dict[str, Any]:
    client = local_client(path)
    ProductStore(QdrantBackend(client)).ensure_catalogue(
        COLLECTION, EncoderFingerprint("synthetic", IMAGE_DIM, "synthetic", TEXT_DIM)
    )
    spent = 0.0
    for batch in catalogue(seed, points):
        started = time.perf_counter()
        client.upsert(COLLECTION, points=batch, wait=True)
        spent += time.perf_counter() - started
    started = time.perf_counter()
    client.close()
    return {"load_s": spent + time.perf_counter() - started, "load_rss_mb": peak_rss_mb()}


def load_edge(path: Path, seed: int, points: int, optimize: bool, quantization: str) -> dict[str, Any]:
    """Load the catalogue; `optimize` builds HNSW, or with int8 the quantized segments (no graph)."""
    started = time.perf_counter()
    int8 = quantization == "int8"  # with the originals on disk, as a million products would be kept
    store = EdgeStore.open(path, image_dim=IMAGE_DIM, text_dim=TEXT_DIM, quantization=quantization, on_disk=int8)
    spent = time.perf_counter() - started
    for batch in catalogue(seed, points):
        started = time.perf_counter()
        store.upsert(batch)
        spent += time.perf_counter() - started
    started = time.perf_counter()
    store.flush()
    spent += time.perf_counter() - started
    result: dict[str, Any] = {"load_s": spent, "info": store.info()}
    if optimize:
        started = time.perf_counter()
        store.optimize()
        result["optimize_s"] = time.perf_counter() - started
        result["info_optimized"] = store.info()
    started = time.perf_counter()
    store.close()
    result["load_s"] += time.perf_counter() - started
    result["load_rss_mb"] = peak_rss_mb()
    return result


def timed_queries(run: Any, queries: list[dict[str, Any]], *, filtered: bool) -> tuple[list[float], list[Any]]:
    """Run the first WARMUP queries untimed, then time the rest."""
    for query in queries[:WARMUP]:
        run(query, filtered)
    times, results = [], []
    for query in queries[WARMUP:]:
        started = time.perf_counter()
        points = run(query, filtered)
        times.append((time.perf_counter() - started) * 1000)
        results.append([[str(p.id), float(p.score)] for p in points])
    return times, results


def query_local(path: Path, queries: list[dict[str, Any]], unfiltered: bool, quantization: str) -> dict[str, Any]:
    started = time.perf_counter()
    client = local_client(path)
    opened = time.perf_counter() - started
    names = [IMAGE_VECTOR, TEXT_VECTOR, LEXICAL_VECTOR]

    def run(query: dict[str, Any], filtered: bool) -> list[models.ScoredPoint]:
        flt = category_filter(query) if filtered else None
        return client.query_points(
            COLLECTION,
            prefetch=[models.Prefetch(query=v, using=n, filter=flt, limit=50) for n, v in rankings(query)],
            query=models.FusionQuery(fusion=models.Fusion.RRF),
            query_filter=flt,
            limit=TOP,
            with_payload=True,
            with_vectors=names,
        ).points

    out: dict[str, Any] = {"open_s": opened}
    out["filtered_ms"], out["filtered"] = timed_queries(run, queries, filtered=True)
    out["memory"] = memory_now()
    if unfiltered:
        out["unfiltered_ms"], out["unfiltered"] = timed_queries(run, queries, filtered=False)
    client.close()
    out["serve_rss_mb"] = peak_rss_mb()
    return out


def query_edge(path: Path, queries: list[dict[str, Any]], unfiltered: bool, quantization: str) -> dict[str, Any]:
    """The same fused queries through EdgeStore, plus each filtered query again with exact=True (full
    scoring on the original vectors, HNSW and quantization bypassed): the reference an indexed or quantized
    store is compared with. A quantized store's dense rankings ask for rescoring as the product's do."""
    started = time.perf_counter()
    store = EdgeStore.open(path)
    opened = time.perf_counter() - started
    names = [IMAGE_VECTOR, TEXT_VECTOR, LEXICAL_VECTOR]

    rescore = StorageLayout(quantization=quantization).search_params()

    def search(query: dict[str, Any], filtered: bool, exact: bool) -> list[models.ScoredPoint]:
        return fused(
            store,
            rankings(query),
            rescore=None if exact else rescore,
            query_filter=category_filter(query) if filtered else None,
            limit=TOP,
            prefetch_limit=50,
            with_vectors=names,
            exact=exact,
        )

    def run(query: dict[str, Any], filtered: bool) -> list[models.ScoredPoint]:
        return search(query, filtered, False)

    def run_exact(query: dict[str, Any], filtered: bool) -> list[models.ScoredPoint]:
        return search(query, filtered, True)

    out: dict[str, Any] = {"open_s": opened, "info": store.info()}
    out["filtered_ms"], out["filtered"] = timed_queries(run, queries, filtered=True)
    # Memory as the service would hold it: after the filtered queries, before the exact ones (which read
    # every original vector of the filtered points) and the unfiltered ones (which read them all).
    out["serve_rss_mb"], out["memory"] = peak_rss_mb(), memory_now()
    out["exact_ms"], out["exact"] = timed_queries(run_exact, queries, filtered=True)
    if unfiltered:
        out["unfiltered_ms"], out["unfiltered"] = timed_queries(run, queries, filtered=False)
    store.close()
    return out


def memory_now() -> dict[str, float]:
    """This process's resident memory now, MB: anonymous (its own) and file-backed (mapped files, page
    cache the kernel can drop), from /proc/self/status."""
    fields = {"RssAnon": "anon_mb", "RssFile": "file_mb"}
    found: dict[str, float] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in fields:
            found[fields[key]] = int(line.split()[1]) / 1024
    return found


def worker(args: argparse.Namespace) -> int:
    path, out = Path(args.store), Path(args.result)
    result: dict[str, Any]
    if args.phase == "load":
        if args.worker == "local":
            result = load_local(path, args.seed, args.points)
        else:
            result = load_edge(path, args.seed, args.points, args.optimize, args.storage)
    else:
        queries = json.loads(Path(args.queries_path).read_text())
        run = query_local if args.worker == "local" else query_edge
        result = run(path, queries, args.unfiltered, args.storage)
    out.write_text(json.dumps(result))
    return 0


# -- the parent: run the workers, compare, print ------------------------------------------------------------


def spawn(backend: str, phase: str, store: Path, result: Path, options: list[str]) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.store_scale", "--worker", backend, "--phase", phase]
    command += ["--store", str(store), "--result", str(result), *options]
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    print(f"  {backend} {phase}: {time.perf_counter() - started:.1f} s", flush=True)
    loaded: dict[str, Any] = json.loads(result.read_text())
    return loaded


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def recall_at(found: list[list[Any]], exact: list[list[Any]]) -> float:
    """Mean share of the exact top-k found, counting a result tied with the exact k-th score as found
    (RRF scores tie often: which of the tied ids makes the cut is arbitrary)."""
    shares = []
    for got, want in zip(found, exact, strict=True):
        wanted = {pid for pid, _ in want}
        cut = want[-1][1] if want else float("inf")
        hits = sum(1 for pid, score in got if pid in wanted or abs(score - cut) < 1e-6)
        shares.append(min(hits, len(want)) / max(len(want), 1))
    return float(np.mean(shares)) if shares else float("nan")


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.store_scale", description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=100_000, help="products in the edge store")
    parser.add_argument(
        "--local-points", type=int, help=f"products in local mode (default: {LOCAL_POINTS} or --points if fewer)"
    )
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--backends", nargs="+", choices=["local", "edge"], default=["local", "edge"])
    parser.add_argument("--optimize", action="store_true", help="also build HNSW (EdgeStore.optimize) and query again")
    parser.add_argument(
        "--quantization",
        action="store_true",
        help="also an edge store with int8 quantized vectors in RAM and the originals on disk (optimized, no graph)",
    )
    parser.add_argument("--unfiltered", action="store_true", help="also time the queries without the filter")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="where the stores go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the stores afterwards")
    # internal: one backend and phase in a child process
    parser.add_argument("--storage", dest="storage", choices=["none", "int8"], default="none", help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=["local", "edge"], help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=["load", "query"], help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--queries-file", dest="queries_path", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    local_points = min(args.local_points or LOCAL_POINTS, args.points)
    # (label, backend, points, optimize, quantization): local mode at its size, edge at the same size (recall
    # against local mode's exact results on identical data), edge at full size, then with HNSW built, then
    # int8-quantized (optimize() without a graph) with the original vectors on disk.
    plan: list[tuple[str, str, int, bool, str]] = []
    if "local" in args.backends:
        plan.append(("local mode", "local", local_points, False, "none"))
    if "edge" in args.backends:
        if "local" in args.backends and local_points != args.points:
            plan.append(("edge, plain segments", "edge", local_points, False, "none"))
        plan.append(("edge, plain segments", "edge", args.points, False, "none"))
        if args.optimize:
            plan.append(("edge, HNSW (optimize)", "edge", args.points, True, "none"))
        if args.quantization:
            label = "edge, int8 in RAM, originals on disk (optimize, no graph)"
            plan.append((label, "edge", args.points, True, "int8"))
    work = Path(tempfile.mkdtemp(prefix="store-scale-", dir=args.workdir))
    query_points = min(points for _, _, points, _, _ in plan)
    queries = make_queries(args.seed, query_points, args.queries + WARMUP)
    queries_file = work / "queries.json"
    queries_file.write_text(json.dumps(queries))
    print(
        f"{args.queries} queries near products < {query_points}; stores in {work}; "
        f"{os.cpu_count()} CPUs, 1-minute load average {loadavg()} at start",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    try:
        for n, (label, backend, points, optimize, quantization) in enumerate(plan):
            store, prefix = work / f"{n}-{backend}", str(work / f"{n}-{backend}")
            load_options = ["--seed", str(args.seed), "--points", str(points), "--storage", quantization]
            load_options += ["--optimize"] * optimize
            loaded = spawn(backend, "load", store, Path(prefix + "-load.json"), load_options)
            query_options = ["--queries-file", str(queries_file), "--storage", quantization]
            query_options += ["--unfiltered"] * args.unfiltered
            served = spawn(backend, "query", store, Path(prefix + "-query.json"), query_options)
            disk = folder_bytes(store)
            rows.append({"label": label, "backend": backend, "points": points, "disk": disk, **loaded, **served})
            if not args.keep:
                shutil.rmtree(store, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(report(rows, load_end=loadavg()))
    return 0


def folder_bytes(folder: Path) -> int:
    """Bytes the files under `folder` take on disk (allocated blocks: sparse files count what they hold)."""
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def report(rows: list[dict[str, Any]], *, load_end: str) -> str:
    local = {r["points"]: r for r in rows if r["backend"] == "local"}
    lines = [
        "| backend | points | load s | optimize s | open s | filtered p50 ms | filtered p95 ms | "
        "unfiltered p50 / p95 ms | peak RSS load MB | peak RSS serve MB | RSS anon / file MB | disk bytes / point | "
        "recall@10 vs local mode | recall@10 vs edge exact |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        edge = row["backend"] == "edge"
        versus_local = "reference" if not edge else "-"
        if edge and row["points"] in local:
            versus_local = f"{recall_at(row['filtered'], local[row['points']]['filtered']):.3f}"
        versus_exact = f"{recall_at(row['filtered'], row['exact']):.3f}" if edge else "-"
        unfiltered = "-"
        if row.get("unfiltered_ms"):
            unfiltered = f"{percentile(row['unfiltered_ms'], 50):.1f} / {percentile(row['unfiltered_ms'], 95):.1f}"
        cells = [
            row["label"],
            str(row["points"]),
            f"{row['load_s']:.1f}",
            f"{row['optimize_s']:.1f}" if "optimize_s" in row else "-",
            f"{row['open_s']:.2f}",
            f"{percentile(row['filtered_ms'], 50):.1f}",
            f"{percentile(row['filtered_ms'], 95):.1f}",
            unfiltered,
            f"{row['load_rss_mb']:.0f}",
            f"{row['serve_rss_mb']:.0f}",
            f"{row['memory'].get('anon_mb', float('nan')):.0f} / {row['memory'].get('file_mb', float('nan')):.0f}",
            f"{row['disk'] / row['points']:.0f}",
            versus_local,
            versus_exact,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for row in rows:
        if row["backend"] == "edge":
            exact = f"{percentile(row['exact_ms'], 50):.1f} / {percentile(row['exact_ms'], 95):.1f}"
            lines.append(f"- {row['label']}, {row['points']}: shard {row['info']}; exact=True p50 / p95 {exact} ms")
    lines.append(f"- 1-minute load average at end: {load_end}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
