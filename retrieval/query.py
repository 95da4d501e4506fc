"""Query building and execution: one prefetch per modality, RRF fusion in Qdrant, payload filters."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from qdrant_client import models

from retrieval.encoders.base import ImageEncoder, TextEncoder, embed_images
from retrieval.store import IMAGE_VECTOR, TEXT_VECTOR, EncoderFingerprint, ProductStore
from schemas.catalogue import category_path, parse_category
from schemas.payload import Product
from schemas.search import ModalityScores, SearchFilters, SearchOptions, SearchResponse, SearchResult

# Candidates each modality contributes before fusion: enough that a product ranked well by one
# modality and moderately by the other is still seen by RRF.
PREFETCH_MIN = 50
PREFETCH_FACTOR = 4


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
    if not must and not must_not:
        return None
    return models.Filter(must=must or None, must_not=must_not or None)


# (retailer, product id, photo index, stored ref) -> the URL a client should load the photo from.
ImageUrl = Callable[[str, str, int, str], str]


def _ref_as_url(retailer: str, product_id: str, index: int, ref: str) -> str:
    return ref


def to_product(payload: dict[str, object], image_url: ImageUrl = _ref_as_url) -> Product:
    """Map a stored payload to the public product view (the one place that defines the wire format)."""
    retailer, product_id = str(payload["retailer"]), str(payload["product_id"])
    images = payload.get("images")
    refs = [str(ref) for ref in images] if isinstance(images, list) else []
    return Product.model_validate(
        {
            **{k: v for k, v in payload.items() if k in Product.model_fields},
            "id": product_id,
            "image_urls": [image_url(retailer, product_id, i, ref) for i, ref in enumerate(refs)],
        }
    )


@dataclass
class SearchEngine:
    """Encodes queries with the loaded encoders and runs them against a catalogue's collection."""

    store: ProductStore
    image_encoder: ImageEncoder
    text_encoder: TextEncoder

    @property
    def fingerprint(self) -> EncoderFingerprint:
        return EncoderFingerprint(
            self.image_encoder.name, self.image_encoder.dim, self.text_encoder.name, self.text_encoder.dim
        )

    def encode_query(self, image: Image.Image | None, text: str | None) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Query vectors: the photo through the image encoder, the text through the text encoder."""
        image_vec = embed_images(self.image_encoder, [image])[0] if image is not None else None
        text_vec = self.text_encoder.embed_texts([text])[0] if text else None
        return image_vec, text_vec

    def search(
        self,
        catalogue: str,
        *,
        image: Image.Image | None = None,
        text: str | None = None,
        filters: SearchFilters | None = None,
        options: SearchOptions | None = None,
        image_url: ImageUrl = _ref_as_url,
    ) -> SearchResponse:
        """Search by a decoded PIL image and/or text; both given -> the two prefetches fused in Qdrant."""
        started = time.perf_counter()
        self.store.check_encoders(catalogue, self.fingerprint)
        image_vec, text_vec = self.encode_query(image, text)
        response = self.search_vectors(
            catalogue, image_vec=image_vec, text_vec=text_vec, filters=filters, options=options, image_url=image_url
        )
        response.took_ms = round((time.perf_counter() - started) * 1000, 2)
        return response

    def search_vectors(
        self,
        catalogue: str,
        *,
        image_vec: np.ndarray | None,
        text_vec: np.ndarray | None,
        filters: SearchFilters | None = None,
        options: SearchOptions | None = None,
        image_url: ImageUrl = _ref_as_url,
        exclude_points: Sequence[str] = (),
    ) -> SearchResponse:
        """The store side of `search`, for vectors already encoded (benchmarks reuse one encoding)."""
        started = time.perf_counter()
        if image_vec is None and text_vec is None:
            raise ValueError("give an image, a text, or both")
        options = options or SearchOptions()
        query_filter = build_filter(filters or SearchFilters(), exclude_points=exclude_points)
        points = self._query(catalogue, image_vec, text_vec, query_filter, options)
        results = []
        for point in points:
            product = to_product(point.payload or {}, image_url)
            results.append(
                SearchResult(
                    id=product.id,
                    retailer=product.retailer,
                    score=float(point.score),
                    scores=_modality_scores(point.vector, image_vec, text_vec),
                    product=product,
                )
            )
        return SearchResponse(
            catalogue=catalogue,
            modes=[m for m, v in ((IMAGE_VECTOR, image_vec), (TEXT_VECTOR, text_vec)) if v is not None],
            fusion=options.fusion if image_vec is not None and text_vec is not None else None,
            took_ms=round((time.perf_counter() - started) * 1000, 2),
            results=results,
        )

    def search_product(
        self,
        catalogue: str,
        retailer: str,
        product_id: str,
        *,
        filters: SearchFilters | None = None,
        options: SearchOptions | None = None,
        image_url: ImageUrl = _ref_as_url,
    ) -> tuple[Product, SearchResponse]:
        """Search with a stored product's own vectors (its first photo and its text), leaving it out."""
        started = time.perf_counter()
        self.store.check_encoders(catalogue, self.fingerprint)
        record = self.store.product(catalogue, retailer, product_id, with_vectors=True)
        vectors = record.vector if isinstance(record.vector, dict) else {}
        photos = vectors.get(IMAGE_VECTOR)
        text = vectors.get(TEXT_VECTOR)
        response = self.search_vectors(
            catalogue,
            image_vec=np.asarray(photos[0], dtype=np.float32) if isinstance(photos, list) and photos else None,
            text_vec=np.asarray(text, dtype=np.float32) if isinstance(text, list) and text else None,
            filters=filters,
            options=options,
            image_url=image_url,
            exclude_points=[str(record.id)],
        )
        response.took_ms = round((time.perf_counter() - started) * 1000, 2)
        return to_product(record.payload or {}, image_url), response

    def _query(
        self,
        catalogue: str,
        image_vec: np.ndarray | None,
        text_vec: np.ndarray | None,
        query_filter: models.Filter | None,
        options: SearchOptions,
    ) -> list[models.ScoredPoint]:
        client = self.store.client
        queries: list[tuple[str, list[float] | list[list[float]]]] = []
        if image_vec is not None:
            queries.append((IMAGE_VECTOR, [image_vec.tolist()]))  # a one-row multivector: MAX_SIM = best photo
        if text_vec is not None:
            queries.append((TEXT_VECTOR, text_vec.tolist()))
        page = {
            "query_filter": query_filter,
            "limit": options.limit,
            "offset": options.offset,
            "score_threshold": options.score_threshold,
            "with_vectors": [name for name, _ in queries],
        }
        if len(queries) == 1:
            name, vector = queries[0]
            return client.query_points(catalogue, query=vector, using=name, **page).points  # type: ignore[arg-type]
        depth = max(PREFETCH_MIN, PREFETCH_FACTOR * (options.offset + options.limit))
        prefetch = [models.Prefetch(query=v, using=n, filter=query_filter, limit=depth) for n, v in queries]
        return client.query_points(catalogue, prefetch=prefetch, query=fusion_query(options), **page).points  # type: ignore[arg-type]


def fusion_query(options: SearchOptions) -> models.FusionQuery | models.RrfQuery:
    """The Query API's fusion stage for the two prefetches (image first, then text)."""
    if options.fusion == "dbsf":
        return models.FusionQuery(fusion=models.Fusion.DBSF)
    if options.fusion == "weighted":
        return models.RrfQuery(rrf=models.Rrf(weights=[options.image_weight, options.text_weight]))
    return models.FusionQuery(fusion=models.Fusion.RRF)


def _modality_scores(vectors: object, image_vec: np.ndarray | None, text_vec: np.ndarray | None) -> ModalityScores:
    """Cosine per modality from the returned vectors (all are unit length, so cosine = dot)."""
    stored = vectors if isinstance(vectors, dict) else {}
    image_score = text_score = None
    if image_vec is not None and stored.get(IMAGE_VECTOR):
        image_score = float(np.max(np.asarray(stored[IMAGE_VECTOR], dtype=np.float32) @ image_vec))
    if text_vec is not None and stored.get(TEXT_VECTOR):
        text_score = float(np.asarray(stored[TEXT_VECTOR], dtype=np.float32) @ text_vec)
    return ModalityScores(image=image_score, text=text_score)
