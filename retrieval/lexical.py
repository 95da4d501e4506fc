"""The lexical signal: normalised words and identifiers as a sparse vector (BM25 term weights; Qdrant
applies IDF through the sparse vector's modifier), so model numbers, sizes and GTINs count exactly."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import defaultdict
from collections.abc import Iterable

from qdrant_client import models

from schemas.catalogue import CatalogueRecord

K1 = 1.2  # BM25 term-frequency saturation
B = 0.75  # BM25 length normalisation, against a fixed typical length (a running average would change
AVERAGE_LENGTH = 12.0  # every stored weight whenever the catalogue grows)
# Field weights: identifiers are the strongest evidence, words of the title and brand next.
IDENTIFIER_WEIGHT = 3.0
GTIN_WEIGHT = 10.0
DESCRIPTION_WEIGHT = 0.5
STOPWORDS = frozenset("a an and the of for with in on to by from at or is are this that it as be its new".split())
_WORD = re.compile(r"[0-9a-z]+(?:[-./][0-9a-z]+)*")
_GTIN_IN_TEXT = re.compile(r"(?<!\d)(\d{8}|\d{12,14})(?!\d)")


def normalise(text: str) -> str:
    """NFKC, lower case, accents removed ("Äpple" and "apple" share their letters)."""
    text = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", text).lower())
    return "".join(c for c in text if not unicodedata.combining(c))


def tokens(text: str) -> list[str]:
    """Words and codes: `dsc-w120p` gives `dsc-w120p`, `dscw120p`, `dsc`, `w120p`; stopwords dropped."""
    out: list[str] = []
    for word in _WORD.findall(normalise(text)):
        parts = re.split(r"[-./]", word)
        if len(parts) > 1:
            out.append(word)
            if any(c.isdigit() for c in word):
                out.append("".join(parts))  # the code as written without separators
        out += [p for p in parts if p not in STOPWORDS and (len(p) > 1 or p.isdigit())]
    return out


def codes(text: str) -> set[str]:
    """Model-number-like tokens (letters and digits, 4+ characters, separators removed): `KX-TG6313S` ->
    `kxtg6313s`."""
    return {
        t
        for t in tokens(text)
        if len(t) >= 4 and t.isalnum() and any(c.isdigit() for c in t) and any(c.isalpha() for c in t)
    }


def code_stem(code: str) -> str:
    """A code without its trailing letters, which are often a colour or region (`ysp3050bk` -> `ysp3050`)."""
    stem = code.rstrip("abcdefghijklmnopqrstuvwxyz")
    return stem if len(stem) >= 4 and any(c.isalpha() for c in stem) else code


def gtin_token(gtin: str) -> str:
    return f"gtin:{gtin.zfill(14)}"


def term_index(token: str) -> int:
    """A stable 32-bit id per token (the same on every machine and backend)."""
    return int.from_bytes(hashlib.blake2b(token.encode(), digest_size=4).digest(), "big")


def _sparse(weights: dict[str, float]) -> models.SparseVector:
    by_index: dict[int, float] = {}
    for token, weight in weights.items():
        index = term_index(token)
        by_index[index] = by_index.get(index, 0.0) + weight
    indices = sorted(by_index)
    return models.SparseVector(indices=indices, values=[by_index[i] for i in indices])


def document_vector(record: CatalogueRecord) -> models.SparseVector | None:
    """BM25 term weights (saturated term frequency, field-weighted) of a product's words and identifiers."""
    counts: defaultdict[str, float] = defaultdict(float)
    fields: list[tuple[str | None, float]] = [
        (record.title, 1.0),
        (record.brand, 1.0),
        (record.mpn, IDENTIFIER_WEIGHT),
        (record.description, DESCRIPTION_WEIGHT),
    ]
    for text, weight in fields:
        for token in tokens(text or ""):
            counts[token] += weight
    if record.gtin:
        counts[gtin_token(record.gtin)] += GTIN_WEIGHT
    if not counts:
        return None
    norm = K1 * (1 - B + B * sum(counts.values()) / AVERAGE_LENGTH)
    return _sparse({t: f * (K1 + 1) / (f + norm) for t, f in counts.items()})


def query_terms(text: str) -> list[str]:
    """The distinct terms of a query, GTIN-looking numbers also as GTIN terms."""
    terms = list(dict.fromkeys(tokens(text)))
    terms += [gtin_token(m) for m in _GTIN_IN_TEXT.findall(text)]
    return terms


def query_vector(text: str) -> models.SparseVector | None:
    terms = query_terms(text)
    return _sparse(dict.fromkeys(terms, 1.0)) if terms else None


def overlap(query: models.SparseVector, document: Iterable[int]) -> float:
    """Share of the query's terms that the product contains: the lexical score shown to people."""
    if not query.indices:
        return 0.0
    present = set(document)
    return sum(i in present for i in query.indices) / len(query.indices)
