"""Opening images: the one RGB conversion (:func:`to_rgb`), the checked opener (:func:`open_rgb`), a header-only
size probe for row checks and a full decode for ``dataset_tool.py validate``."""

from __future__ import annotations

import os
import struct
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from ..errors import SkingenError

EXIF_ORIENTATION = 0x0112
# What Pillow raises for a file that is not a (complete, sane) image; UnidentifiedImageError is an OSError.
IMAGE_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB the way a viewer shows it.

    EXIF orientation is applied; transparency (RGBA, LA, palette/RGB with a transparent colour) is composited
    on white, since skin elements are drawn on white pages; 16-bit and 32-bit grey are scaled, not clipped.
    """
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image).astype(np.float64)
        if mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values / 257.0  # 0..65535 -> 0..255
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        values = np.asarray(image).astype(np.float64)
        if values.max(initial=0) <= 1.0:
            values = values * 255.0  # float images in 0..1
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def open_rgb(path: str | os.PathLike, where: str | None = None) -> Image.Image:
    """An image file as RGB (:func:`to_rgb`); a missing or unreadable file is a SkingenError naming the file and
    ``where`` it was listed (e.g. ``train.jsonl:3``)."""
    prefix = f"{where}: " if where else ""
    if not os.path.isfile(path):
        raise SkingenError(
            f"{prefix}image {path} not found; fix the path (relative paths start at the folder of the file that "
            "lists them) or drop the row"
        )
    try:
        with Image.open(path) as image:
            image.load()  # read the pixels before the file closes: to_rgb returns an RGB image as it is
            return to_rgb(image)
    except IMAGE_READ_ERRORS as err:
        raise SkingenError(
            f"{prefix}image {path} is not a readable image ({err}); replace it or drop the row"
        ) from None


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """Size as displayed: EXIF orientations 5-8 swap width and height."""
    width, height = image.size
    try:
        if image.format == "PNG" and "exif" not in image.info:
            # A PNG's EXIF may follow the pixel data: find it by skipping over the chunks, not by decoding them.
            orientation = _late_png_orientation(image.fp)
        else:
            orientation = image.getexif().get(EXIF_ORIENTATION)
    except Exception:  # a broken EXIF block only loses the orientation, as in viewers
        orientation = None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _late_png_orientation(fp) -> int | None:
    """The EXIF orientation of a PNG's ``eXIf`` chunk found after the image data (None when there is none)."""
    position = fp.tell()
    try:
        fp.seek(8)  # past the signature
        while True:
            header = fp.read(8)
            if len(header) < 8:
                return None
            length, kind = struct.unpack(">I4s", header)
            if kind == b"eXIf":
                exif = Image.Exif()
                exif.load(fp.read(length))
                return exif.get(EXIF_ORIENTATION)
            if kind == b"IEND":
                return None
            fp.seek(length + 4, os.SEEK_CUR)  # the data and its CRC
    finally:
        fp.seek(position)


class UnreadableImage(Exception):
    """An image file that cannot be used; ``kind`` is a short class name for reports."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def _too_large(err: Exception) -> UnreadableImage:
    return UnreadableImage("image too large", f"has too many pixels for a training image ({err})")


def header_size(opener: Callable[[], Any]) -> tuple[int, int]:
    """Open just the image header (cheap, no pixel decode): the displayed size, or :class:`UnreadableImage`
    (also for more pixels than Pillow's ``MAX_IMAGE_PIXELS``: no skin is that large, a decompression bomb is)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(opener()) as image:
                return oriented_size(image)
    except FileNotFoundError:
        raise UnreadableImage("image not found", "not found") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise _too_large(err) from None
    except IMAGE_READ_ERRORS as err:
        raise UnreadableImage("unreadable image", f"is not a readable image ({err})") from None


def decode_fully(path: str | os.PathLike) -> None:
    """Decode every pixel of an image file; :class:`UnreadableImage` for an empty, truncated or corrupt file
    or a decompression bomb (more pixels than Pillow's ``MAX_IMAGE_PIXELS``, which training would refuse)."""
    if os.path.getsize(path) == 0:
        raise UnreadableImage("unreadable image", "is an empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise _too_large(err) from None
    except IMAGE_READ_ERRORS as err:
        reason = str(err) or type(err).__name__
        raise UnreadableImage("unreadable image", f"does not decode ({reason})") from None
