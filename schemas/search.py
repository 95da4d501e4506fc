"""Search request fields, filters and the response returned by `POST /search`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.catalogue import category_path, parse_category
from schemas.payload import Product

CATALOGUE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
# Names of the embedded store's own files and folders, beside which each catalogue has a folder of its own; a
# catalogue of such a name would collide with them (any case: a file system may fold it).
RESERVED_CATALOGUE_NAMES = frozenset(
    {
        "edge.lock",
        "engine",
        "meta.json",
        "collection",
        ".lock",
        "storage.sqlite",
        "jobs.sqlite",
        "labels.sqlite",
        "sources",
        "models",
    }
)


def catalogue_name_problem(name: str) -> str | None:
    """Why `name` cannot name a new catalogue (beyond CATALOGUE_PATTERN), or None."""
    if name.casefold() in RESERVED_CATALOGUE_NAMES:
        return f"catalogue name {name!r} is a name the store keeps for its own files; choose another"
    if name.endswith("."):
        return f"catalogue name {name!r} ends with '.', which some file systems drop; choose another"
    return None


MAX_TEXT_LENGTH = 2_000
Decision = Literal["match", "no_match", "uncertain", "uncalibrated"]


# Payload fields a free condition may name: the stored product fields, or one of its attributes
# (`attributes.colour`: the catalogue's extra columns).
CONDITION_FIELDS = ("title", "description", "brand", "gtin", "mpn", "category_path", "price", "currency", "url")
CONDITION_KEY_PATTERN = rf"^(?:{'|'.join(CONDITION_FIELDS)}|attributes\.[A-Za-z0-9_ -]{{1,64}})$"
# Bounded values inside lists and conditions: a request cannot smuggle megabytes into a filter.
Name = Annotated[str, Field(max_length=256)]
Value = Annotated[str, Field(max_length=1_000)]
# The engines store 64-bit integers: a larger one is a 422 here, not an overflow inside the store.
Integer = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
Scalar = Value | Integer | bool


class ValueRange(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    gt: float | None = None
    gte: float | None = None
    lt: float | None = None
    lte: float | None = None


class PayloadCondition(BaseModel):
    """One free condition on a payload field: exactly one of `match`, `any`, `except`, `range`."""

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        json_schema_extra={
            "examples": [
                {"key": "attributes.colour", "match": "red"},
                {"key": "currency", "any": ["EUR", "SEK"]},
                {"key": "price", "range": {"gte": 10, "lt": 50}},
                {"key": "brand", "match": "Arla", "negate": True},
            ]
        },
    )

    key: str = Field(
        pattern=CONDITION_KEY_PATTERN,
        description=f"a stored field ({', '.join(CONDITION_FIELDS)}) or attributes.<column>",
        examples=["attributes.colour"],
    )
    match: Scalar | None = Field(default=None, description="the field equals this value")
    any: list[Value] | list[Integer] | None = Field(
        default=None, min_length=1, max_length=100, description="one of these values (all strings or all integers)"
    )
    except_: list[Value] | list[Integer] | None = Field(
        default=None, alias="except", min_length=1, max_length=100, description="none of these values"
    )
    range: ValueRange | None = Field(default=None, description="numeric bounds")
    negate: bool = Field(default=False, description="the condition must NOT hold")

    @model_validator(mode="after")
    def _one_test(self) -> PayloadCondition:
        given = [name for name in ("match", "any", "except_", "range") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"condition on {self.key!r}: give exactly one of match, any, except, range")
        return self


class SearchFilters(BaseModel):
    """Payload filters; all given conditions must hold."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    category: str | None = Field(
        default=None, max_length=1_000, description="'A > B': products in this category or any below it"
    )
    retailer: list[Name] = Field(default_factory=list, max_length=100, description="only these retailers")
    exclude_retailer: list[Name] = Field(default_factory=list, max_length=100, description="not these retailers")
    brand: list[Name] = Field(default_factory=list, max_length=100, description="only these brands (exact)")
    price_min: float | None = Field(default=None, ge=0, description="price at least this")
    price_max: float | None = Field(default=None, ge=0, description="price at most this")
    where: list[PayloadCondition] = Field(
        default_factory=list, max_length=32, description="free conditions on other payload fields (all must hold)"
    )

    @field_validator("category")
    @classmethod
    def _category_path(cls, value: str | None) -> str | None:
        """'A > B' in its stored form; an empty or over-long level is refused here (422), not in the query."""
        if value is None:
            return None
        return category_path(parse_category(value)) or None

    @model_validator(mode="after")
    def _price_range(self) -> SearchFilters:
        if self.price_min is not None and self.price_max is not None and self.price_min > self.price_max:
            raise ValueError(f"price_min {self.price_min} is above price_max {self.price_max}")
        return self


