"""Image references to bytes: paths relative to the catalogue file, absolute paths, http(s) URLs."""

from __future__ import annotations

from pathlib import Path

import httpx

from retrieval.images import is_url

MAX_IMAGE_BYTES = 50 * 1024 * 1024
URL_TIMEOUT_S = 15.0


class SourceError(ValueError):
    """An image reference that cannot be read; the message goes into the reject report."""


def resolve_ref(ref: str, base_dir: Path) -> str:
    """A URL stays as it is; a path becomes absolute, relative to the catalogue file's folder."""
    if is_url(ref):
        return ref
    if "://" in ref:
        raise SourceError(f"unsupported image URL scheme in {ref!r}: use http(s) or a file path")
    path = Path(ref).expanduser()
    return str(path if path.is_absolute() else (base_dir / path).resolve())


def read_ref(ref: str, *, client: httpx.Client | None = None, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes behind a resolved ref, bounded in size (and in time for URLs)."""
    if is_url(ref):
        return _fetch(ref, client=client, max_bytes=max_bytes)
    path = Path(ref)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise SourceError(f"file is {size} bytes, over the limit of {max_bytes}")
        return path.read_bytes()
    except FileNotFoundError:
        raise SourceError(f"file not found: {ref}") from None
    except IsADirectoryError:
        raise SourceError(f"is a folder, not an image: {ref}") from None
    except OSError as exc:
        raise SourceError(f"cannot read {ref}: {exc.strerror or exc}") from None


def _fetch(url: str, *, client: httpx.Client | None, max_bytes: int) -> bytes:
    own = client is None
    http = client or httpx.Client(timeout=URL_TIMEOUT_S, follow_redirects=True)
    try:
        with http.stream("GET", url) as response:
            if response.status_code != 200:
                raise SourceError(f"HTTP {response.status_code} for {url}")
            kind = response.headers.get("content-type", "")
            if kind and not kind.startswith(("image/", "application/octet-stream")):
                raise SourceError(f"{url} is {kind}, not an image")
            chunks, total = [], 0
            for chunk in response.iter_bytes():
                total += len(chunk)
                if total > max_bytes:
                    raise SourceError(f"{url} is over the limit of {max_bytes} bytes")
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as exc:
        raise SourceError(f"cannot fetch {url}: {exc.__class__.__name__}: {exc}") from None
    finally:
        if own:
            http.close()
