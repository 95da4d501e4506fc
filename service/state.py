"""What the app holds for its lifetime: settings, the store client and the search engine."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from retrieval.encoders import load_image_encoder, load_text_encoder
from retrieval.query import SearchEngine
from retrieval.settings import Settings
from retrieval.store import ProductStore, open_client

log = logging.getLogger("service")


@dataclass
class AppState:
    settings: Settings
    store: ProductStore
    engine: SearchEngine

    def close(self) -> None:
        self.store.close()


def build_state(settings: Settings) -> AppState:
    """Load both encoders and open the store; raises StoreBusy / EncoderError with a readable message."""
    log.info("loading encoders %s and %s", settings.image_model, settings.text_model)
    image_encoder = load_image_encoder(settings.image_model)
    text_encoder = load_text_encoder(settings.text_model)
    store = ProductStore(open_client(settings))
    log.info("store: %s; catalogues: %s", settings.describe_store(), ", ".join(store.catalogues()) or "none")
    return AppState(settings, store, SearchEngine(store, image_encoder, text_encoder))
