"""The search engine: a query's vectors (`encode_query`, the one place that decides them, whoever computes
the rows), the catalogue's heads applied, one Query API request run (`requests.py`), and each point mapped
to its product with per-modality scores and ranks (`products.py`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Protocol, TypeVar

import numpy as np
from PIL import Image
from qdrant_client import models

from retrieval.adapt.heads import Adapters, EncoderHead, Head, TailHead
from retrieval.encoders.base import ImageEncoder, TextEncoder, embed_images
from retrieval.images import centre_crop
from retrieval.lexical import clean, codes_conflict, identifiers, overlap, query_vector
from retrieval.ocr import ReadTimeout, TextReader, matched_words
from retrieval.ocr import query_vector as query_read_vector
from retrieval.records import point_id
from retrieval.search.products import ImageUrl, ref_as_url, to_product
from retrieval.search.requests import (
    MODALITY_OF,
    PREFETCH_FACTOR,
    PREFETCH_MIN,
    Query,
    build_filter,
    fusion_query,
    ranked_request,
)
from retrieval.store import (
    ADAPTED_VECTORS,
    IMAGE_VECTOR,
    LEXICAL_VECTOR,
    OCR_VECTOR,
    TEXT_VECTOR,
    CollectionMeta,
    EncoderFingerprint,
    ProductStore,
)
from schemas.payload import Product
from schemas.search import (
    ModalityRanks,
    ModalityScores,
    SearchFilters,
    SearchOptions,
    SearchResponse,
    SearchResult,
)

# A query photo is embedded whole and as these centre crops, and searches with the mean direction of the
# views: a product that fills a third of a shelf photo weighs more in a crop (grocery-val, photo only:
# measured in docs/BENCHMARKS.md, "Query crops"). () embeds the photo alone.
QUERY_CROPS: tuple[float, ...] = (0.8, 0.6)
# A query photo whose whole-photo search (with the query's filters) puts its best catalogue photo this far
# (cosine) above the second can skip the crops: one forward instead of 1 + len(QUERY_CROPS). For
# EfficientNet-Lite0 DECISIVE_MARGIN was chosen on grocery train (R@1 unchanged, 23 % of photos take the cheap
# path) and held on val (0.422 either way, 26 %); but on this project's CPU the whole photo, the probe search
# and then the crops cost more than the three views in one batch (20.0 against 17.0 ms a query, `python -m
# bench.crops_skip`), so the check is off by default (CROPS_MARGIN 0): it pays where a forward costs far more
# than a search (a large backbone), with a margin chosen for that model (docs/BENCHMARKS.md, "Query crops").
DECISIVE_MARGIN = 0.04
CROPS_MARGIN = 0.0

# A typed query's model numbers: the results among the first CODE_WINDOW whose codes are siblings of the
# query's but not the same have their score multiplied by CONFLICT_FACTOR (abt-buy, text+lexical RRF:
# factors 0.9 / 0.7 / 0.5 / 0 measured, docs/BENCHMARKS.md).
CODE_WINDOW = 10
CONFLICT_FACTOR = 0.7


@dataclass(frozen=True)
class QueryVectors:
    """What one query searches with; each present part is one ranking (one prefetch) in the fusion. The
    image and text parts search the raw stored vectors unless `*_using` names the adapted twin (the query
    vector then already went through the catalogue's head)."""

    image: np.ndarray | None = None
    text: np.ndarray | None = None
    lexical: models.SparseVector | None = None
    image_using: str = IMAGE_VECTOR
    text_using: str = TEXT_VECTOR
    codes: frozenset[str] = frozenset()  # the model numbers a typed query names (`lexical.identifiers`)
    ocr: models.SparseVector | None = None  # trigrams of the text read off the query photo
    read: str | None = None  # that text
    unread: str | None = None  # why the photo's text was not read although the catalogue reads it

    def rankings(self) -> list[tuple[str, Query]]:
        """(stored vector name, query) per ranking."""
        out: list[tuple[str, Query]] = []
        if self.image is not None:
            out.append((self.image_using, [self.image.tolist()]))  # a one-row multivector: MAX_SIM = best photo
        if self.text is not None:
            out.append((self.text_using, self.text.tolist()))
        if self.lexical is not None and self.lexical.indices:
            out.append((LEXICAL_VECTOR, self.lexical))
        if self.ocr is not None and self.ocr.indices:
            out.append((OCR_VECTOR, self.ocr))
        return out

    def adapted(self) -> dict[str, bool]:
        return {IMAGE_VECTOR: self.image_using != IMAGE_VECTOR, TEXT_VECTOR: self.text_using != TEXT_VECTOR}


class QueryEmbedder(Protocol):
    """Where a query's rows are computed. Each call starts one row and returns at once, so a query's photo
    and text can be embedded side by side; `SearchEngine.encode_query` is the one place that decides which
    rows a query needs. The engine's own (`DirectEmbedder`) runs the models in the caller's thread; the
    service injects one that shares model calls between concurrent requests (service/batching.py)."""

    def photos(self, images: Sequence[Image.Image]) -> list[Future[np.ndarray]]:
        """Each photo (a query photo and its crops) in the image encoder's space."""
        ...

    def text(self, text: str) -> Future[np.ndarray]:
        """The text in the text encoder's space."""
        ...

    def text_as_photo(self, text: str) -> Future[np.ndarray]:
        """The text in the image encoder's space (only asked of an image encoder that embeds texts: CLIP)."""
        ...

    def read(self, image: Image.Image) -> Future[str]:
        """The text printed on the photo (OCR); the future raises ReadTimeout past the read's deadline."""
        ...


T = TypeVar("T")


def _done(value: T) -> Future[T]:
    future: Future[T] = Future()
    future.set_result(value)
    return future


@dataclass(frozen=True)
class DirectEmbedder:
    """Each row computed at once, in the caller's thread."""

    image_encoder: ImageEncoder
    text_encoder: TextEncoder
    reader: TextReader
    read_deadline_s: float | None = None

    def photos(self, images: Sequence[Image.Image]) -> list[Future[np.ndarray]]:
        return [_done(row) for row in embed_images(self.image_encoder, images)]  # one forward for all

    def read(self, image: Image.Image) -> Future[str]:
        deadline = None if self.read_deadline_s is None else time.monotonic() + self.read_deadline_s
        future: Future[str] = Future()
        try:
            future.set_result(self.reader.read(image, deadline=deadline))
        except ReadTimeout as exc:
            future.set_exception(exc)
        return future

    def text(self, text: str) -> Future[np.ndarray]:
        return _done(self.text_encoder.embed_texts([text])[0])

    def text_as_photo(self, text: str) -> Future[np.ndarray]:
        if not isinstance(self.image_encoder, TextEncoder):
            raise TypeError(f"{self.image_encoder.name} does not embed texts")
        return _done(self.image_encoder.embed_texts([text])[0])


@dataclass
class SearchEngine:
    """Encodes queries with the loaded encoders and runs them against a catalogue's collection."""

    store: ProductStore
    image_encoder: ImageEncoder
    text_encoder: TextEncoder
    query_crops: tuple[float, ...] = QUERY_CROPS
    crops_margin: float = CROPS_MARGIN  # QUERY_CROPS_MARGIN; 0: a photo is always searched with its crops
    reader: TextReader = field(default_factory=TextReader, repr=False)
    models_root: Path | None = None  # fine-tuned text encoders (MODELS_PATH; default: the settings')
    model_precision: str = "auto"  # what they run in (TEXT_PRECISION)
    cache_root: Path | None = None  # a fine-tuned image tail's trunk features (default: beside the store)
    read_deadline_s: float | None = None  # longest read of a query photo's text (OCR_DEADLINE_S); None: no limit
    adapters: Adapters = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.adapters = Adapters(
            self.store,
            models_root=self.models_root,
            precision=self.model_precision,
            image_encoder=lambda: self.image_encoder,
            cache_root=self.cache_root,
        )

    @property
    def fingerprint(self) -> EncoderFingerprint:
        return EncoderFingerprint.of(self.image_encoder, self.text_encoder)

    def encode_query(
        self,
        image: Image.Image | None,
        text: str | None,
        *,
        embedder: QueryEmbedder | None = None,
        read_text: bool = False,
        text_model: EncoderHead | None = None,
        image_model: TailHead | None = None,
        whole: np.ndarray | None = None,
        crops: bool = True,
        reading: Future[str] | None = None,
    ) -> QueryVectors:
        """Query vectors: the photo through the image encoder, the text through the text encoder and into
        lexical terms. With an image encoder that also embeds texts (CLIP) and no photo, the text searches
        the photos too (cross-modal). `read_text` (a catalogue that reads package text): the photo's printed
        text too, when it shows enough of it. `embedder`: where the rows are computed (default: here, now).
        `text_model`: the catalogue's fine-tuned text encoder (`Adapters.text_model`): the text is embedded
        by it, here, and searches the adapted twin. `image_model`: the catalogue's fine-tuned image tail
        (`Adapters.image_model`): the photo and its crops are embedded by it, here, and search the twin.
        `whole`: the photo's own row, embedded already (`search` does, to decide on the crops); `crops`: embed
        the centre crops too; `reading`: the photo's read, started already."""
        embedder = embedder or DirectEmbedder(
            self.image_encoder, self.text_encoder, self.reader, read_deadline_s=self.read_deadline_s
        )
        if reading is None and image is not None and read_text:
            reading = embedder.read(image)
        shares = self.query_crops if crops else ()
        views = [image, *(centre_crop(image, share) for share in shares)] if image is not None else []
        tail = image_model is not None and bool(views)
        to_embed = views[1:] if whole is not None and not tail else views
        photo_rows = embedder.photos(to_embed) if to_embed and not tail else []  # all started before any is awaited
        tuned = text_model is not None and bool(text)
        text_row = embedder.text(text) if text and not tuned else None
        tuned_vector = text_model.embed_texts([text])[0] if text_model is not None and text else None
        rows = ([whole] if whole is not None and not tail else []) + [row.result() for row in photo_rows]
        image_vector = _mean_direction(rows) if rows else None
        if image_model is not None and views:  # the tail only: raw photo vectors are not searched meanwhile
            image_vector = _mean_direction(list(image_model.embed_images(views)))
        text_vector = text_row.result() if text_row is not None else tuned_vector
        read, unread = None, None
        if reading is not None:
            try:
                read = reading.result()
            except ReadTimeout as exc:  # a photo covered in print: the other rankings answer without it
                unread = f"the photo's printed text was not read: {exc} (OCR_DEADLINE_S); searched without it"
        if image_vector is None and text and isinstance(self.image_encoder, TextEncoder):
            same_model = self.image_encoder is self.text_encoder and not tuned  # a tuned row is not CLIP's
            image_vector = text_vector if same_model else embedder.text_as_photo(text).result()
        return QueryVectors(
            image=image_vector,
            text=text_vector,
            lexical=query_vector(text) if text else None,
            codes=frozenset(identifiers(clean(text))) if text else frozenset(),
            ocr=query_read_vector(read) if read else None,
            read=read,
            unread=unread,
            text_using=ADAPTED_VECTORS[TEXT_VECTOR] if tuned else TEXT_VECTOR,
            image_using=ADAPTED_VECTORS[IMAGE_VECTOR] if tail else IMAGE_VECTOR,
        )

    def search(
        self,
        catalogue: str,
        *,
        image: Image.Image | None = None,
        text: str | None = None,
        filters: SearchFilters | None = None,
        options: SearchOptions | None = None,
        image_url: ImageUrl = ref_as_url,
        embedder: QueryEmbedder | None = None,
    ) -> SearchResponse:
        """Search by a decoded PIL image and/or text; several rankings are fused in Qdrant. The catalogue is
        checked before any model runs (an unknown catalogue or other encoders cost nothing)."""
        started = time.perf_counter()
        info = self.store.check_encoders(catalogue, self.fingerprint)
        # A typed text stands in for what is printed (see search_vectors): the photo is read only without one.
        read_text = bool(info.reads_text) and not text
        text_model = self.adapters.text_model(catalogue, info.adapters) if text else None
        image_model = self.adapters.image_model(catalogue, info.adapters) if image is not None else None
        vectors = self.encode_for(
            catalogue,
            info,
            image,
            text,
            filters=filters,
            embedder=embedder,
            read_text=read_text,
            text_model=text_model,
            image_model=image_model,
        )
        response = self.search_vectors(
            catalogue, vectors, filters=filters, options=options, image_url=image_url, info=info
        )
        response.took_ms = round((time.perf_counter() - started) * 1000, 2)
        return response

    def encode_for(
        self,
        catalogue: str,
        info: CollectionMeta,
        image: Image.Image | None,
        text: str | None,
        *,
        filters: SearchFilters | None = None,
        embedder: QueryEmbedder | None = None,
        read_text: bool = False,
        text_model: EncoderHead | None = None,
        image_model: TailHead | None = None,
    ) -> QueryVectors:
        """`encode_query` for a search of `catalogue` within `filters`: a photo is embedded whole first, and its
        centre crops only when the whole photo does not already answer (`crops_margin`); its text is read
        meanwhile. With an image tail, or no crops configured, as `encode_query`."""
        embedder = embedder or DirectEmbedder(
            self.image_encoder, self.text_encoder, self.reader, read_deadline_s=self.read_deadline_s
        )
        whole, crops, reading = None, True, None
        if image is not None and image_model is None and self.query_crops and self.crops_margin > 0:
            reading = embedder.read(image) if read_text else None  # read while the photo is judged
            whole = embedder.photos([image])[0].result()
            crops = not self._decisive(catalogue, whole, filters, info)
        return self.encode_query(
            image,
            text,
            embedder=embedder,
            read_text=read_text,
            text_model=text_model,
            image_model=image_model,
            whole=whole,
            crops=crops,
            reading=reading,
        )

    def _decisive(self, catalogue: str, whole: np.ndarray, filters: SearchFilters | None, info: CollectionMeta) -> bool:
        """Whether the whole photo alone already answers: its best catalogue photo (within the query's filters,
        through the catalogue's head) at least `crops_margin` above the second."""
        probe = SearchOptions(limit=2, ranks=False, lexical=False)
        found = self.search_vectors(catalogue, QueryVectors(image=whole), filters=filters, options=probe, info=info)
        scores = [r.scores.image for r in found.results]
        if len(scores) < 2 or scores[0] is None or scores[1] is None:
            return True  # one photo or none to choose between: the crops would change nothing
        return scores[0] - scores[1] >= self.crops_margin

    def search_vectors(
        self,
        catalogue: str,
        vectors: QueryVectors,
        *,
        filters: SearchFilters | None = None,
        options: SearchOptions | None = None,
        image_url: ImageUrl = ref_as_url,
        exclude_points: Sequence[str] = (),
        info: CollectionMeta | None = None,
    ) -> SearchResponse:
        """The store side of `search`, for vectors already encoded (benchmarks reuse one encoding). Raw
        query vectors go through the catalogue's active heads here (`info`: the catalogue, read already)."""
        started = time.perf_counter()
        plan = self._plan(catalogue, vectors, filters, options, exclude_points, info or self.store.info(catalogue))
        requests = plan.requests()
        answers = (
            [self.store.query(catalogue, requests[0])]
            if len(requests) == 1
            else self.store.query_batch(catalogue, requests)
        )
        response = plan.response(catalogue, answers, image_url)
        response.took_ms = round((time.perf_counter() - started) * 1000, 2)
        return response

    def _plan(
        self,
        catalogue: str,
        vectors: QueryVectors,
        filters: SearchFilters | None,
        options: SearchOptions | None,
        exclude_points: Sequence[str],
        info: CollectionMeta,
    ) -> _Plan:
        """One query's vectors through the catalogue's heads, its rankings, filter and the page to ask for."""
        options = options or SearchOptions()
        active = info.adapters
        vectors = self.adapt(catalogue, vectors, active)
        if not options.lexical:
            vectors = replace(vectors, lexical=None)
        if not info.reads_text or (vectors.text is not None and vectors.read is not None):
            # No read text to compare with; or a query photo came with typed words, which say what the print would,
            # without OCR's misreadings: with a product's name typed, the read text cost 8 of 296 grocery
            # queries their first place (docs/BENCHMARKS.md, "Text on the package").
            vectors = replace(vectors, ocr=None)
        rankings = vectors.rankings()
        if not rankings:
            raise ValueError("give an image, a text, or both")
        query_filter = build_filter(filters or SearchFilters(), exclude_points=exclude_points)
        # A query that names model numbers: the first CODE_WINDOW results are re-ranked with those whose
        # codes conflict lowered, so the window is asked for whole and the page cut from it afterwards.
        window = max(CODE_WINDOW, options.offset + options.limit) if vectors.codes else 0
        asked = options.model_copy(update={"offset": 0, "limit": window}) if window else options
        return _Plan(vectors, rankings, query_filter, options, asked, window, active)

    def search_products(
        self,
        catalogue: str,
        refs: Sequence[tuple[str, str]],
        *,
        filters: SearchFilters | None = None,
        options: SearchOptions | None = None,
        image_url: ImageUrl = ref_as_url,
    ) -> list[SearchResponse | None]:
        """`search_product` for several stored products at once: their vectors read in one call and their
        searches sent as one batch of Query API requests (one round trip to a server, not two per product). None
        for a (retailer, id) the catalogue does not hold."""
        started = time.perf_counter()
        info = self.store.check_encoders(catalogue, self.fingerprint)
        ids = [point_id(retailer, product_id) for retailer, product_id in refs]
        records = {str(r.id): r for r in self.store.retrieve(catalogue, ids, with_vectors=True)}
        plans: list[_Plan | None] = []
        for pid in ids:
            record = records.get(pid)
            if record is None:
                plans.append(None)
                continue
            vectors = self._stored_query(record, info)
            plans.append(self._plan(catalogue, vectors, filters, options, [str(record.id)], info))
        groups = [plan.requests() if plan is not None else [] for plan in plans]
        flat = [request for group in groups for request in group]
        answers = iter(self.store.query_batch(catalogue, flat) if flat else [])
        out: list[SearchResponse | None] = []
        for plan, group in zip(plans, groups, strict=True):
            if plan is None:
                out.append(None)
                continue
            out.append(plan.response(catalogue, [next(answers) for _ in group], image_url))
        took = round((time.perf_counter() - started) * 1000, 2)  # the batch's, for each of its searches
        for response in out:
            if response is not None:
                response.took_ms = took
        return out

    def search_product(
        self,
        catalogue: str,
        retailer: str,
        product_id: str,
        *,
        filters: SearchFilters | None = None,
        options: SearchOptions | None = None,
        image_url: ImageUrl = ref_as_url,
    ) -> tuple[Product, SearchResponse]:
        """Search with a stored product's own vectors (first photo, text, lexical terms), leaving it out."""
        started = time.perf_counter()
        info = self.store.check_encoders(catalogue, self.fingerprint)
        record = self.store.product(catalogue, retailer, product_id, with_vectors=True, known=True)
        response = self.search_vectors(
            catalogue,
            self._stored_query(record, info),
            filters=filters,
            options=options,
            image_url=image_url,
            exclude_points=[str(record.id)],
            info=info,
        )
        response.took_ms = round((time.perf_counter() - started) * 1000, 2)
        return to_product(record.payload or {}, image_url), response

    @staticmethod
    def _stored_query(record: models.Record, info: CollectionMeta) -> QueryVectors:
        """A stored product's own vectors as a query: its first photo, its text, its lexical and read terms;
        where it holds the adapted twin under the active head, the twin, as the query stands."""
        stored = record.vector if isinstance(record.vector, dict) else {}
        parts: dict[str, tuple[np.ndarray | None, str]] = {}
        for modality in (IMAGE_VECTOR, TEXT_VECTOR):
            twin = ADAPTED_VECTORS[modality]
            name = twin if modality in info.adapters and stored.get(twin) else modality
            value = stored.get(name)
            rows = np.asarray(value, dtype=np.float32) if isinstance(value, list) and value else None
            parts[modality] = (rows[0] if rows is not None and rows.ndim == 2 else rows, name)
        lexical, printed = stored.get(LEXICAL_VECTOR), stored.get(OCR_VECTOR)
        return QueryVectors(
            image=parts[IMAGE_VECTOR][0],
            text=parts[TEXT_VECTOR][0],
            lexical=lexical if isinstance(lexical, models.SparseVector) else None,
            ocr=printed if isinstance(printed, models.SparseVector) else None,
            image_using=parts[IMAGE_VECTOR][1],
            text_using=parts[TEXT_VECTOR][1],
        )

    @staticmethod
    def _code_verdict(query: frozenset[str], product: Product) -> Literal["same", "conflict"] | None:
        """The query's model numbers against the product's (title and MPN)."""
        if not query:
            return None
        offered = set(identifiers(clean(" ".join(filter(None, [product.title, product.mpn])))))
        if query & offered:
            return "same"
        return "conflict" if codes_conflict(query, offered) else None

    def adapt(self, catalogue: str, vectors: QueryVectors, active: dict[str, int]) -> QueryVectors:
        """Raw query vectors through the catalogue's active heads, aimed at the adapted twins. A fine-tuned
        text encoder (or image tail) maps no vector: a text (photo) reaches its twin only embedded by it
        (`encode_query` with the `text_model` / `image_model`, as `search` does); a base-model vector stays
        on the raw vectors, which rank it as they would with no head."""
        if not active:
            return vectors
        heads = self.adapters.active_heads(catalogue, active)
        changes: dict[str, object] = {}
        image_head, text_head = heads.get(IMAGE_VECTOR), heads.get(TEXT_VECTOR)
        if vectors.image is not None and isinstance(image_head, Head) and vectors.image_using == IMAGE_VECTOR:
            changes.update(image=image_head(vectors.image[None, :])[0], image_using=ADAPTED_VECTORS[IMAGE_VECTOR])
        if vectors.text is not None and isinstance(text_head, Head) and vectors.text_using == TEXT_VECTOR:
            changes.update(text=text_head(vectors.text[None, :])[0], text_using=ADAPTED_VECTORS[TEXT_VECTOR])
        return replace(vectors, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class _Plan:
    """One query ready for the store: its vectors (through the catalogue's heads), rankings, filter and the page
    asked (`asked`: the code window's when `window`); `requests` are what the store runs for it, `response` turns
    their answers into the public response."""

    vectors: QueryVectors
    rankings: list[tuple[str, Query]]
    query_filter: models.Filter | None
    options: SearchOptions
    asked: SearchOptions
    window: int
    active: dict[str, int]

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.rankings]

    def requests(self) -> list[models.QueryRequest]:
        """The fused (or single) ranking's request, then, for a fused query asked for ranks, each modality's own
        ranking: the prefetches asked again in the same batch."""
        asked, names = self.asked, self.names
        if len(self.rankings) == 1:
            nearest = ranked_request(
                self.rankings,
                fusion_query(asked, names),  # unused: one ranking is a plain nearest query
                query_filter=self.query_filter,
                limit=asked.limit,
                offset=asked.offset,
                score_threshold=asked.score_threshold,
                with_vector=names,
            )
            return [nearest]
        depth = max(PREFETCH_MIN, PREFETCH_FACTOR * (asked.offset + asked.limit))
        fused = ranked_request(
            self.rankings,
            fusion_query(asked, names),
            query_filter=self.query_filter,
            limit=asked.limit,
            offset=asked.offset,
            score_threshold=asked.score_threshold,
            depth=depth,
            with_vector=names,
        )
        single = [
            models.QueryRequest(query=q, using=n, filter=self.query_filter, limit=depth, with_payload=False)
            for n, q in self.rankings
            if asked.ranks
        ]
        return [fused, *single]

    def _ranks(self, answers: Sequence[list[models.ScoredPoint]]) -> dict[str, dict[str, int]]:
        """Each modality's own ranking as point id -> 1-based rank."""
        names = self.names
        if len(self.rankings) == 1:
            first = answers[0]
            return {names[0]: {str(p.id): self.asked.offset + i for i, p in enumerate(first, start=1)}}
        asked = names if self.asked.ranks else []
        return {
            name: {str(p.id): i for i, p in enumerate(points, start=1)}
            for name, points in zip(asked, answers[1:], strict=True)
        }

    def response(
        self, catalogue: str, answers: Sequence[list[models.ScoredPoint]], image_url: ImageUrl
    ) -> SearchResponse:
        # Points of equal score come in whatever order the engine holds them (it differs between two ingests of
        # one catalogue): they are put in the order of their retailer and id (point id where no payload was
        # asked), so that an answer, its ranks and the match model's rank features read off it do not change
        # with how the store was written (under RRF, which fuses ranks, the engine has already ranked equal
        # scores in its own order).
        answers = [sorted(points, key=lambda p: (-p.score, *_retailer_and_id(p))) for points in answers]
        vectors, options, ranks = self.vectors, self.options, self._ranks(answers)
        results = []
        for point in answers[0]:
            product = to_product(point.payload or {}, image_url)
            verdict = SearchEngine._code_verdict(vectors.codes, product)
            results.append(
                SearchResult(
                    id=product.id,
                    retailer=product.retailer,
                    score=float(point.score) * (CONFLICT_FACTOR if verdict == "conflict" else 1.0),
                    scores=_modality_scores(point.vector, vectors),
                    ranks=ModalityRanks(**{MODALITY_OF[name]: ranks[name].get(str(point.id)) for name in ranks}),
                    codes=verdict,
                    read_words=_read_words(vectors, product),
                    product=product,
                )
            )
        if self.window:
            results.sort(key=lambda r: -r.score)  # stable: ties keep the order above
            threshold = options.score_threshold
            kept = [r for r in results if threshold is None or r.score >= threshold]
            results = kept[options.offset : options.offset + options.limit]
        active = self.active
        return SearchResponse(
            catalogue=catalogue,
            read=vectors.read or None,
            modes=[MODALITY_OF[name] for name, _ in self.rankings],
            fusion=options.fusion if len(self.rankings) > 1 else None,
            adapted={m: active[m] for m, used in vectors.adapted().items() if used and m in active},
            took_ms=0.0,
            results=results,
            warnings=[vectors.unread] if vectors.unread else [],
        )


def _retailer_and_id(point: models.ScoredPoint) -> tuple[str, str]:
    payload = point.payload or {}
    return str(payload.get("retailer", "")), str(payload.get("product_id", point.id))


def _read_words(query: QueryVectors, product: Product) -> list[str]:
    """The words the query photo read that the product's title, brand or package text has."""
    if query.ocr is None or not query.read:
        return []
    return matched_words(query.read, [product.title or "", product.brand or "", *product.image_text])


def _mean_direction(rows: Sequence[np.ndarray]) -> np.ndarray:
    """The unit vector along the mean of unit rows (one row: itself)."""
    if len(rows) == 1:
        return rows[0]
    mean = np.mean(np.stack(rows), axis=0)
    unit: np.ndarray = (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)
    return unit


def _modality_scores(stored_vectors: object, query: QueryVectors) -> ModalityScores:
    """Per-modality scores from the returned vectors: cosine for dense ones (unit vectors: cosine = dot),
    the share of query terms present for the lexical one."""
    stored = stored_vectors if isinstance(stored_vectors, dict) else {}
    scores = ModalityScores()
    if query.image is not None and stored.get(query.image_using):
        scores.image = float(np.max(np.asarray(stored[query.image_using], dtype=np.float32) @ query.image))
    if query.text is not None and stored.get(query.text_using):
        scores.text = float(np.asarray(stored[query.text_using], dtype=np.float32) @ query.text)
    document = stored.get(LEXICAL_VECTOR)
    if query.lexical is not None:
        scores.lexical = overlap(query.lexical, document.indices if isinstance(document, models.SparseVector) else [])
    printed = stored.get(OCR_VECTOR)
    if query.ocr is not None:
        scores.ocr = overlap(query.ocr, printed.indices if isinstance(printed, models.SparseVector) else [])
    return scores
