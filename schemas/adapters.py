"""Adaptation heads: the labelled examples they learn from and the record stored with each head (a small
map on frozen vectors, or a fine-tuned text encoder named by the digest of its model folder)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.search import ProductRef

Modality = Literal["image", "text"]
HeadKind = Literal["linear", "mlp", "encoder"]  # encoder: a fine-tuned text encoder, not a map on vectors
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
        description="encoder only: SHA-256 digest of the fine-tuned model folder (under MODELS_PATH)",
    )
    max_length: int | None = Field(default=None, ge=1, description="encoder only: tokens read per text")
    hard_negatives: int | None = Field(default=None, ge=0, description="encoder only: anchors given a mined negative")

    @model_validator(mode="after")
    def _encoder_names_its_model(self) -> AdapterRecord:
        if (self.kind == "encoder") != (self.model is not None):
            raise ValueError("a fine-tuned encoder record names its model folder's digest, and only it does")
        if self.kind == "encoder" and self.modality != "text":
            raise ValueError("only the text encoder is fine-tuned")
        return self

    @property
    def label(self) -> str:
        """How the active version is shown: `encoder v2 1a2b3c4d5e6f`, `linear v1`."""
        suffix = f" {self.model[:12]}" if self.model else ""
        return f"{self.kind} v{self.version}{suffix}"
