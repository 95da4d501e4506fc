"""EdgeStore (qdrant-edge-py) on a small collection, checked against qdrant-client local mode on the same data."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from qdrant_client import QdrantClient, models

from retrieval.search import build_filter, fused_request, fusion_query
from retrieval.store import (
    IMAGE_VECTOR,
    LEXICAL_VECTOR,
    PAYLOAD_INDEXES,
    TEXT_VECTOR,
    EncoderFingerprint,
    ProductStore,
    QdrantBackend,
    StoreError,
)
from retrieval.store.edge import EdgeStore, EdgeStoreBusy, EdgeUnsupported
from schemas.search import SearchFilters, SearchOptions

ROOT = Path(__file__).resolve().parents[2]
N, IMAGE_DIM, TEXT_DIM, VOCABULARY = 300, 16, 8, 40
NAMES = [IMAGE_VECTOR, TEXT_VECTOR, LEXICAL_VECTOR]


def fused(store: EdgeStore, rankings: Any, **options: Any) -> list[models.ScoredPoint]:
    """The rankings fused as the engine fuses them (`fused_request`), on the edge store."""
    return store.query(fused_request(rankings, **options))


def unit(a: np.ndarray) -> np.ndarray:
    norms: np.ndarray = np.linalg.norm(a, axis=-1, keepdims=True)
    return np.asarray(a / norms)


def make_points(seed: int = 7, n: int = N) -> list[models.PointStruct]:
    """Products with 1-3 photos each, a text vector, ~5 lexical terms and a payload like ours."""
    rng = np.random.default_rng(seed)
    points = []
    for i in range(n):
        terms = sorted(rng.choice(VOCABULARY, size=5, replace=False).tolist())
        aisle = f"Food > Aisle {i % 5}"
        points.append(
            models.PointStruct(
                id=str(uuid.UUID(int=i + 1)),
                vector={
                    IMAGE_VECTOR: unit(rng.normal(size=(1 + i % 3, IMAGE_DIM))).tolist(),
                    TEXT_VECTOR: unit(rng.normal(size=TEXT_DIM)).tolist(),
                    LEXICAL_VECTOR: models.SparseVector(indices=terms, values=rng.uniform(0.5, 2.0, 5).tolist()),
                },
                payload={
                    "product_id": str(i),
                    "retailer": f"shop-{i % 4}",
                    "brand": f"brand-{i % 7}",
                    "category_prefixes": ["Food", aisle],
                    "category_path": aisle,
                    "price": float(i % 50),
                    "attributes": {"colour": ["red", "green", "blue"][i % 3]},
                },
            )
        )
    return points


@pytest.fixture(scope="module")
def points() -> list[models.PointStruct]:
    return make_points()


@pytest.fixture(scope="module")
def edge_store(tmp_path_factory: pytest.TempPathFactory, points: list[models.PointStruct]) -> Iterator[EdgeStore]:
    store = EdgeStore.open(tmp_path_factory.mktemp("edge") / "catalogue", image_dim=IMAGE_DIM, text_dim=TEXT_DIM)
    assert store.upsert(points, batch_size=128) == N
    yield store
    store.close()


@pytest.fixture(scope="module")
def local(points: list[models.PointStruct]) -> Iterator[QdrantClient]:
    """The same data in qdrant-client local mode, with the layout ProductStore creates: exact search."""
    client = QdrantClient(":memory:")
    ProductStore(QdrantBackend(client)).ensure_catalogue("c", EncoderFingerprint("image", IMAGE_DIM, "text", TEXT_DIM))
    client.upsert("c", points=points)
    yield client
    client.close()


@pytest.fixture
def small_store(tmp_path: Path) -> Iterator[EdgeStore]:
    """A store of its own for tests that change data or hold the lock."""
    store = EdgeStore.open(tmp_path / "catalogue", image_dim=IMAGE_DIM, text_dim=TEXT_DIM)
    store.upsert(make_points(seed=11, n=40))
    yield store
    store.close()


def named(vector: object) -> dict[str, Any]:
    """A point's named vectors (stored and returned points carry a dict of them)."""
    assert isinstance(vector, dict)
    return vector


