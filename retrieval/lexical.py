"""The lexical signal: normalised words and identifiers as a sparse vector (BM25 term weights; Qdrant
applies IDF through the sparse vector's modifier), so model numbers, sizes and GTINs count exactly.

Titles from many shops spell the same thing many ways, so the text is cleaned first (HTML entities and
tags, language tags such as `@en`, trademark signs), sizes become one token (`27-inch`, `27"` -> `27in`;
`1000 ml` -> `1l`), and every identifier-like span (letters and digits, or a long number: `DCS-5030L`,
`dcs5030l`) adds a code term, and its core without a colour or region suffix (`kxtg6313s` -> `kxtg6313`) a
weaker one, on top of the words. A code that matches is then worth several shared words; measured on
abt-buy in docs/BENCHMARKS.md. Code terms do not count towards a document's length, so a product that
carries a code does not lose on plain-word queries."""

from __future__ import annotations

import hashlib
import html
import math
import re
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Mapping

from qdrant_client import models

from schemas.catalogue import CatalogueRecord

K1 = 1.2  # BM25 term-frequency saturation
B = 0.75  # BM25 length normalisation, against a fixed typical length (a running average would change
AVERAGE_LENGTH = 12.0  # every stored weight whenever the catalogue grows)
# Field weights: identifiers are the strongest evidence, words of the title and brand next.
IDENTIFIER_WEIGHT = 3.0
GTIN_WEIGHT = 10.0
DESCRIPTION_WEIGHT = 0.5
CODE_WEIGHT = 3.0  # a code term, on both sides (2-5 measured the same on abt-buy)
CORE_WEIGHT = 1.5  # a code's core (the code less its trailing letters)
STOPWORDS = frozenset("a an and the of for with in on to by from at or is are this that it as be its new".split())
_WORD = re.compile(r"[0-9a-z]+(?:[-./][0-9a-z]+)*")
_GTIN_IN_TEXT = re.compile(r"(?<!\d)(\d{8}|\d{12,14})(?!\d)")


_TAG = re.compile(r"<[^<>]{1,40}>")
_LANGUAGE_TAG = re.compile(r'"?@[a-z]{2}(?:-[a-z]{2})?\b')  # "iMac 27"@en, @en-us
_TRADEMARK = re.compile(r"\(\s*(?:r|tm|c)\s*\)|[®™©]")
_NUMBER = r"(\d+(?:[.,]\d+)*)"
# (how a unit is written after a number, its canonical name); inches first: `27"`, `27''`, `27-inch`, `27 in.`
_UNITS = [
    (r"(?:''|\"|”|'|-?inch(?:es)?\b|-?in\b\.?)", "in"),
    (r"-?(?:gb|gig(?:abytes?)?)\b", "gb"),
    (r"-?tb\b", "tb"),
    (r"-?mb\b", "mb"),
    (r"-?(?:megapixels?|mp|mpix)\b", "mp"),
    (r"-?(?:watts?|w)\b", "w"),
    (r"-?ghz\b", "ghz"),
    (r"-?mhz\b", "mhz"),
    (r"-?khz\b", "khz"),
    (r"-?hz\b", "hz"),
    (r"-?mm\b", "mm"),
    (r"-?cm\b", "cm"),
    (r"-?(?:ml|millilit(?:er|re)s?)\b", "ml"),
    (r"-?(?:l|lit(?:er|re)s?|ltr)\b", "l"),
    (r"-?(?:lbs?|pounds?)\b", "lb"),
    (r"-?(?:oz|ounces?)\b", "oz"),
    (r"-?(?:cu\s*\.?\s*ft\b\.?|cubic\s+f(?:ee|oo)t)", "cuft"),
    (r"-?(?:ft|feet|foot)\b\.?", "ft"),
    (r"-?btu\b", "btu"),
    (r"-?mah\b", "mah"),
    (r"-?(?:v|volts?)\b", "v"),
    (r"-?x\b", "x"),
    (r"-?(?:ch|channels?)\b", "ch"),
    (r"-?(?:pk|pack|count|ct)\b", "pk"),
]
# Not inside a code: `dcs-5030l` keeps its `5030l`. A number starts only where no number goes on before it
# (not after a digit, nor after `1,`): otherwise every digit of `1,1,1,...` would start a scan to its end and
# the cleaning of a 20,000-character title would take minutes (quadratic backtracking); this way each
# character is scanned a bounded number of times (tests/search/test_hostile_text.py).
_UNIT_PATTERNS = [
    (re.compile(r"(?<![0-9a-z./-])(?<!\d,)" + _NUMBER + r"\s*" + written), unit) for written, unit in _UNITS
]
# A token that is a size, a version or a resolution, not a code: `500gb`, `27in`, `60w`, `720p`, `v2.1`.
_MEASURE = re.compile(  # matched whole (fullmatch); the lookbehind keeps a scan of a long number linear
    r"(?<![0-9a-z.])(?:\d+(?:\.\d+)?(?:in|gb|tb|mb|kb|mp|ghz|mhz|khz|hz|mm|cm|ml|lb|oz|cuft|ft|btu|mah|ch|pk|ms|db|th|st|nd|rd"
    r"|bit|gbps|mbps|rpm|fps|hr|hrs|min|yr)|\d{1,4}(?:\.\d+)?[wlvxpiksd]|1080[pi]|v\d+(?:\.\d+)*)"
)
# Stray quotes at either end of a word; a run is matched from its first quote only (linear on `x""""...x`).
_QUOTE_DEBRIS = re.compile(r'(?:^|(?<=\s))["`´]+|(?<!["`´])["`´]+(?=\s|$)')
_SPACES = re.compile(r"\s+")


