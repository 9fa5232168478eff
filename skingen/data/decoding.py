"""Decoding a dataset's images while training: the RGB ``datasets.Image`` feature (:class:`RGBImage`) and the one
error for an image that no longer decodes (truncated after its row was checked), naming the row's ``file:line``."""

from __future__ import annotations

from pathlib import Path

import datasets

from ..errors import SkingenError
from .images import IMAGE_READ_ERRORS, to_rgb

DECODE_FIX = "`python dataset_tool.py validate DIR` decodes every image and lists the broken ones"


class ImageDecodeError(SkingenError):
    """An image of a loaded dataset that no longer decodes (truncated after its row was checked)."""

    def __init__(self, path: str | None, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"{path or 'an image of the dataset'}: does not decode ({reason}); {DECODE_FIX}")


class RGBImage(datasets.Image):
    """A ``datasets.Image`` feature that decodes to RGB through :func:`skingen.data.images.to_rgb`.

    It is an ``Image`` feature (``isinstance`` holds, ``cast_column``/``map``/``filter``/``select`` keep it), so
    users see an ordinary lazily decoded image column. Saved with ``save_to_disk`` it reloads as a plain ``Image``.
    A file that no longer decodes (truncated after the rows were checked) is a SkingenError naming it.
    """

    def decode_example(self, value, token_per_repo_id=None):
        try:
            return to_rgb(super().decode_example(value, token_per_repo_id=token_per_repo_id))
        except IMAGE_READ_ERRORS as err:
            raise ImageDecodeError(value.get("path") if isinstance(value, dict) else None, str(err)) from None


def row_decode_error(err: ImageDecodeError, where: str) -> SkingenError:
    """``err`` naming the row (``where``: ``file:line``) and the image, relative to the rows file's folder when it
    lies inside it."""
    shown = err.path
    rows_folder = Path(where.rsplit(":", 1)[0]).parent
    if shown and rows_folder in Path(shown).parents:
        shown = Path(shown).relative_to(rows_folder).as_posix()
    return SkingenError(f"{where}: {shown}: does not decode ({err.reason}); {DECODE_FIX}")


def decoded_row(view: datasets.Dataset, index: int, where: str) -> dict:
    """Row ``index`` of ``view`` with its images decoded; an image that no longer decodes is an error naming the
    row (:func:`row_decode_error`)."""
    try:
        return view[index]
    except ImageDecodeError as err:
        raise row_decode_error(err, where) from None


_FILE_DECODER = RGBImage()


def decoded_file(path: str, where: str):
    """The image file at ``path`` as RGB, decoded exactly as an :class:`RGBImage` column decodes it; an error naming
    the row (``where``) when it no longer decodes."""
    try:
        return _FILE_DECODER.decode_example({"path": path, "bytes": None})
    except ImageDecodeError as err:
        raise row_decode_error(err, where) from None
