"""The search layer: `engine` (SearchEngine, query vectors, the QueryEmbedder a caller may inject),
`requests` (filters and Query API request builders), `products` (payload -> product). Above the store and
the adaptation heads; the match model and batch matching sit above it."""

from retrieval.search.engine import DirectEmbedder, QueryEmbedder, QueryVectors, SearchEngine
from retrieval.search.products import ImageUrl, ref_as_url, to_product
from retrieval.search.requests import build_filter, fused_request, fusion_query, ranked_request

__all__ = [
    "DirectEmbedder",
    "ImageUrl",
    "QueryEmbedder",
    "QueryVectors",
    "SearchEngine",
    "build_filter",
    "fused_request",
    "fusion_query",
    "ranked_request",
    "ref_as_url",
    "to_product",
]