def normalise(text: str) -> str:
    """NFKC, lower case, accents removed ("Äpple" and "apple" share their letters)."""
    text = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", text).lower())
    return "".join(c for c in text if not unicodedata.combining(c))


def _number(written: str) -> float | None:
    plain = written.replace(",", "") if re.fullmatch(r"\d{1,3}(?:,\d{3})+", written) else written.replace(",", ".")
    try:
        value = float(plain)
    except ValueError:
        return None
    return value if math.isfinite(value) else None  # 400 digits are no size: the text stays as written


def _size(value: float, unit: str) -> str:
    if unit == "ml" and value >= 1000:
        value, unit = value / 1000, "l"
    elif unit == "tb":
        value, unit = value * 1000, "gb"
    shown = str(round(value)) if abs(value - round(value)) < 1e-9 else f"{value:.3f}".rstrip("0").rstrip(".")
    return f" {shown}{unit} "


def clean(text: str) -> str:
    """Normalised text without what is not the product: HTML entities and tags, language tags, trademark
    signs, stray quotes; sizes written as one token (`27-inch` -> `27in`, `1,000 ml` -> `1l`)."""
    text = normalise(_TAG.sub(" ", html.unescape(html.unescape(text))))
    text = _TRADEMARK.sub(" ", _LANGUAGE_TAG.sub(" ", text))
    for pattern, unit in _UNIT_PATTERNS:

        def canonical(match: re.Match[str], unit: str = unit) -> str:
            value = _number(match.group(1))
            return match.group(0) if value is None else _size(value, unit)

        text = pattern.sub(canonical, text)
    return _SPACES.sub(" ", _QUOTE_DEBRIS.sub(" ", text)).strip()  # after the sizes: `27"` is 27 inches


def _is_code(token: str) -> bool:
    if len(token) < 4 or _MEASURE.fullmatch(token):
        return False
    digits = any(c.isdigit() for c in token)
    return digits and (any(c.isalpha() for c in token) or len(token) >= 6)


def identifiers(text: str) -> list[str]:
    """Identifier-like spans of cleaned text, separators removed: letters mixed with digits (4+ characters)
    or numbers of 6+ digits, not sizes or versions (`KX-TG6313S` -> `kxtg6313s`; `dvd-1080p8/b` -> its
    pieces that are codes)."""
    out: list[str] = []
    for span in _WORD.findall(text):
        if re.fullmatch(r"\d+\.\d+", span) or _MEASURE.fullmatch(span):
            continue
        parts = re.split(r"[-./]", span)
        joined = "".join(parts)
        if _is_code(joined):
            out.append(joined)
        elif len(parts) > 1:
            out += [part for part in parts if _is_code(part)]
    return list(dict.fromkeys(out))


def code_core(code: str) -> str | None:
    """A code's core: its leading letters and first run of digits (`kxtg6313s` -> `kxtg6313`, `ip99br8` ->
    `ip99`), or a code that starts with a digit less its trailing letters; None when that is the code itself
    or too short to identify anything."""
    lead = re.match(r"[a-z]*\d+", code)
    core = lead.group(0) if lead else code
    if core == code:
        core = code.rstrip("abcdefghijklmnopqrstuvwxyz")
    if core == code or len(core) < 4 or sum(c.isdigit() for c in core) < 2:
        return None
    return core if any(c.isalpha() for c in core) or len(core) >= 6 else None


def code_terms(text: str) -> dict[str, float]:
    """The code terms of cleaned text and their weights: `#code:` per identifier, `#core:` per core."""
    out: dict[str, float] = {}
    for code in identifiers(text):
        out[f"#code:{code}"] = CODE_WEIGHT
        core = code_core(code)
        if core is not None:
            out.setdefault(f"#core:{core}", CORE_WEIGHT)
    return out


