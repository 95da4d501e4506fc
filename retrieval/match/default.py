"""The default match model: what decides `match` / `uncertain` / `no_match` for a catalogue nobody has labelled.

It is a match model like a catalogue's own (retrieval/match/model.py), fitted by `python -m bench transfer` on
the train splits of public labelled product pairs (../shared/data/text-pairs) over the transfer features only
(TRANSFER_FEATURES: scores of the text encoder it was trained with, shares, ranks, margins and agreements, none
tied to one catalogue's words or photos). It ships inside the package as plain numbers (`default_model.json`)
with the SHA-256 of its content; a file that does not match its digest is not used. It applies to catalogues
whose text vectors come from the same text encoder and carry no fine-tuned text model; `calibrate` and `train`
replace it with the catalogue's own, and answers say which one decided (`model`)."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from schemas.search import Calibration

DEFAULT_MODEL_FILE = Path(__file__).with_name("default_model.json")
log = logging.getLogger("retrieval.match")


@dataclass(frozen=True)
class DefaultModel:
    calibration: Calibration
    text_encoder: str  # the text encoder whose cosines the model was fitted on (a catalogue's fingerprint)
    trained_on: list[str]
    digest: str


def model_digest(calibration: Calibration, text_encoder: str, trained_on: list[str]) -> str:
    """SHA-256 of the model's canonical JSON: what the shipped file is checked against."""
    body = {"calibration": calibration.model_dump(mode="json"), "text_encoder": text_encoder, "trained_on": trained_on}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_default_model(
    calibration: Calibration, text_encoder: str, trained_on: list[str], path: Path = DEFAULT_MODEL_FILE
) -> str:
    """Write the default model with its digest; returns the digest."""
    digest = model_digest(calibration, text_encoder, trained_on)
    body = {
        "calibration": calibration.model_dump(mode="json"),
        "text_encoder": text_encoder,
        "trained_on": trained_on,
        "sha256": digest,
    }
    path.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    default_model.cache_clear()
    return digest


def read_default_model(path: Path) -> DefaultModel | None:
    """The default model in `path`, or None (missing, unreadable, or not what its digest says)."""
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
        calibration = Calibration.model_validate(body["calibration"])
        text_encoder, trained_on = str(body["text_encoder"]), [str(name) for name in body["trained_on"]]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, ValidationError) as exc:
        log.warning("the default match model %s cannot be read (%s): unlabelled catalogues are not decided", path, exc)
        return None
    digest = model_digest(calibration, text_encoder, trained_on)
    if digest != body.get("sha256"):
        log.warning("the default match model %s does not match its digest: it is not used", path)
        return None
    return DefaultModel(calibration, text_encoder, trained_on, digest)


@functools.cache
def default_model() -> DefaultModel | None:
    """The shipped default model, read and checked once per process."""
    return read_default_model(DEFAULT_MODEL_FILE)
