"""An embedded store folder records which engine wrote it, so that the other engine refuses it with a message
instead of showing an empty store."""

from __future__ import annotations

from pathlib import Path

from retrieval.store.errors import StoreError
from retrieval.store.layout import SHARD_DIR

ENGINE_FILE = "ENGINE"  # in an embedded store folder: which engine wrote it ('local' or 'edge')
# A new folder's engine under STORE_BACKEND=auto (the default): the edge engine answers a filtered fused query
# over 100k products in p95 22 ms where local mode needs 1.8 s at 20k (docs/BENCHMARKS.md, "Embedded scale").
DEFAULT_ENGINE = "edge"


def folder_engine(path: Path) -> str | None:
    """Which engine wrote an embedded store folder: its ENGINE file, else what the folder holds (qdrant-client
    local mode writes meta.json and collection/, the edge engine a shard folder per catalogue), else None."""
    marker = path / ENGINE_FILE
    if marker.is_file():
        return marker.read_text(encoding="utf-8").strip() or None
    if (path / "meta.json").is_file() or (path / "collection").is_dir():
        return "local"
    if any((child / SHARD_DIR).is_dir() for child in path.iterdir() if child.is_dir()):
        return "edge"
    return None


def claim_folder(path: Path, engine: str) -> None:
    """Record `engine` as the folder's writer, or refuse a folder another engine wrote: opened by the other
    engine it would look empty, and a user would take their catalogues for lost."""
    found = folder_engine(path)
    if found is not None and found != engine:
        raise StoreError(
            f"the embedded store {path} was written by the {found!r} engine, not {engine!r}: set "
            f"STORE_BACKEND={found} (or auto, the default) to open it, or set QDRANT_PATH to another folder"
        )
    if found is None or not (path / ENGINE_FILE).is_file():
        (path / ENGINE_FILE).write_text(engine + "\n", encoding="utf-8")
