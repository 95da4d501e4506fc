"""What an adaptation head learns from: the catalogue's stored vectors labelled by a condition, and the
labelled examples of a JSON Lines file (photos and texts embedded once, cached by content)."""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from retrieval.adapt.train import Examples
from retrieval.encoders.base import ImageEncoder, TextEncoder
from retrieval.images import MAX_IMAGE_BYTES, ImageDecodeError, LocalFileError, decode_image, read_regular_file
from retrieval.store import IMAGE_VECTOR, ProductStore
from schemas.adapters import AdaptExample

log = logging.getLogger(__name__)
PAGE = 256
CONDITION_KEYS = {"category": "category_path"}  # a condition's name -> the payload key that holds it


@dataclass
class Stored:
    """The catalogue as the head sees it: one row per stored vector (per photo for images)."""

    rows: np.ndarray  # (m, d)
    owners: np.ndarray  # (m,) product index of each row
    ids: list[tuple[str, str]]  # product index -> (retailer, id)
    values: list[Any]  # product index -> the condition's payload value (None: missing)
    titles: list[str]
    by_id: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for index, (_, product_id) in enumerate(self.ids):
            self.by_id.setdefault(product_id, []).append(index)


def read_catalogue(store: ProductStore, catalogue: str, modality: str, condition: str) -> Stored:
    """Every product's raw `modality` vector(s) and its value of the condition's payload key."""
    key = CONDITION_KEYS.get(condition, condition)
    root = key.split(".")[0]
    rows: list[np.ndarray] = []
    owners: list[int] = []
    ids: list[tuple[str, str]] = []
    values: list[Any] = []
    titles: list[str] = []
    pages = store.scroll_pages(
        catalogue, page=PAGE, with_payload=["retailer", "product_id", "title", root], with_vectors=[modality]
    )
    for point in (point for points in pages for point in points):
        payload = point.payload or {}
        vector = (point.vector if isinstance(point.vector, dict) else {}).get(modality)
        if not vector:
            continue
        matrix = np.asarray(vector, dtype=np.float32)
        matrix = matrix if matrix.ndim == 2 else matrix[None, :]
        index = len(ids)
        ids.append((str(payload.get("retailer")), str(payload.get("product_id"))))
        values.append(None if condition == "product" else _value(payload, key))
        titles.append(str(payload.get("title") or payload.get("product_id")))
        rows.append(matrix)
        owners += [index] * len(matrix)
    if not ids:
        raise ValueError(f"catalogue {catalogue!r} has no stored {modality} vectors to adapt")
    return Stored(np.vstack(rows), np.asarray(owners, dtype=np.int64), ids, values, titles)


def _value(payload: dict[str, Any], key: str) -> Any:
    value: Any = payload
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value if value not in ("", [], None) else None


class Groups:
    """Union-find over product indexes: products named the same by the labelled lines."""

    def __init__(self, size: int) -> None:
        self.parent = list(range(size))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def join(self, members: Sequence[int]) -> None:
        for other in members[1:]:
            self.parent[self.find(other)] = self.find(members[0])


@dataclass
class Labelled:
    """The examples with the lines that could not be used and why."""

    examples: Examples
    skipped: list[str]
    anchors_from: str  # "photos", "texts", "products" or "catalogue"


PhotoVectors = tuple[list[np.ndarray | None], dict[Path, str]]


@dataclass
class _Anchor:
    vector: np.ndarray
    product: int  # the (first) expected product: its label is the anchor's
    owner: int  # -1 for a photo or text from outside the catalogue


def read_examples(path: Path) -> tuple[list[tuple[int, AdaptExample]], list[str]]:
    """(line number, example) for each valid line, and 'line N: reason' for each invalid one."""
    examples, skipped = [], []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            examples.append((number, AdaptExample.model_validate_json(line)))
        except ValidationError as exc:
            skipped.append(f"line {number}: {_first_error(exc)}")
    return examples, skipped


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(p) for p in error.get("loc", ()))
    return f"{where}: {error['msg']}" if where else str(error["msg"])


