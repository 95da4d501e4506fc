"""An embedded store folder says which engine wrote it, and the other engine refuses it with a message
instead of showing an empty store; contradictory store settings stop at start."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from retrieval.settings import Settings
from retrieval.store import ENGINE_FILE, EncoderFingerprint, ProductStore, StoreError, open_backend
from service.__main__ import main as service_main


@pytest.mark.parametrize(("writer", "reader"), [("local", "edge"), ("edge", "local")])
def test_the_other_engine_refuses_a_folder(tmp_path: Path, writer: str, reader: str) -> None:
    store = ProductStore.open(Settings(qdrant_path=tmp_path, store_backend=writer))
    store.close()
    assert (tmp_path / ENGINE_FILE).read_text().strip() == writer
    with pytest.raises(StoreError, match=f"written by the '{writer}' engine, not '{reader}'.*STORE_BACKEND={writer}"):
        open_backend(Settings(qdrant_path=tmp_path, store_backend=reader))
    again = ProductStore.open(Settings(qdrant_path=tmp_path, store_backend=writer))
    assert again.catalogues() == []
    again.close()


def test_a_folder_from_before_the_marker_is_recognised(tmp_path: Path) -> None:
    # Before the marker, the default engine was qdrant-client's local mode: such a folder opens by default
    # (auto) with the engine that wrote it, its catalogues intact.
    store = ProductStore.open(Settings(qdrant_path=tmp_path, store_backend="local"))
    store.ensure_catalogue("old", EncoderFingerprint("timm:x", 4, "st:y", 3))
    store.close()
    (tmp_path / ENGINE_FILE).unlink()  # as a store written before folders were marked
    with pytest.raises(StoreError, match="written by the 'local' engine"):
        open_backend(Settings(qdrant_path=tmp_path, store_backend="edge"))
    reopened = ProductStore.open(Settings(qdrant_path=tmp_path))
    assert reopened.engine == "local" and reopened.catalogues() == ["old"]
    reopened.close()
    assert (tmp_path / ENGINE_FILE).read_text().strip() == "local"  # marked from now on


def test_a_new_folder_gets_the_edge_engine_by_default(tmp_path: Path) -> None:
    store = ProductStore.open(Settings(qdrant_path=tmp_path / "new"))
    assert store.engine == "edge" and Settings().store_backend == "auto"
    store.close()
    assert (tmp_path / "new" / ENGINE_FILE).read_text().strip() == "edge"


def test_contradictory_store_settings_stop_the_start(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValidationError, match="STORE_BACKEND=edge chooses an embedded engine"):
        Settings(qdrant_url="http://localhost:6333", store_backend="edge")
    with pytest.raises(ValidationError, match="STORE_BACKEND=local chooses an embedded engine"):
        Settings(qdrant_url="http://localhost:6333", store_backend="local")
    assert Settings(qdrant_url="http://localhost:6333").store_backend == "auto"  # the default says nothing
    monkeypatch.setenv("QDRANT_URL", "http://localhost:6333")
    monkeypatch.setenv("STORE_BACKEND", "edge")
    assert service_main(["--port", "1"]) == 2
    assert "STORE_BACKEND=edge chooses an embedded engine" in capsys.readouterr().err
