"""Safe image decoding shared by ingest and the service: size checks before pixels, EXIF turn, RGB."""

from __future__ import annotations

import io
import os
import stat
import warnings
from urllib.parse import urlparse

from PIL import Image, ImageOps, UnidentifiedImageError

MAX_IMAGE_BYTES = 50 * 1024 * 1024  # the largest photo ingest reads (file or URL) and the photo endpoint serves

# Files read as photos in a folder layout at ingest (the service serves stored local photos with these suffixes).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})


# Large JPEGs are decoded at a reduced scale (DCT scaling, nearly free) as long as both sides stay at least
# this long: twice the 224-448 px the backbones see, so the resize that follows loses nothing measurable.
DRAFT_MIN_SIDE = 896


class ImageDecodeError(ValueError):
    """Bytes that are not a usable image; the message is safe to show to the user."""


class LocalFileError(ValueError):
    """A local photo that cannot be read; the message names no path, so it is safe to show to a client."""


# Opened without following a symbolic link in the last step, and without blocking on a FIFO with no writer.
_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)


def read_regular_file(path: str, *, max_bytes: int) -> bytes:
    """The bytes of a regular file, at most `max_bytes` of them, whatever `stat` said before the read.

    A folder, FIFO, socket or device is refused after opening it without blocking (its `st_size` says
    nothing: a FIFO or /dev/zero has size 0 and no end), and the read stops one byte past the cap, so a
    file that grows while it is read cannot take more memory than the cap."""
    try:
        fd = os.open(path, _READ_FLAGS)
    except FileNotFoundError:
        raise LocalFileError("file not found") from None
    except IsADirectoryError:
        raise LocalFileError("is a folder, not an image") from None
    except OSError as exc:
        raise LocalFileError(f"cannot read the file: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise LocalFileError("is a folder, not an image")
        if not stat.S_ISREG(info.st_mode):
            raise LocalFileError("not a regular file (a device, pipe or socket)")
        if info.st_size > max_bytes:
            raise LocalFileError(f"file is {info.st_size} bytes, over the limit of {max_bytes}")
        blocks, total = [], 0
        while block := os.read(fd, min(1 << 20, max_bytes + 1 - total)):
            total += len(block)
            if total > max_bytes:
                raise LocalFileError(f"file is over the limit of {max_bytes} bytes")
            blocks.append(block)
        return b"".join(blocks)
    except OSError as exc:
        raise LocalFileError(f"cannot read the file: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def is_url(ref: str) -> bool:
    """An image ref that is fetched over HTTP rather than read from disk."""
    return urlparse(ref).scheme in ("http", "https")


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode bytes into an RGB image, refusing empty, non-image, truncated and oversized inputs."""
    if not data:
        raise ImageDecodeError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data))
            width, height = opened.size
            if width * height > max_pixels:
                raise ImageDecodeError(f"image too large: {width}x{height} pixels, over the limit of {max_pixels}")
            if opened.format == "JPEG" and min(width, height) >= 2 * DRAFT_MIN_SIDE:
                opened.draft("RGB", (DRAFT_MIN_SIDE, DRAFT_MIN_SIDE))
            opened.load()  # the first frame of an animated GIF / WebP / APNG
            image: Image.Image = ImageOps.exif_transpose(opened) or opened
            return to_rgb(image)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"image too large: {exc}") from None
    except Exception as exc:  # truncated or corrupt data; plugins raise OSError, SyntaxError, struct.error...
        raise ImageDecodeError(f"cannot decode image: {exc.__class__.__name__}: {exc}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode to RGB; transparent pixels become white, as on a shop page."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda v: v / 256).convert("L")  # 16-bit to 8-bit, not clipped at 255
    return image.convert("RGB")


def centre_crop(image: Image.Image, share: float) -> Image.Image:
    """The middle `share` of a photo's width and height (where a product a shopper photographs usually is)."""
    width, height = image.size
    left, top = round(width * (1 - share) / 2), round(height * (1 - share) / 2)
    return image.crop((left, top, max(left + 1, width - left), max(top + 1, height - top)))