def _family(code: str) -> str | None:
    """What makes two codes siblings: the same leading letters (2+), or for a code that starts with a digit
    (6+ characters) the same shape of digits and letters."""
    lead = re.match(r"[a-z]{2,}", code)
    if lead:
        return "letters:" + lead.group(0)
    return "shape:" + re.sub(r"[a-z]", "a", re.sub(r"\d", "9", code)) if len(code) >= 6 else None


def _variant_key(code: str) -> str:
    """A code less a trailing letter suffix (a colour or a region: `kxtg6313s`, `kxtg6313b` -> `kxtg6313`)."""
    core = code_core(code)
    return core if core is not None and code[len(core) :].isalpha() else code


def codes_conflict(query: Iterable[str], product: Iterable[str]) -> bool:
    """True when a product's codes are siblings of the query's but none is the same: `al372n4fbs6` against
    `al372b4fbs6`. Codes that differ only by a trailing letter suffix (`kxtg6313s`, `kxtg6313b`), or where one
    begins the other (5+ characters), do not conflict; nor do codes of different families (a phone's model
    number against its charger's)."""
    asked, offered = set(query), set(product)
    if not asked or not offered:
        return False
    if {_variant_key(c) for c in asked} & {_variant_key(c) for c in offered}:
        return False
    if any(min(len(a), len(b)) >= 5 and (a.startswith(b) or b.startswith(a)) for a in asked for b in offered):
        return False
    families = {f for f in map(_family, asked) if f}
    return bool(families & {f for f in map(_family, offered) if f})


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


def sparse_vector(weights: dict[str, float]) -> models.SparseVector:
    """Token weights as a sparse vector (ids by `term_index`; tokens that share an id add up)."""
    by_index: dict[int, float] = {}
    for token, weight in weights.items():
        index = term_index(token)
        by_index[index] = by_index.get(index, 0.0) + weight
    indices = sorted(by_index)
    return models.SparseVector(indices=indices, values=[by_index[i] for i in indices])


def bm25_vector(
    counts: Mapping[str, float], average_length: float, *, uncounted: Mapping[str, float] | None = None
) -> models.SparseVector | None:
    """BM25 document weights: each term's (field-weighted) count saturated by K1 and normalised by the
    document's length against a fixed `average_length` (B); `uncounted` terms are weighted the same way but
    do not count towards the length. The one BM25 of the project: the lexical and the read-text (OCR) vectors."""
    uncounted = uncounted or {}
    if not counts and not uncounted:
        return None
    norm = K1 * (1 - B + B * sum(counts.values()) / average_length)
    return sparse_vector({t: f * (K1 + 1) / (f + norm) for t, f in {**counts, **uncounted}.items()})


def document_vector(record: CatalogueRecord) -> models.SparseVector | None:
    """BM25 term weights (saturated term frequency, field-weighted) of a product's words and identifiers."""
    counts: defaultdict[str, float] = defaultdict(float)
    fields: list[tuple[str | None, float]] = [
        (record.title, 1.0),
        (record.brand, 1.0),
        (record.mpn, IDENTIFIER_WEIGHT),
        (record.description, DESCRIPTION_WEIGHT),
    ]
    special: defaultdict[str, float] = defaultdict(float)  # terms that do not count towards the length
    for text, weight in fields:
        cleaned = clean(text or "")
        for token in tokens(cleaned):
            counts[token] += weight
        for term, kind in code_terms(cleaned).items():
            special[term] += weight * kind
    if record.gtin:
        counts[gtin_token(record.gtin)] += GTIN_WEIGHT
    return bm25_vector(counts, AVERAGE_LENGTH, uncounted=special)


def query_terms(text: str) -> dict[str, float]:
    """The distinct terms of a query and their weights: words 1, GTIN-looking numbers also as GTIN terms,
    codes and their cores as in documents."""
    cleaned = clean(text)
    terms = dict.fromkeys(tokens(cleaned), 1.0)
    terms |= dict.fromkeys((gtin_token(m) for m in _GTIN_IN_TEXT.findall(text)), 1.0)
    return terms | code_terms(cleaned)


def query_vector(text: str) -> models.SparseVector | None:
    terms = query_terms(text)
    return sparse_vector(terms) if terms else None


def overlap(query: models.SparseVector, document: Iterable[int]) -> float:
    """Share of the query's terms that the product contains: the lexical score shown to people."""
    if not query.indices:
        return 0.0
    present = set(document)
    return sum(i in present for i in query.indices) / len(query.indices)