def query_vectors(seed: int) -> list[tuple[str, list[list[float]] | list[float] | models.SparseVector]]:
    rng = np.random.default_rng(seed)
    return [
        (IMAGE_VECTOR, [unit(rng.normal(size=IMAGE_DIM)).tolist()]),
        (TEXT_VECTOR, unit(rng.normal(size=TEXT_DIM)).tolist()),
        (LEXICAL_VECTOR, models.SparseVector(indices=[1, 3, 8, 21, 34], values=[1.0] * 5)),
    ]


def assert_same_results(found: list[models.ScoredPoint], reference: list[models.ScoredPoint], limit: int) -> None:
    """Same scores rank by rank, and every id found has the reference's score for it. `reference` goes deeper
    than `limit`: which of several tied ids (RRF ties often) makes the cut is arbitrary on both sides."""
    assert len(found) == min(limit, len(reference))
    assert [p.score for p in found] == pytest.approx([p.score for p in reference[:limit]], abs=1e-5)
    deeper = {str(p.id): p.score for p in reference}
    for point in found:
        assert point.score == pytest.approx(deeper[str(point.id)], abs=1e-5)


def test_layout_vectors_and_payload_indexes(edge_store: EdgeStore, tmp_path: Path) -> None:
    config = json.loads((edge_store.folder / "shard" / "edge_config.json").read_text())
    assert config["vectors"][IMAGE_VECTOR] == {
        "size": IMAGE_DIM,
        "distance": "Cosine",
        "multivector_config": {"comparator": "max_sim"},
    }
    assert config["vectors"][TEXT_VECTOR] == {"size": TEXT_DIM, "distance": "Cosine"}
    assert config["sparse_vectors"][LEXICAL_VECTOR] == {"modifier": "idf"}
    assert set(edge_store.shard.info().payload_schema) == set(PAYLOAD_INDEXES)
    with pytest.raises(StoreError, match="give image_dim and text_dim"):
        EdgeStore.open(tmp_path / "new")


def test_upsert_count_retrieve(edge_store: EdgeStore, points: list[models.PointStruct]) -> None:
    assert edge_store.count() == N
    only = build_filter(SearchFilters(retailer=["shop-1"], price_min=10, price_max=19.5))
    expected = [
        p for p in points if p.payload and p.payload["retailer"] == "shop-1" and 10 <= p.payload["price"] <= 19.5
    ]
    assert edge_store.count(only) == len(expected) > 0

    missing = str(uuid.uuid4())
    (record,) = edge_store.retrieve([str(points[5].id), missing], with_vectors=True)
    assert record.id == points[5].id and record.payload == points[5].payload
    stored = named(record.vector)
    assert isinstance(stored[LEXICAL_VECTOR], models.SparseVector)
    assert np.allclose(stored[TEXT_VECTOR], named(points[5].vector)[TEXT_VECTOR], atol=1e-6)
    assert len(stored[IMAGE_VECTOR]) == 3  # all three photos kept as rows

    (partial,) = edge_store.retrieve([str(points[5].id)], with_payload=["retailer"], with_vectors=[TEXT_VECTOR])
    assert partial.payload == {"retailer": "shop-1"} and set(partial.vector or {}) == {TEXT_VECTOR}


@pytest.mark.parametrize(
    "where",
    [
        [{"key": "brand", "except": ["brand-1", "brand-2"]}],
        [{"key": "price", "range": {"gte": 10, "lt": 20}, "negate": True}],
        [{"key": "attributes.colour", "match": "red"}, {"key": "brand", "any": ["brand-0", "brand-2"]}],
        [{"key": "attributes.colour", "except": ["green"], "negate": True}],
    ],
    ids=["except", "negated-range", "unindexed-nested-key", "negated-except"],
)
def test_free_conditions_count_like_local_mode(
    edge_store: EdgeStore, local: QdrantClient, where: list[dict[str, Any]]
) -> None:
    """`filters.where` of the JSON API, through build_filter: match, any, except, range, negate."""
    query_filter = build_filter(SearchFilters.model_validate({"where": where}))
    expected = local.count("c", count_filter=query_filter, exact=True).count
    assert 0 < edge_store.count(query_filter) == expected < N