Fusion = Literal["rrf", "dbsf", "weighted"]


class SearchOptions(BaseModel):
    """How results are fused, cut and paged."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    fusion: Fusion = Field(
        default="dbsf",
        description="dbsf (the default): distribution-based score fusion; rrf: reciprocal rank fusion; "
        "weighted: RRF with image_weight / text_weight",
    )
    image_weight: float = Field(default=1.0, ge=0, le=100, description="weight of the image ranking (weighted)")
    text_weight: float = Field(default=1.0, ge=0, le=100, description="weight of the text ranking (weighted)")
    lexical: bool = Field(default=True, description="add the lexical ranking (words, codes, GTIN) for a text")
    lexical_weight: float = Field(default=1.0, ge=0, le=100, description="weight of the lexical ranking (weighted)")
    limit: int = Field(default=10, ge=1, le=100)
    offset: int = Field(default=0, ge=0, le=1_000)
    ranks: bool = Field(
        default=True,
        description="give each result's rank in every ranking before fusion (one more store query per ranking; "
        "false answers a fused query in about half the time on the embedded store)",
    )
    score_threshold: float | None = Field(
        default=None, description="drop results whose returned score is below this (cosine, or the fused score)"
    )

    @model_validator(mode="after")
    def _some_weight(self) -> SearchOptions:
        if self.fusion == "weighted" and self.image_weight == self.text_weight == self.lexical_weight == 0:
            raise ValueError("image_weight, text_weight and lexical_weight cannot all be 0")
        return self


class ModalityScores(BaseModel):
    """Cosine similarity of the query to the product, per modality (None where that side is missing)."""

    image: float | None = Field(default=None, description="best cosine over the product's photos")
    text: float | None = None
    lexical: float | None = Field(default=None, description="share of the query's words and codes the product has")
    ocr: float | None = Field(
        default=None, description="share of the letter trigrams read off the query photo that the product's text has"
    )


class ModalityRanks(BaseModel):
    """Where the product stands in each modality's own ranking (1 = first), before fusion. None: that
    modality was not used, or ranked the product below the candidates it passed to the fusion."""

    image: int | None = None
    text: int | None = None
    lexical: int | None = None
    ocr: int | None = None


class SearchResult(BaseModel):
    id: str = Field(description="the retailer's product id")
    retailer: str
    score: float = Field(description="cosine for a one-modality query; the fused score (rrf, dbsf) when fused")
    scores: ModalityScores
    ranks: ModalityRanks = Field(default_factory=ModalityRanks)
    codes: Literal["same", "conflict"] | None = Field(
        default=None,
        description=(
            "the model numbers typed in the query against the product's: `same`, or `conflict` (a sibling code, "
            "not the same: the score was lowered); None when the query names none or they are unrelated"
        ),
    )
    read_words: list[str] = Field(
        default_factory=list, description="words read off the query photo that the product's title or package has"
    )
    decision: Decision | None = Field(
        default=None,
        description="a query with words, in a catalogue with a match model: is this the product they describe?",
    )
    confidence: float | None = Field(default=None, description="the match model's probability, with `decision`")
    product: Product


class SearchResponse(BaseModel):
    catalogue: str
    read: str | None = Field(
        default=None, description="the text read off the query photo (catalogues that read package text)"
    )
    modes: list[str] = Field(description="which rankings were used: image, text, lexical")
    fusion: Fusion | None = Field(default=None, description="the fusion used when image and text were both given")
    adapted: dict[str, int] = Field(
        default_factory=dict,
        description="modality -> version of the catalogue's adaptation head the query went through",
    )
    took_ms: float
    results: list[SearchResult]
    warnings: list[str] = Field(
        default_factory=list,
        description="what the search left out and why (a query photo's text not read within OCR_DEADLINE_S)",
    )
    model: Literal["catalogue", "default"] | None = Field(
        default=None, description="which match model decided the results (only queries with words are decided)"
    )


class ProductRef(BaseModel):
    """A stored product, named by its retailer and the retailer's id."""

    retailer: str = Field(min_length=1, max_length=128)
    id: str = Field(min_length=1, max_length=256)


