"""Settings -> store -> encoders -> engine, wired once for every command, the service and the benches."""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType

from retrieval.adapt.heads import trunk_cache_root
from retrieval.encoders import ImageEncoder, TextEncoder, load_image_encoder, load_text_encoder
from retrieval.search import SearchEngine
from retrieval.settings import Settings
from retrieval.store import ProductStore


def load_encoders(settings: Settings, *, serving: bool = False) -> tuple[ImageEncoder, TextEncoder]:
    """Both encoders of the settings (cached per spec: a second call loads nothing); `serving`: for the service
    (INFERENCE=auto picks the image runtime measured fastest at serving queries, `load_image_encoder`)."""
    return (
        load_image_encoder(
            settings.image_model,
            settings.image_precision,
            inference=settings.inference,
            onnx_cache=settings.models_root / "onnx",
            serving=serving,
        ),
        load_text_encoder(settings.text_model, settings.text_precision),
    )


@dataclass
class Runtime:
    """What a command works with; closing it closes the store."""

    settings: Settings
    store: ProductStore
    engine: SearchEngine

    @property
    def image_encoder(self) -> ImageEncoder:
        return self.engine.image_encoder

    @property
    def text_encoder(self) -> TextEncoder:
        return self.engine.text_encoder

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


def open_runtime(settings: Settings, *, store: ProductStore | None = None, serving: bool = False) -> Runtime:
    """Open the store first (a busy store fails in a moment, not after the models have loaded), then load the
    encoders; the store is closed again when they cannot be loaded. `store`: one already opened; `serving`: the
    service's runtime (`load_encoders`)."""
    store = store or ProductStore.open(settings)
    try:
        image_encoder, text_encoder = load_encoders(settings, serving=serving)
    except BaseException:
        store.close()
        raise
    engine = SearchEngine(
        store,
        image_encoder,
        text_encoder,
        query_crops=settings.query_crop_shares,
        crops_margin=settings.query_crops_margin,
        models_root=settings.models_root,
        model_precision=settings.text_precision,
        cache_root=trunk_cache_root(settings),
        read_deadline_s=settings.ocr_deadline_s,
    )
    return Runtime(settings, store, engine)
