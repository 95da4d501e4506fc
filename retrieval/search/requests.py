"""Query API requests: payload filters, one prefetch per ranking (stored vector name, query), and the
fusion stage over them (RRF, weighted RRF, DBSF); a single ranking is a plain nearest query."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from qdrant_client import models

from retrieval.store import ADAPTED_VECTORS, IMAGE_VECTOR, LEXICAL_VECTOR, OCR_VECTOR, TEXT_VECTOR
from retrieval.store.layout import RRF_K, plain_vector
from schemas.catalogue import category_path, parse_category
from schemas.search import PayloadCondition, SearchFilters, SearchOptions

# Candidates each modality contributes before fusion: enough that a product ranked well by one
# modality and moderately by the other is still seen by RRF.
PREFETCH_MIN = 50
PREFETCH_FACTOR = 4

Query = list[float] | list[list[float]] | models.SparseVector


# Stored vector name -> the modality it ranks by (an adapted twin ranks for its modality).
MODALITY_OF = {
    IMAGE_VECTOR: IMAGE_VECTOR,
    TEXT_VECTOR: TEXT_VECTOR,
    LEXICAL_VECTOR: LEXICAL_VECTOR,
    OCR_VECTOR: OCR_VECTOR,
    **{twin: modality for modality, twin in ADAPTED_VECTORS.items()},
}


def build_filter(filters: SearchFilters, *, exclude_points: Sequence[str] = ()) -> models.Filter | None:
    """Qdrant filter for category-or-below, retailer in / not in, brand, price range, and left-out points."""
    must: list[models.Condition] = []
    must_not: list[models.Condition] = []
    if exclude_points:
        must_not.append(models.HasIdCondition(has_id=list(exclude_points)))
    if filters.category:
        path = category_path(parse_category(filters.category))
        must.append(models.FieldCondition(key="category_prefixes", match=models.MatchValue(value=path)))
    if filters.retailer:
        must.append(models.FieldCondition(key="retailer", match=models.MatchAny(any=filters.retailer)))
    if filters.exclude_retailer:
        must_not.append(models.FieldCondition(key="retailer", match=models.MatchAny(any=filters.exclude_retailer)))
    if filters.brand:
        must.append(models.FieldCondition(key="brand", match=models.MatchAny(any=filters.brand)))
    if filters.price_min is not None or filters.price_max is not None:
        must.append(
            models.FieldCondition(key="price", range=models.Range(gte=filters.price_min, lte=filters.price_max))
        )
    for condition in filters.where:
        (must_not if condition.negate else must).append(payload_condition(condition))
    if not must and not must_not:
        return None
    return models.Filter(must=must or None, must_not=must_not or None)


def payload_condition(condition: PayloadCondition) -> models.FieldCondition:
    """A free condition of the request as Qdrant's field condition."""
    key = condition.key
    if condition.range is not None:
        return models.FieldCondition(key=key, range=models.Range(**condition.range.model_dump()))
    if condition.any is not None:
        return models.FieldCondition(key=key, match=models.MatchAny(any=condition.any))
    if condition.except_ is not None:
        return models.FieldCondition(
            key=key,
            match=models.MatchExcept(**{"except": condition.except_}),
        )
    return models.FieldCondition(key=key, match=models.MatchValue(value=condition.match))


VectorQuery = Sequence[float] | Sequence[Sequence[float]] | models.SparseVector


def fused_request(
    rankings: Sequence[tuple[str, VectorQuery]],
    *,
    fusion: Literal["rrf", "dbsf"] = "rrf",
    weights: Sequence[float] | None = None,
    query_filter: models.Filter | None = None,
    limit: int = 10,
    offset: int = 0,
    score_threshold: float | None = None,
    prefetch_limit: int | None = None,
    with_payload: bool | Sequence[str] = True,
    with_vectors: bool | Sequence[str] = False,
    exact: bool = False,
) -> models.QueryRequest:
    """`ranked_request` from plain vectors (lists, tuples or numpy rows) and a fusion by name: one prefetch
    per (vector name, query), fused by RRF (optionally weighted) or DBSF; a single ranking is a plain nearest
    query. `exact=True` bypasses HNSW where a segment has one."""
    if not rankings:
        raise ValueError("give at least one ranking")
    if weights is not None and fusion != "rrf":
        raise ValueError("weights are for RRF fusion only")
    fuse: models.FusionQuery | models.RrfQuery
    if fusion == "dbsf":
        fuse = models.FusionQuery(fusion=models.Fusion.DBSF)
    elif weights is not None:
        fuse = models.RrfQuery(rrf=models.Rrf(k=RRF_K, weights=list(weights)))
    else:
        fuse = models.FusionQuery(fusion=models.Fusion.RRF)
    return ranked_request(
        [
            (name, vector if isinstance(vector, models.SparseVector) else plain_vector(vector))
            for name, vector in rankings
        ],
        fuse,
        query_filter=query_filter,
        limit=limit,
        offset=offset,
        score_threshold=score_threshold,
        depth=prefetch_limit,
        with_payload=with_payload,
        with_vector=with_vectors,
        params=models.SearchParams(exact=True) if exact else None,
    )


def ranked_request(
    rankings: Sequence[tuple[str, Query | models.VectorInput]],
    fusion: models.FusionQuery | models.RrfQuery,
    *,
    query_filter: models.Filter | None = None,
    limit: int = 10,
    offset: int = 0,
    score_threshold: float | None = None,
    depth: int | None = None,
    with_payload: bool | Sequence[str] = True,
    with_vector: bool | Sequence[str] = False,
    params: models.SearchParams | None = None,
) -> models.QueryRequest:
    """The Query API request for (vector name, query) rankings: one ranking is a plain nearest query on its
    vector; several get one prefetch each (the same filter, `depth` candidates, by default
    max(PREFETCH_MIN, PREFETCH_FACTOR x (offset + limit))) fused by `fusion`."""
    common: dict[str, object] = {
        "filter": query_filter,
        "params": params,
        "limit": limit,
        "offset": offset,
        "score_threshold": score_threshold,
        "with_payload": with_payload if isinstance(with_payload, bool) else list(with_payload),
        "with_vector": with_vector if isinstance(with_vector, bool) else list(with_vector),
    }
    if len(rankings) == 1:
        (name, query), *_ = rankings
        return models.QueryRequest(query=query, using=name, **common)
    depth = depth or max(PREFETCH_MIN, PREFETCH_FACTOR * (offset + limit))
    prefetch = [models.Prefetch(query=q, using=n, filter=query_filter, params=params, limit=depth) for n, q in rankings]
    return models.QueryRequest(prefetch=prefetch, query=fusion, **common)


def fusion_query(options: SearchOptions, rankings: Sequence[str]) -> models.FusionQuery | models.RrfQuery:
    """The Query API's fusion stage over the prefetches, named in `rankings` order."""
    if options.fusion == "dbsf":
        return models.FusionQuery(fusion=models.Fusion.DBSF)
    if options.fusion == "weighted":
        weight = {
            IMAGE_VECTOR: options.image_weight,
            TEXT_VECTOR: options.text_weight,
            LEXICAL_VECTOR: options.lexical_weight,
            OCR_VECTOR: 1.0,  # the text read off a query photo: as strong as any ranking
        }
        return models.RrfQuery(rrf=models.Rrf(weights=[weight[MODALITY_OF.get(name, name)] for name in rankings]))
    return models.FusionQuery(fusion=models.Fusion.RRF)
