"""The store layer, the bottom of the engine: the only package that holds a Qdrant backend.

`errors` and `layout` are leaves; `edge` (qdrant-edge-py behind the shapes of qdrant-client's models) and
`edge_client` (the client calls the project makes, on the edge engine) are one backend; `folders` records
which engine wrote an embedded folder; `product_store` opens the backend from settings and is the one object
the layers above talk to. The names below are what those layers import."""

from retrieval.store.errors import CatalogueNotFound, EncoderMismatch, ProductNotFound, StoreBusy, StoreError
from retrieval.store.folders import ENGINE_FILE, claim_folder, folder_engine
from retrieval.store.layout import (
    ADAPTED_VECTORS,
    HIDDEN_PREFIX,
    IMAGE_VECTOR,
    LAYOUT_VERSION,
    LEXICAL_VECTOR,
    PAYLOAD_INDEXES,
    READABLE_LAYOUTS,
    TEXT_VECTOR,
    CollectionMeta,
    Encoder,
    EncoderFingerprint,
    StoredState,
    layout_vectors,
)
from retrieval.store.product_store import ProductStore, StoreObserver, is_embedded, open_client

__all__ = [
    "ADAPTED_VECTORS",
    "ENGINE_FILE",
    "HIDDEN_PREFIX",
    "IMAGE_VECTOR",
    "LAYOUT_VERSION",
    "LEXICAL_VECTOR",
    "PAYLOAD_INDEXES",
    "READABLE_LAYOUTS",
    "TEXT_VECTOR",
    "CollectionMeta",
    "CatalogueNotFound",
    "Encoder",
    "EncoderFingerprint",
    "EncoderMismatch",
    "ProductNotFound",
    "ProductStore",
    "StoreBusy",
    "StoreError",
    "StoreObserver",
    "StoredState",
    "claim_folder",
    "folder_engine",
    "is_embedded",
    "layout_vectors",
    "open_client",
]
