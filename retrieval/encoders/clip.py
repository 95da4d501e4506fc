"""open_clip models: one object embeds both images and texts into the same space (cross-modal search)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

from retrieval.encoders.base import EncoderError, PixelTransform, l2_normalise


class OpenClipEncoder:
    """`open_clip:MODEL/PRETRAINED`: MODEL is a registered name or a JSON config path; PRETRAINED is a
    pretrained tag, a checkpoint path, or `random` (untrained weights: for tests of the mechanics only)."""

    def __init__(self, model: str, pretrained: str | None) -> None:
        if model.endswith(".json"):
            config = Path(model).expanduser()
            if not config.is_file():
                raise EncoderError(f"open_clip model config {config} does not exist")
            open_clip.add_model_config(config)
            model = config.stem
        if model not in open_clip.list_models():
            raise EncoderError(
                f"open_clip has no model config {model!r}; known: {', '.join(open_clip.list_models()[:8])}..."
            )
        if not pretrained:
            raise EncoderError(
                f"open_clip:{model} needs weights: open_clip:{model}/<pretrained tag> "
                f"or open_clip:{model}/path/to/ckpt.pt"
            )
        weights: str | None
        if pretrained == "random":
            weights, weights_id = None, "random"
        elif Path(pretrained).expanduser().exists():
            weights = str(Path(pretrained).expanduser())
            weights_id = Path(weights).name
        else:
            weights, weights_id = pretrained, pretrained
        try:
            clip, _, transform = open_clip.create_model_and_transforms(model, pretrained=weights, device="cpu")
        except (RuntimeError, OSError, ValueError) as exc:
            raise EncoderError(
                f"cannot load open_clip {model} weights {pretrained!r} ({exc}); with no model hub, "
                f"give a local checkpoint: open_clip:{model}/path/to/ckpt.pt"
            ) from exc
        self.model = clip.eval()
        self._pixels = PixelTransform(transform)
        self._tokenizer = open_clip.get_tokenizer(model)
        self.name = f"open_clip:{model}/{weights_id}"
        self.dim = int(open_clip.get_model_config(model)["embed_dim"])
        self._lock = threading.Lock()

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One image as uint8 pixels (normalised per batch in `embed_tensors`; see PixelTransform)."""
        return self._pixels(image)

    @torch.inference_mode()
    def embed_tensors(self, batch: torch.Tensor) -> np.ndarray:
        with self._lock:
            features = self.model.encode_image(self._pixels.model_input(batch))
        return l2_normalise(features)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.empty((0, self.dim), dtype=np.float32)
        with self._lock:
            features = self.model.encode_text(self._tokenizer(list(texts)))
        return l2_normalise(features)