class SearchRequest(BaseModel):
    """`POST /search/json`: the programmatic twin of the multipart form."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "catalogue": "grocery",
                    "text": "oat milk",
                    "filters": {
                        "category": "Packages",
                        "exclude_retailer": ["my-shop"],
                        "where": [{"key": "attributes.volume", "match": "1l"}],
                    },
                    "options": {"fusion": "weighted", "image_weight": 1.0, "text_weight": 0.5, "limit": 5},
                },
                {"catalogue": "grocery", "product": {"retailer": "hemkop", "id": "44"}, "options": {"limit": 5}},
            ]
        },
    )

    catalogue: str | None = Field(default=None, pattern=CATALOGUE_PATTERN, description="default DEFAULT_CATALOGUE")
    text: str | None = Field(default=None, max_length=MAX_TEXT_LENGTH)
    image_base64: str | None = Field(
        default=None, max_length=40_000_000, description="a photo, base64-encoded (standard alphabet)"
    )
    product: ProductRef | None = Field(
        default=None, description="search with a stored product's own vectors (it is left out of the results)"
    )
    filters: SearchFilters = Field(default_factory=SearchFilters)
    options: SearchOptions = Field(default_factory=SearchOptions)

    @model_validator(mode="after")
    def _one_kind_of_query(self) -> SearchRequest:
        if self.product is not None and (self.text or self.image_base64):
            raise ValueError("give either a stored product, or an image and/or a text, not both")
        if self.product is None and not (self.text and self.text.strip()) and not self.image_base64:
            raise ValueError("give an image, a text, or both (or a stored product)")
        return self


LabelId = Annotated[str, Field(min_length=1, max_length=256)]
Label = LabelId | ProductRef  # an id in any other retailer, or {"retailer", "id"} for one retailer's


def _refers(label: Label, retailer: str, product_id: str) -> bool:
    if isinstance(label, ProductRef):
        return label.retailer == retailer and label.id == product_id
    return label == product_id


class LabelledPair(BaseModel):
    """What a person said of one stored product (calibration and training input, JSON Lines):

    - `expect`: the same product in other retailers; `[]`: it has no counterpart there. Given, it is the
      whole truth: every other candidate is a non-match.
    - `reject`: listings a person judged not to be the same (hard negatives). Alone (no `expect`), only those
      are labelled and the other candidates are not used.
    - `partial: true`: `expect` names listings judged the same, and says nothing of the other shops (the review
      loop's answers): a shop sells a product under one listing, so its other listings are not the same
      product, and the other shops' listings are not labelled (not used).

    Entries are ids (in any other retailer) or `{"retailer": ..., "id": ...}`. Unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")

    product: ProductRef
    expect: list[Label] | None = Field(
        default=None, max_length=1_000, description="the same product elsewhere; [] = no counterpart"
    )
    reject: list[Label] = Field(default_factory=list, max_length=1_000, description="judged not the same")
    partial: bool = Field(default=False, description="true: `expect` is not the whole truth (review answers)")

    @model_validator(mode="after")
    def _says_something(self) -> LabelledPair:
        if self.expect is None and not self.reject:
            raise ValueError('give "expect" (the same product elsewhere, [] for none) or "reject"')
        if self.partial and not self.expect:
            raise ValueError('"partial" goes with listings in "expect" ([] says the product has no counterpart)')
        both = [e for e in self.expect or [] if any(e == r for r in self.reject)]
        if both:
            raise ValueError(f"{both[0]!r} is both expected and rejected")
        return self

    def label(self, retailer: str, product_id: str) -> bool | None:
        """Whether a candidate is the same product (True), not (False), or unknown (None: not used)."""
        if any(_refers(e, retailer, product_id) for e in self.expect or []):
            return True
        if any(_refers(r, retailer, product_id) for r in self.reject):
            return False
        if self.partial:  # one listing of a product per shop: the shops named by `expect` have no other
            shops = {e.retailer for e in self.expect or [] if isinstance(e, ProductRef)}
            return False if retailer in shops else None
        return False if self.expect is not None else None

    @property
    def positives(self) -> int:
        """Distinct listings labelled the same."""
        return len({(e.retailer, e.id) if isinstance(e, ProductRef) else e for e in self.expect or []})

    def expected_ids(self) -> list[str]:
        return list(dict.fromkeys(e.id if isinstance(e, ProductRef) else e for e in self.expect or []))

    def rejected_ids(self) -> list[str]:
        return list(dict.fromkeys(r.id if isinstance(r, ProductRef) else r for r in self.reject))


class CurvePoint(BaseModel):
    """One operating point the match model can offer, measured on out-of-fold probabilities."""

    model_config = ConfigDict(allow_inf_nan=False)

    threshold: float = Field(ge=0, le=1, description="decide 'match' at or above this probability")
    precision: float = Field(ge=0, le=1)
    recall: float = Field(ge=0, le=1, description="share of the labelled true pairs decided 'match'")


class Calibration(BaseModel):
    """A catalogue's fitted match model (stored in its collection metadata, which a Qdrant server hands back:
    checked like any input). The model is a standard scaling then a logistic regression: `mean` / `scale`
    are the scaler's, `weights` / `bias` the regression's, one value per name in `features`."""

    model_config = ConfigDict(allow_inf_nan=False)

    version: int = Field(default=1, description="the match model's feature set; an older one must be fitted again")
    features: list[str] = Field(max_length=1_000)
    mean: list[float]
    scale: list[float]
    weights: list[float]
    bias: float
    match_threshold: float = Field(ge=0, le=1, description="probability at or above which a candidate is a match")
    uncertain_threshold: float = Field(ge=0, le=1, description="below the match threshold, at or above this: uncertain")
    target_precision: float = Field(gt=0, lt=1)
    precision: float = Field(ge=0, le=1, description="precision of 'match' on the fitting pairs (out-of-fold)")
    recall: float = Field(
        ge=0, le=1, description="share of the fitting's labelled true pairs decided 'match' (out-of-fold)"
    )
    candidates: int = Field(ge=0)
    depth: int = Field(default=5, ge=1, le=100, description="candidates per product the model re-ranks")
    fusion: Fusion = Field(default="rrf", description="the fusion that finds the candidates")
    fitted_at: str = Field(max_length=64)
    source: str = Field(default="", max_length=4_096)
    adapters: dict[str, int] = Field(
        default_factory=dict, description="the adaptation heads active when fitted; under others, fit again"
    )
    reliable: bool = Field(
        default=True,
        description="false when no threshold reached the target (or accepted) precision: it then never decides "
        "'match', only re-ranks and decides 'uncertain' / 'no_match'",
    )
    accepted_precision: float | None = Field(
        default=None, gt=0, lt=1, description="a lower precision the user accepted because the target was not reached"
    )
    curve: list[CurvePoint] = Field(
        default_factory=list, max_length=64, description="the precision / recall it can offer (out-of-fold)"
    )
    reranker: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="the cross-encoder whose pair score is a feature (SHA-256 of its kept folder); none: no pair score",
    )
    rerank_depth: int = Field(default=0, ge=0, le=100, description="first candidates the cross-encoder reads")
    typed_query: Calibration | None = Field(
        default=None,
        description="the same model fitted without the features a typed query cannot have (where it lands in "
        "its candidates' own searches): what decides `/search` results",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Calibration:
        n = len(self.features)
        if not len(self.mean) == len(self.scale) == len(self.weights) == n:
            raise ValueError(f"mean, scale and weights must have one value per feature ({n})")
        if any(s <= 0 for s in self.scale):
            raise ValueError("every scale must be positive")
        if self.uncertain_threshold > self.match_threshold:
            raise ValueError("the uncertain threshold cannot be above the match threshold")
        return self


class MatchResult(SearchResult):
    decision: Decision = Field(description="'uncalibrated' until a threshold is fitted for the catalogue")
    confidence: float | None = Field(default=None, description="probability of being the same product, once calibrated")


class MatchResponse(BaseModel):
    catalogue: str
    product: Product
    calibrated: bool = Field(description="the decisions come from a model fitted on this catalogue's labels")
    reliable: bool = Field(
        description="true when the decisions come from a match model that reached its target precision; "
        "an unreliable one never decides 'match'"
    )
    warning: str | None = Field(default=None, description="why the decisions are missing or unreliable")
    model: Literal["catalogue", "default"] | None = Field(
        default=None,
        description="which match model decided: the catalogue's own (calibrate / train), or the default model "
        "shipped for catalogues without labels (trained on public product pairs, not on this catalogue)",
    )
    matches: list[MatchResult]


class CatalogueInfo(BaseModel):
    name: str
    products: int
    image_encoder: str
    text_encoder: str
    adapters: dict[str, int] = Field(
        default_factory=dict, description="modality -> active adaptation head version (python -m ingest adapt)"
    )
    categories: dict[str, int] = Field(default_factory=dict, description="category path -> product count")
    retailers: dict[str, int] = Field(default_factory=dict)


class CatalogueList(BaseModel):
    catalogues: list[CatalogueInfo]
    default: str


class ErrorResponse(BaseModel):
    detail: str


class LabelIn(BaseModel):
    """`POST /catalogues/{c}/labels`: what a person said of two listings. `right: null` with `same: false`: the
    left product has no counterpart in the other shops."""

    model_config = ConfigDict(extra="forbid")

    left: ProductRef
    right: ProductRef | None = None
    same: bool
    who: str = Field(default="", max_length=64, pattern=r"^[^\x00-\x1f\x7f]*$", description="who answered")

    @model_validator(mode="after")
    def _pair(self) -> LabelIn:
        if self.right is None and self.same:
            raise ValueError('"right": null says the left product has no counterpart: "same" must be false')
        if self.right is not None and self.right.retailer == self.left.retailer:
            raise ValueError("a label compares listings of two retailers; both are of " + repr(self.left.retailer))
        return self


class StoredLabel(LabelIn):
    id: int = Field(description="DELETE /catalogues/{c}/labels/{id} removes it")
    at: str = Field(description="when it was given (UTC, ISO 8601)")


class LabelList(BaseModel):
    catalogue: str
    labels: list[StoredLabel]
    total: int
    contradictions: list[list[int]] = Field(
        default_factory=list,
        description="ids of labels that contradict each other (same and different, or same and no counterpart); "
        "left out of training and of labels.jsonl until one of them is deleted",
    )


class ReviewPair(BaseModel):
    left: Product
    right: Product | None = Field(description="null: no candidate at all (does the product have a counterpart?)")
    probability: float | None = Field(default=None, description="the active match model's, where there is one")
    decision: Decision | None = None
    why: list[str] = Field(description="why the pair is asked: what is uncertain, which signals disagree")
    agree: list[str] = Field(default_factory=list, description="signals saying the two are the same product")
    disagree: list[str] = Field(default_factory=list, description="signals saying they are not")


class ReviewQueue(BaseModel):
    catalogue: str
    retailer: str
    model: Literal["catalogue", "default"] | None = Field(description="the match model whose doubts chose the pairs")
    labels: int = Field(description="labels stored for the catalogue")
    pairs: list[ReviewPair]


class TrainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rerank: bool | None = Field(
        default=None, description="train a cross-encoder too (default: from 400 labelled products)"
    )
    target_precision: float = Field(default=0.95, gt=0.5, lt=1)
    seed: int = Field(default=0, ge=0, le=2**31)
