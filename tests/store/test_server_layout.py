"""How a server's collections are laid out (QDRANT_SHARDS, QDRANT_REPLICAS, QDRANT_WRITE_CONSISTENCY,
QDRANT_ON_DISK, QDRANT_QUANTIZATION): the settings that reach `create_collection` and the rescoring every
dense ranking asks for. The server itself answers in tests/store/test_server.py (QDRANT_URL); here the
requests are run against qdrant-client's local mode, which takes the same models."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError
from qdrant_client import QdrantClient, models

from retrieval.store.backend import QdrantBackend
from retrieval.store.layout import EncoderFingerprint, StorageLayout, rescored

URL = "http://qdrant-1:6333"
QUANTIZED = StorageLayout(shards=6, replicas=2, write_consistency=2, on_disk=True, quantization="int8")


def test_server_layout_settings_need_a_server_and_a_possible_consistency() -> None:
    from retrieval.settings import Settings

    with pytest.raises(ValidationError, match="QDRANT_SHARDS, QDRANT_REPLICAS lay out a Qdrant server"):
        Settings(qdrant_shards=3, qdrant_replicas=2, qdrant_quantization="int8")
    assert Settings(qdrant_quantization="int8").qdrant_quantization == "int8"  # the edge engine takes it too
    with pytest.raises(ValidationError, match="QDRANT_WRITE_CONSISTENCY cannot exceed QDRANT_REPLICAS"):
        Settings(qdrant_url=URL, qdrant_replicas=2, qdrant_write_consistency=3)
    with pytest.raises(ValidationError):
        Settings(qdrant_url=URL, qdrant_quantization="int4")
    settings = Settings(qdrant_url=URL, qdrant_shards=6, qdrant_replicas=2, qdrant_write_consistency=2)
    assert (settings.qdrant_shards, settings.qdrant_replicas, settings.qdrant_on_disk) == (6, 2, False)


def test_collection_options_are_the_server_defaults_unless_asked() -> None:
    assert StorageLayout().collection_options() == {} and StorageLayout().search_params() is None
    options = QUANTIZED.collection_options()
    assert (options["shard_number"], options["replication_factor"], options["write_consistency_factor"]) == (6, 2, 2)
    assert options["on_disk_payload"] is True
    scalar = options["quantization_config"].scalar
    assert scalar.type == models.ScalarType.INT8 and scalar.always_ram is True


def _request(query: np.ndarray, terms: list[int]) -> models.QueryRequest:
    return models.QueryRequest(
        prefetch=[
            models.Prefetch(query=query.tolist(), using="text", limit=20),
            models.Prefetch(query=models.SparseVector(indices=terms, values=[1.0] * len(terms)), using="lexical"),
            models.Prefetch(
                prefetch=[models.Prefetch(query=query.tolist(), using="text_adapted")],
                query=query.tolist(),
                using="text",
            ),
        ],
        query=models.FusionQuery(fusion=models.Fusion.RRF),
        limit=5,
    )


def test_every_dense_ranking_isrescored_and_sparse_ones_are_left_alone() -> None:
    params = QUANTIZED.search_params()
    assert params is not None and params.quantization is not None
    assert params.quantization.rescore is True and params.quantization.oversampling == 2.0
    request = rescored(_request(np.ones(4, dtype=np.float32), [1, 2]), params)
    assert isinstance(request.prefetch, list)
    dense, sparse, nested = request.prefetch
    assert dense.params == params and sparse.params is None
    assert isinstance(nested.prefetch, list) and nested.params == params and nested.prefetch[0].params == params
    assert request.params is None  # the fusion itself ranks no vector


def test_a_quantized_layout_answers_as_the_plain_one() -> None:
    """The same points and fused queries through both layouts (local mode keeps every vector exact, so the
    rankings must be equal: the rewritten requests are valid and change nothing but the server's work)."""
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(50, 4)).astype(np.float32)
    fingerprint = EncoderFingerprint(image="i", image_dim=4, text="t", text_dim=4)
    answers = []
    for layout in (StorageLayout(), QUANTIZED):
        backend = QdrantBackend(QdrantClient(":memory:"), layout=layout)
        backend.create_collection("c", fingerprint, metadata={})
        points = [
            models.PointStruct(
                id=i,
                vector={"text": row.tolist(), "lexical": models.SparseVector(indices=[i % 7], values=[1.0])},
                payload={},
            )
            for i, row in enumerate(rows)
        ]
        backend.upsert("c", points)
        queries = [_request(rows[i] + 0.05, [i % 7]) for i in range(10)]
        answers.append([[p.id for p in points] for points in backend.query_batch("c", queries)])
        backend.close()
    assert answers[0] == answers[1] and all(len(ids) == 5 for ids in answers[0])
