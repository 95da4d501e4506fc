"""Image and text encoders behind one small protocol, built from spec strings by `factory`."""

from retrieval.encoders.base import EmbeddedPhoto, EncoderError, ImageEncoder, PhotoEmbedder, TextEncoder
from retrieval.encoders.factory import load_image_encoder, load_text_encoder

__all__ = [
    "EmbeddedPhoto",
    "EncoderError",
    "ImageEncoder",
    "PhotoEmbedder",
    "TextEncoder",
    "load_image_encoder",
    "load_text_encoder",
]
