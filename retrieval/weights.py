"""Model folders kept by content hash: fine-tuned weights that a catalogue's record names by digest.

A fine-tuned encoder or re-ranker is a folder of files (a sentence-transformers or cross-encoder save). It
is copied into `MODELS_PATH/<sha256>` once, and the catalogue's record stores only the digest; whoever loads
it (the service, every command) finds the folder by that digest and checks it still hashes to it, so a
record can never point a process at another folder, and a changed or half-copied folder is refused."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


class ModelFolderError(RuntimeError):
    """A kept model folder is missing, altered, or named by something that is not a digest."""


def folder_digest(path: Path) -> str:
    """SHA-256 over every file's relative name and bytes, in sorted order (links are not followed)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    for file in files:
        digest.update(file.relative_to(path).as_posix().encode("utf-8") + b"\0")
        with file.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def keep_model(source: Path, root: Path) -> str:
    """Copy the folder `source` into `root/<digest>` (atomically: a partial copy is never seen under that
    name) and return the digest; a folder already kept is not copied again."""
    digest = folder_digest(source)
    target = root / digest
    if target.is_dir():
        return digest
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=root))
    try:
        shutil.copytree(source, staging / "model", symlinks=False)
        os.replace(staging / "model", target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return digest


def kept_model(root: Path, digest: str, *, verify: bool = True) -> Path:
    """The folder kept under `digest`; ModelFolderError when the digest is malformed, the folder is missing
    or (with `verify`) its files no longer hash to the digest."""
    if not _DIGEST.match(digest):
        raise ModelFolderError("a model is named by a 64-character SHA-256 digest")
    folder = root / digest
    if not folder.is_dir():
        raise ModelFolderError(f"model {digest[:12]} is not in {root}: copy the models folder beside the store")
    if verify and folder_digest(folder) != digest:
        raise ModelFolderError(f"model {digest[:12]} in {root} was altered: its files no longer hash to its name")
    return folder