@pytest.mark.parametrize("fusion", ["rrf", "dbsf", "weighted"])
@pytest.mark.parametrize(
    "filters",
    [
        SearchFilters(),
        SearchFilters(category="Food > Aisle 2"),
        SearchFilters(category="Food", exclude_retailer=["shop-0"], brand=["brand-1", "brand-3", "brand-5"]),
        SearchFilters(retailer=["shop-2", "shop-3"], price_min=5, price_max=30),
    ],
    ids=["none", "category", "category-brand-not-retailer", "retailer-price"],
)
def test_fused_query_agrees_with_local_mode(
    edge_store: EdgeStore, local: QdrantClient, fusion: str, filters: SearchFilters
) -> None:
    """The product's own filter and fusion builders (retrieval.search) run unchanged on both backends."""
    options = SearchOptions.model_validate(
        {"fusion": fusion, "image_weight": 2, "text_weight": 1, "lexical_weight": 0.5, "limit": 8}
    )
    query_filter = build_filter(filters, exclude_points=[str(uuid.UUID(int=3)), str(uuid.UUID(int=4))])
    rankings = query_vectors(seed=len(str(filters)) + len(fusion))

    def request(limit: int) -> models.QueryRequest:
        return models.QueryRequest(
            prefetch=[models.Prefetch(query=q, using=n, filter=query_filter, limit=50) for n, q in rankings],
            query=fusion_query(options, NAMES),
            filter=query_filter,
            limit=limit,
            with_payload=True,
            with_vector=NAMES,
        )

    found = edge_store.query(request(8))
    (reference,) = local.query_batch_points("c", requests=[request(30)])
    assert_same_results(found, reference.points, 8)
    assert {str(p.id) for p in found}.isdisjoint({str(uuid.UUID(int=3)), str(uuid.UUID(int=4))})
    by_id = {str(p.id): p for p in reference.points}
    for point in found:
        assert point.payload == by_id[str(point.id)].payload
        assert isinstance(point.vector, dict) and set(point.vector) == set(NAMES)

    # The convenience form builds the same request.
    weights = [2.0, 1.0, 0.5] if fusion == "weighted" else None
    again = fused(
        edge_store,
        rankings,
        fusion="dbsf" if fusion == "dbsf" else "rrf",
        weights=weights,
        query_filter=query_filter,
        limit=8,
    )
    assert [p.score for p in again] == pytest.approx([p.score for p in found])


@pytest.mark.parametrize("name", NAMES)
def test_single_rankings_offset_and_threshold_agree_with_local_mode(
    edge_store: EdgeStore, local: QdrantClient, name: str
) -> None:
    vector = dict(query_vectors(seed=3))[name]
    found = fused(edge_store, [(name, vector)], limit=6, offset=4)
    reference = local.query_points("c", query=vector, using=name, limit=6, offset=4).points
    assert [str(p.id) for p in found] == [str(p.id) for p in reference]
    assert [p.score for p in found] == pytest.approx([p.score for p in reference], abs=1e-5)

    threshold = reference[2].score - 1e-6
    kept = fused(edge_store, [(name, vector)], limit=6, offset=4, score_threshold=threshold)
    assert [str(p.id) for p in kept] == [str(p.id) for p in reference[:3]]


def test_multivector_scores_a_product_by_its_best_photo(
    edge_store: EdgeStore, local: QdrantClient, points: list[models.PointStruct]
) -> None:
    product = points[14]  # three photos
    photos = np.asarray(named(product.vector)[IMAGE_VECTOR])
    assert photos.shape == (3, IMAGE_DIM)
    rng = np.random.default_rng(5)
    query = unit(photos[1] + 0.05 * rng.normal(size=IMAGE_DIM))

    (top, *_) = fused(edge_store, [(IMAGE_VECTOR, [query.tolist()])], limit=3)
    assert top.id == product.id
    assert top.score == pytest.approx(float(np.max(photos @ query)), abs=1e-5)  # MAX_SIM: the best row

    # With two query rows MAX_SIM sums each row's best match, as Qdrant does.
    two_rows = [query.tolist(), photos[2].tolist()]
    (top, *_) = fused(edge_store, [(IMAGE_VECTOR, two_rows)], limit=1)
    expected = float(np.max(photos @ query) + np.max(photos @ photos[2]))
    assert top.id == product.id and top.score == pytest.approx(expected, abs=1e-5)
    (reference,) = local.query_points("c", query=two_rows, using=IMAGE_VECTOR, limit=1).points
    assert top.score == pytest.approx(reference.score, abs=1e-5)