def labelled_examples(
    stored: Stored,
    modality: str,
    condition: str,
    lines: list[tuple[int, AdaptExample]] | None,
    *,
    base: Path,
    embed_photos: Callable[[Sequence[Path]], PhotoVectors] | None = None,
    text_encoder: TextEncoder | None = None,
    required: bool = True,
) -> Labelled:
    """Anchors and gallery, both labelled by the condition. With lines, the anchors are their photos (image
    heads) or texts (text heads) or their stored products; without, every stored product is an anchor and
    its label the condition's payload value (a condition other than `product` is needed then), unless no
    anchors are `required` (the unsupervised spread)."""
    groups = Groups(len(stored.ids))
    skipped: list[str] = []
    anchors: list[_Anchor] = []
    source = "catalogue"
    if lines is None and not required:
        pass  # the unsupervised spread needs no anchors
    elif lines is None:
        if condition == "product":
            raise ValueError(
                "nothing says which products are the same: give --examples FILE, or a --condition such as "
                "category or a payload key (brand, attributes.colour)"
            )
        anchors = [_Anchor(row, int(owner), int(owner)) for row, owner in zip(stored.rows, stored.owners, strict=True)]
    else:
        photos: list[tuple[int, Path, int]] = []  # line, path, expected product
        texts: list[tuple[int, str, int]] = []
        members_seen: set[int] = set()
        by_ref = {ref: i for i, ref in enumerate(stored.ids)}
        for number, example in lines:
            expected = [i for product_id in example.expect for i in stored.by_id.get(product_id, [])]
            own = None
            if example.product is not None:
                own = by_ref.get((example.product.retailer, example.product.id))
                if own is None:
                    skipped.append(f"line {number}: no stored product {example.product.retailer}/{example.product.id}")
                    continue
            if not expected:
                reason = "no expected product" if not example.expect else "none of its expected ids is stored"
                skipped.append(f"line {number}: {reason}")
                continue
            members = ([own] if own is not None else []) + expected
            if condition == "product":
                groups.join(members)
            if own is not None:
                for member in members:
                    if member not in members_seen:
                        members_seen.add(member)
                        anchors += [_Anchor(row, member, member) for row in stored.rows[stored.owners == member][:1]]
                source = "products"
            elif modality == IMAGE_VECTOR and example.image:
                photos.append((number, _resolve(base, example.image), expected[0]))
            elif modality != IMAGE_VECTOR and example.text:
                texts.append((number, example.text, expected[0]))
            else:
                skipped.append(f"line {number}: no {'image' if modality == IMAGE_VECTOR else 'text'} to learn from")
        if photos:
            if embed_photos is None:
                raise ValueError("photo examples need the image encoder")
            vectors, failures = embed_photos([path for _, path, _ in photos])
            for (number, path, product), vector in zip(photos, vectors, strict=True):
                if vector is None:
                    skipped.append(f"line {number}: {path}: {failures.get(path, 'not decoded')}")
                else:
                    anchors.append(_Anchor(vector, product, -1))
            source = "photos"
        if texts:
            if text_encoder is None:
                raise ValueError("text examples need the text encoder")
            for (_, _, product), vector in zip(texts, text_encoder.embed_texts([t for _, t, _ in texts]), strict=True):
                anchors.append(_Anchor(np.asarray(vector, dtype=np.float32), product, -1))
            source = "texts"
    labels = _labels(stored, condition, groups)
    examples = Examples(
        anchors=np.vstack([a.vector for a in anchors]).astype(np.float32)
        if anchors
        else np.zeros((0, stored.rows.shape[1]), np.float32),
        labels=np.asarray([labels[a.product] for a in anchors], dtype=np.int64),
        owners=np.asarray([a.owner for a in anchors], dtype=np.int64),
        gallery=stored.rows,
        gallery_labels=labels[stored.owners],
        gallery_owners=stored.owners,
        products=np.asarray([groups.find(a.product) for a in anchors], dtype=np.int64),
    )
    answerable = examples.answerable() if len(examples) else np.zeros(0, dtype=bool)
    if len(examples) and not answerable.all():
        skipped.append(f"{int((~answerable).sum())} examples have no other stored product of their label")
        examples = examples.take(np.flatnonzero(answerable))
    return Labelled(examples, skipped, source)


