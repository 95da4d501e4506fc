"""Build encoders from spec strings (`kind:model[/weights]`); heavy libraries are imported on first use."""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path
from typing import Any

from retrieval.encoders.base import EncoderError, ImageEncoder, TextEncoder

IMAGE_KINDS = ("timm", "open_clip")
TEXT_KINDS = ("sentence-transformers", "open_clip")

log = logging.getLogger("retrieval.encoders")
_cache: dict[tuple[str, str], Any] = {}
_cache_lock = threading.Lock()


def parse_spec(spec: str) -> tuple[str, str, str | None]:
    """`kind:model/weights` -> (kind, model, weights or None). A model may be a `.json` config path."""
    kind, sep, body = spec.strip().partition(":")
    if not sep or not kind or not body:
        raise EncoderError(
            f"encoder spec {spec!r} must look like kind:model[/weights], e.g. timm:tf_efficientnet_lite0"
        )
    if match := re.fullmatch(r"(.+?\.json)(?:/(.*))?", body):
        return kind, match.group(1), match.group(2) or None
    model, _, weights = body.partition("/")
    return kind, model, weights or None


def _build(spec: str, precision: str) -> Any:
    kind, model, weights = parse_spec(spec)
    if kind == "timm":
        from retrieval.encoders.timm_backbone import TimmImageEncoder

        return TimmImageEncoder(model, weights, precision)
    if kind == "open_clip":
        from retrieval.encoders.clip import OpenClipEncoder

        return OpenClipEncoder(model, weights)
    from retrieval.encoders.sentence import SentenceTextEncoder

    return SentenceTextEncoder(model if weights is None else f"{model}/{weights}", precision=precision)


def _cached(spec: str, kinds: tuple[str, ...], precision: str = "fp32") -> Any:
    kind = parse_spec(spec)[0]
    if kind not in kinds:
        raise EncoderError(f"encoder kind {kind!r} in {spec!r} cannot do this; use one of: {', '.join(kinds)}")
    if kind == "open_clip":
        precision = "fp32"  # open_clip runs in float32 (no reduced-precision path measured)
    # One instance per spec (and precision) per process: an open_clip spec used for both roles loads once.
    with _cache_lock:
        if (spec, precision) not in _cache:
            _cache[(spec, precision)] = _build(spec, precision)
        return _cache[(spec, precision)]


INFERENCES = ("auto", "torch", "onnx")


def load_image_encoder(
    spec: str,
    precision: str = "auto",
    *,
    inference: str = "torch",
    onnx_cache: Path | None = None,
    serving: bool = False,
) -> ImageEncoder:
    """`precision`: auto (bf16 where the CPU has it, for timm backbones), fp32 or bf16. `inference`: torch, onnx
    (a timm backbone's forward on ONNX Runtime in float32, its export kept in `onnx_cache`), or auto: for a timm
    backbone, onnx where torch would run it in float32 (ONNX Runtime measured 1.7-2x torch's float32 there) and
    in a service (`serving`: a query's few photos beside the text model's thread, where ONNX Runtime served
    1.28-1.36x the requests of torch bf16), torch in bf16 for batch work (ingest: as fast or faster there);
    torch for the rest (docs/BENCHMARKS.md)."""
    if inference not in INFERENCES:
        raise EncoderError(f"inference {inference!r}: use one of {', '.join(INFERENCES)}")
    encoder: ImageEncoder = _cached(spec, IMAGE_KINDS, precision)
    timm = parse_spec(spec)[0] == "timm"
    torch_runs = inference == "torch" or (
        inference == "auto" and (not timm or (getattr(encoder, "precision", "") == "bf16" and not serving))
    )
    if torch_runs:
        return encoder
    if not timm:
        raise EncoderError(f"INFERENCE=onnx runs timm backbones; {spec!r} runs in torch (INFERENCE=auto or torch)")
    from retrieval.encoders.onnx_backbone import OnnxImageEncoder

    key = (f"onnx|{spec}", precision)  # one session per spec and process, whichever folder exported it
    try:
        if onnx_cache is None:
            raise EncoderError("ONNX inference needs a folder for the exported model")
        with _cache_lock:
            if key not in _cache:
                _cache[key] = OnnxImageEncoder(encoder, onnx_cache)  # type: ignore[arg-type]
            onnx: ImageEncoder = _cache[key]
    except EncoderError as exc:
        if inference == "onnx":
            raise
        # auto chose ONNX Runtime for speed alone: where it cannot run (a read-only model folder, a failed
        # export or probe), torch does, rather than a service that does not start
        log.warning("%s; the image backbone runs in torch instead", exc)
        return encoder
    return onnx


def load_text_encoder(spec: str, precision: str = "auto") -> TextEncoder:
    """`precision`: auto (bf16 where the CPU has it, for sentence-transformers models), fp32 or bf16."""
    encoder: TextEncoder = _cached(spec, TEXT_KINDS, precision)
    return encoder
