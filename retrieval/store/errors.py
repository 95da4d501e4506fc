"""What the store raises: each message says what went wrong and what to do (a leaf: imports nothing of ours)."""

from __future__ import annotations

from collections.abc import Sequence


class StoreError(RuntimeError):
    """The store cannot do what was asked; the message says why and what to do."""


class CatalogueNameRefused(StoreError):
    """A new catalogue's name would collide with the store's own files or with another catalogue."""


class StoreBusy(StoreError):
    """The embedded store folder is held by another process."""


class CatalogueNotFound(StoreError):
    def __init__(self, name: str, known: Sequence[str]) -> None:
        listed = ", ".join(sorted(known)) or "none yet"
        super().__init__(f"catalogue {name!r} does not exist (catalogues: {listed}); ingest it first")
        self.name = name


class ProductNotFound(StoreError):
    def __init__(self, catalogue: str, retailer: str, product_id: str) -> None:
        super().__init__(f"no product {product_id!r} of retailer {retailer!r} in catalogue {catalogue!r}")


class EncoderMismatch(StoreError):
    """The collection's vectors came from other encoders than the ones loaded now."""
