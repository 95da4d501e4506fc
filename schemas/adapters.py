"""Adaptation heads: the labelled examples they learn from and the record stored with each head (a small
map on frozen vectors, or a fine-tuned text encoder named by the digest of its model folder)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.search import ProductRef

Modality = Literal["image", "text"]
# encoder: a fine-tuned text encoder; tail: the image backbone's last blocks fine-tuned (neither maps vectors)
HeadKind = Literal["linear", "mlp", "encoder", "tail"]
MODEL_KINDS = {"encoder": "text", "tail": "image"}  # the kinds kept as a model folder, and their modality
Method = Literal["supervised", "spread", "finetune"]
Loss = Literal["contrastive", "triplet"]


class AdaptExample(BaseModel):
    """One labelled line (JSON Lines): a photo and/or a text, or a stored product, and the ids of the stored
    products that are the same product. The evaluation-set queries and the calibration pairs both fit."""

    model_config = ConfigDict(extra="ignore")

    image: str | None = Field(default=None, max_length=4096, description="photo path, relative to the file")
    text: str | None = Field(default=None, max_length=10_000)
    product: ProductRef | None = Field(default=None, description="a stored product as the example")
    expect: list[str] = Field(default_factory=list, max_length=1_000, description="ids of the same product")

    @model_validator(mode="after")
    def _needs_input(self) -> AdaptExample:
        if not (self.image or self.text or self.product):
            raise ValueError("an example needs an image, a text or a product")
        return self


class HoldOut(BaseModel):
    """Recall@1 of the held-out examples under the condition: the head's own early-stopping measure."""

    examples: int
    before: float = Field(description="with the raw vectors (no head)")
    after: float = Field(description="through the head")


class FitFigures(Protocol):
    """What a record reads off a fit (a head's, an encoder's or a tail's)."""

    epochs: int
    seconds: float
    holdout: int  # held-out examples (0: none)
    before: float
    after: float


class AdapterRecord(BaseModel):
    """A stored head, without its weights: what `python -m ingest adapt --list` shows."""

    catalogue: str
    modality: Modality
    version: int = Field(ge=1)
    method: Method
    kind: HeadKind
    condition: str = Field(description="what counts as the same: product, category, or a payload key")
    loss: Loss | None = None
    encoder: str = Field(description="the encoder whose vectors the head takes")
    dim: int
    created: datetime
    examples: int = Field(description="labelled examples used (anchors)")
    source: str = Field(default="", description="the labelled file, or the payload key")
    epochs: int = 0
    seconds: float = 0.0
    holdout: HoldOut | None = None
    spread: tuple[float, float] | None = Field(
        default=None, description="spread only: mean pairwise cosine of the catalogue's vectors before, after"
    )
    model: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="encoder and tail: SHA-256 digest of the fine-tuned model folder (under MODELS_PATH)",
    )
    blocks: int | None = Field(default=None, ge=0, description="tail only: the backbone's blocks fine-tuned")
    max_length: int | None = Field(default=None, ge=1, description="encoder only: tokens read per text")
    hard_negatives: int | None = Field(default=None, ge=0, description="encoder only: anchors given a mined negative")

    @model_validator(mode="after")
    def _model_kinds_name_their_model(self) -> AdapterRecord:
        if (self.kind in MODEL_KINDS) != (self.model is not None):
            raise ValueError("a fine-tuned encoder or tail names its model folder's digest, and only they do")
        if self.kind in MODEL_KINDS and self.modality != MODEL_KINDS[self.kind]:
            raise ValueError(f"a fine-tuned {self.kind} is of the {MODEL_KINDS[self.kind]} modality")
        return self

    @classmethod
    def of_fit(
        cls,
        fit: FitFigures,
        *,
        catalogue: str,
        modality: Modality,
        method: Method,
        kind: HeadKind,
        encoder: str,
        dim: int,
        examples: int,
        source: str,
        condition: str = "product",
        **specific: object,
    ) -> AdapterRecord:
        """The record of a head, encoder or tail just fitted (version 1 until the store numbers it), its epochs,
        seconds and held-out figures read off `fit`; `specific`: the fields of its kind (model, blocks, ...)."""
        holdout = HoldOut(examples=fit.holdout, before=fit.before, after=fit.after) if fit.holdout else None
        return cls.model_validate(
            {
                "catalogue": catalogue,
                "modality": modality,
                "version": 1,
                "method": method,
                "kind": kind,
                "condition": condition,
                "encoder": encoder,
                "dim": dim,
                "created": datetime.now(UTC),
                "examples": examples,
                "source": source,
                "epochs": fit.epochs,
                "seconds": round(fit.seconds, 2),
                "holdout": holdout,
                **specific,
            }
        )

    @property
    def label(self) -> str:
        """How the active version is shown: `encoder v2 1a2b3c4d5e6f`, `tail v3 ...`, `linear v1`."""
        suffix = f" {self.model[:12]}" if self.model else ""
        return f"{self.kind} v{self.version}{suffix}"