def _labels(stored: Stored, condition: str, groups: Groups) -> np.ndarray:
    """Product index -> an integer label: its group (condition `product`) or its payload value (a product
    without a value is a class of its own)."""
    if condition == "product":
        return np.asarray([groups.find(i) for i in range(len(stored.ids))], dtype=np.int64)
    codes: dict[str, int] = {}
    out = []
    for index, value in enumerate(stored.values):
        key = repr(value) if value is not None else f"\0{index}"
        out.append(codes.setdefault(key, len(codes)))
    return np.asarray(out, dtype=np.int64)


def _resolve(base: Path, ref: str) -> Path:
    path = Path(ref)
    return path if path.is_absolute() else base / path


class PhotoEmbedder:
    """Photo files -> vectors of one image encoder, cached on disk by the sha256 of the file's bytes, so
    fitting again (other settings, another condition) decodes no photo twice."""

    def __init__(self, encoder: ImageEncoder, cache_dir: Path, *, max_pixels: int, batch_size: int = 8) -> None:
        self.encoder = encoder
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", encoder.name)[:80]
        self.path = cache_dir / f"{safe}-{hashlib.sha256(encoder.name.encode()).hexdigest()[:10]}.npz"
        self.max_pixels = max_pixels
        self.batch_size = batch_size
        self.cached: dict[str, np.ndarray] = {}
        self.embedded = 0
        if self.path.is_file():
            try:
                with np.load(self.path) as stored:
                    self.cached = {name: stored[name] for name in stored.files}
            except (OSError, ValueError) as exc:
                log.warning("ignoring the unreadable embedding cache %s: %s", self.path, exc)

    def __call__(self, paths: Sequence[Path]) -> PhotoVectors:
        failures: dict[Path, str] = {}
        digests: list[str | None] = []
        for path in paths:
            try:
                digests.append(hashlib.sha256(read_regular_file(str(path), max_bytes=MAX_IMAGE_BYTES)).hexdigest())
            except LocalFileError as exc:
                failures[path] = str(exc)
                digests.append(None)
        wanted = {d: p for d, p in zip(digests, paths, strict=True) if d is not None and d not in self.cached}
        for batch in _batches(list(wanted.items()), self.batch_size):
            with ThreadPoolExecutor(2) as pool:
                tensors = list(pool.map(lambda item: self._tensor(item[1], failures), batch))
            ready = [(digest, t) for (digest, _), t in zip(batch, tensors, strict=True) if t is not None]
            if ready:
                rows = self.encoder.embed_tensors(torch.stack([t for _, t in ready]))
                for (digest, _), row in zip(ready, rows, strict=True):
                    self.cached[digest] = np.asarray(row, dtype=np.float32)
                self.embedded += len(ready)
        if wanted:
            self._save()
        return [self.cached.get(d) if d is not None else None for d in digests], failures

    def _tensor(self, path: Path, failures: dict[Path, str]) -> torch.Tensor | None:
        try:
            data = read_regular_file(str(path), max_bytes=MAX_IMAGE_BYTES)
            return self.encoder.preprocess(decode_image(data, max_pixels=self.max_pixels))
        except (LocalFileError, ImageDecodeError) as exc:
            failures[path] = str(exc)
            return None

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".part.npz")
        np.savez(partial, allow_pickle=False, **self.cached)
        partial.replace(self.path)


def _batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
