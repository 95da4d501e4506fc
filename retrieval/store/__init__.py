"""The store layer, the bottom of the engine: the only package that holds a Qdrant backend.

`errors` and `layout` (the one layout spec both engines are configured from) are leaves; `backend` is the
port (`StoreBackend`) and its qdrant-client adapter (a server, or the client's local mode); `edge` (the
qdrant-edge-py engine behind the shapes of qdrant-client's models) and `edge_backend` are the edge engine's
adapter; `folders` records which engine wrote an embedded folder; `product_store` opens a backend from
settings and is the one object the layers above talk to. The names below are what those layers import."""

from retrieval.store.backend import QdrantBackend, StoreBackend
from retrieval.store.errors import (
    CatalogueNameRefused,
    CatalogueNotFound,
    EncoderMismatch,
    ProductNotFound,
    StoreBusy,
    StoreError,
)
from retrieval.store.folders import ENGINE_FILE, claim_folder, folder_engine
from retrieval.store.layout import (
    ADAPTED_VECTORS,
    HIDDEN_PREFIX,
    IMAGE_VECTOR,
    LAYOUT_VERSION,
    LEXICAL_VECTOR,
    OCR_VECTOR,
    PAYLOAD_INDEXES,
    READABLE_LAYOUTS,
    READS_TEXT_FROM,
    TEXT_VECTOR,
    CollectionMeta,
    Encoder,
    EncoderFingerprint,
    StoredState,
    layout_vectors,
)
from retrieval.store.product_store import ProductStore, StoreObserver, open_backend

__all__ = [
    "CatalogueNameRefused",
    "ADAPTED_VECTORS",
    "ENGINE_FILE",
    "HIDDEN_PREFIX",
    "IMAGE_VECTOR",
    "LAYOUT_VERSION",
    "LEXICAL_VECTOR",
    "OCR_VECTOR",
    "PAYLOAD_INDEXES",
    "READABLE_LAYOUTS",
    "READS_TEXT_FROM",
    "TEXT_VECTOR",
    "CollectionMeta",
    "CatalogueNotFound",
    "Encoder",
    "EncoderFingerprint",
    "EncoderMismatch",
    "ProductNotFound",
    "ProductStore",
    "QdrantBackend",
    "StoreBusy",
    "StoreBackend",
    "StoreError",
    "StoreObserver",
    "StoredState",
    "claim_folder",
    "folder_engine",
    "layout_vectors",
    "open_backend",
]
