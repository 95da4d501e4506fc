"""Image and text encoders behind one small protocol, built from spec strings by `factory`."""

from retrieval.encoders.base import EncoderError, ImageEncoder, TextEncoder
from retrieval.encoders.factory import load_image_encoder, load_text_encoder

__all__ = ["EncoderError", "ImageEncoder", "TextEncoder", "load_image_encoder", "load_text_encoder"]