def test_scroll_with_a_filter_pages_through_every_match(
    edge_store: EdgeStore, points: list[models.PointStruct]
) -> None:
    only = build_filter(SearchFilters(retailer=["shop-3"]))
    expected = sorted(str(p.id) for p in points if p.payload and p.payload["retailer"] == "shop-3")
    page, offset = edge_store.scroll(scroll_filter=only, limit=10, with_payload=["product_id"])
    assert len(page) == 10 and offset is not None and all(set(r.payload or {}) == {"product_id"} for r in page)
    seen = [str(r.id) for r in edge_store.scroll_all(only, limit=7, with_payload=False)]
    assert seen == expected  # in point-id order, each once


def test_facet_counts(edge_store: EdgeStore) -> None:
    assert edge_store.facet("retailer") == {f"shop-{i}": N // 4 for i in range(4)}
    aisle_two = build_filter(SearchFilters(category="Food > Aisle 2"))
    assert edge_store.facet("category_path", facet_filter=aisle_two) == {"Food > Aisle 2": N // 5}


def test_delete_removes_points_from_counts_reads_and_queries(small_store: EdgeStore) -> None:
    ids = [str(uuid.UUID(int=i + 1)) for i in range(10)]
    assert small_store.count() == 40
    vector = small_store.retrieve([ids[0]], with_vectors=[TEXT_VECTOR])[0].vector
    assert isinstance(vector, dict)
    small_store.delete(ids)
    assert small_store.count() == 30
    assert small_store.retrieve(ids) == []
    found = fused(small_store, [(TEXT_VECTOR, vector[TEXT_VECTOR])], limit=40)
    assert len(found) == 30 and {str(p.id) for p in found}.isdisjoint(ids)


def test_metadata_merges_keys(small_store: EdgeStore) -> None:
    assert small_store.metadata() == {}
    small_store.update_metadata({"image_encoder": "x", "calibration": {"w": [1, 2]}})
    small_store.update_metadata({"calibration": None})
    assert small_store.metadata() == {"image_encoder": "x", "calibration": None}


def test_untranslated_conditions_are_refused_by_name(small_store: EdgeStore) -> None:
    text = models.Filter(must=[models.FieldCondition(key="title", match=models.MatchText(text="apple"))])
    with pytest.raises(EdgeUnsupported, match="MatchText"):
        small_store.count(text)
    with pytest.raises(StoreError, match="dimension"):
        fused(small_store, [(TEXT_VECTOR, [1.0, 0.0])], limit=1)


def test_a_second_store_on_an_open_folder_is_refused_and_the_first_keeps_working(small_store: EdgeStore) -> None:
    folder = small_store.folder
    with pytest.raises(EdgeStoreBusy, match="already open") as refused:
        EdgeStore.open(folder)
    assert str(folder) in str(refused.value)

    # Another process is refused the same way (flock), before the engine touches the shard.
    script = (
        "import sys\nfrom retrieval.store.edge import EdgeStore, EdgeStoreBusy\n"
        "try:\n    EdgeStore.open(sys.argv[1])\nexcept EdgeStoreBusy as e:\n    print('busy:', e)\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", script, str(folder)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert child.returncode == 0, child.stderr
    assert "busy:" in child.stdout and "already open" in child.stdout

    # The first store still reads and writes, and everything survives a close and reopen.
    small_store.upsert(make_points(seed=12, n=45)[40:])
    assert small_store.count() == 45
    assert len(fused(small_store, query_vectors(seed=1), query_filter=build_filter(SearchFilters()), limit=5)) == 5
    small_store.close()
    with EdgeStore.open(folder, image_dim=IMAGE_DIM, text_dim=TEXT_DIM) as reopened:
        assert reopened.count() == 45
        assert reopened.facet("retailer") == {"shop-0": 12, "shop-1": 11, "shop-2": 11, "shop-3": 11}
    with pytest.raises(StoreError, match="incompatible"):
        EdgeStore.open(folder, image_dim=IMAGE_DIM + 1, text_dim=TEXT_DIM)
    with pytest.raises(StoreError, match="closed"):
        small_store.count()
