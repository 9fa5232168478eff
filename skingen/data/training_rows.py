"""The rows training reads: the checked :class:`~skingen.data.rows.Row` s of one split, in order, and their images.

A dataset folder is checked in one scan (every conditioning column at once); its images are decoded from their
files. A hub dataset (``--dataset_name``) is checked by :func:`skingen.data.dataset.normalized_rows` into the same
rows, and its images are decoded from the dataset's own storage by row number, so the rows hold no pixels.
Images decode to RGB exactly as the loader's :class:`~skingen.data.decoding.RGBImage` columns do; one that no
longer decodes is an error naming the row's ``file:line``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import replace

from PIL import Image

import datasets

from .dataset import (
    check_loader_flags,
    enforce_bad_rows,
    find_dataset_files,
    load_hub_split,
    normalized_rows,
    role_keys,
    scan_folder,
)
from .decoding import decoded_file, decoded_row
from .rows import Row


class TrainingRows(Sequence):
    """Checked rows (``rows[i]`` is a :class:`Row`, without its ``raw`` dict) and their decoded images.

    ``stored``: the normalised hub dataset whose row ``i`` holds row ``i``'s images (columns ``image``,
    ``conditioning_image``, ``conditioning_image_1``, ...); None for a dataset folder (images read from files).
    """

    def __init__(self, rows: list[Row], stored: datasets.Dataset | None = None):
        # Training reads the checked fields only: the rows' raw JSON would more than double their memory.
        self.rows = [replace(row, raw={}) for row in rows]
        self.conditioning_count = len(rows[0].conditioning_images) if rows else 1
        self.stored = stored
        if stored is not None:
            self._conditioning_keys = ["conditioning_image",
                                       *(f"conditioning_image_{n}" for n in range(1, self.conditioning_count))]
            self._image_view = stored.select_columns(["image"])
            self._conditioning_view = stored.select_columns(self._conditioning_keys)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Row:
        return self.rows[index]

    def __iter__(self) -> Iterator[Row]:
        return iter(self.rows)

    @property
    def captions(self) -> list[str]:
        return [row.text for row in self.rows]

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """Each row's image ``(width, height)`` as displayed (EXIF rotation applied), as checked."""
        return [row.image.size for row in self.rows]

    def image(self, index: int) -> Image.Image:
        """Row ``index``'s image, RGB."""
        row = self.rows[index]
        if self.stored is None:
            return decoded_file(row.image.path, row.where)
        return decoded_row(self._image_view, index, row.where)["image"]

    def conditioning_images(self, index: int) -> list[Image.Image]:
        """Row ``index``'s conditioning images in channel order, RGB."""
        row = self.rows[index]
        if self.stored is None:
            return [decoded_file(ref.path, row.where) for ref in row.conditioning_images]
        decoded = decoded_row(self._conditioning_view, index, row.where)
        return [decoded[key] for key in self._conditioning_keys]

    def image_refs(self) -> Iterator[dict]:
        """Each row's image as stored (``{'bytes', 'path'}``), one at a time: what identifies its content."""
        if self.stored is None:
            for row in self.rows:
                yield {"bytes": None, "path": row.image.path}
            return
        for stored in self._image_view.cast_column("image", datasets.Image(decode=False)):  # one row's bytes at a time
            yield stored["image"]


def load_rows(
    train_data_dir: str | os.PathLike | None = None,
    dataset_name: str | None = None,
    *,
    image_column: str | None = None,
    conditioning_image_columns: Sequence[str | None] = (None,),
    caption_column: str | None = None,
    on_bad_sample: str = "error",
    cache_dir: str | os.PathLike | None = None,
    max_samples: int | None = None,
    split: str = "train",
    dataset_config_name: str | None = None,
) -> TrainingRows:
    """One split's checked rows, as :func:`skingen.data.dataset.load_skin_dataset` checks them.

    ``conditioning_image_columns``: the first fills a row's first conditioning image (None: the form's default
    column), the others its further ones; a row is kept when every column has a usable image for it.
    """
    check_loader_flags(train_data_dir, dataset_name, on_bad_sample, max_samples)
    first, *others = conditioning_image_columns
    if dataset_name is not None:
        stored, rows = normalized_rows(
            load_hub_split(dataset_name, dataset_config_name, split, cache_dir),
            image_column=image_column,
            conditioning_image_column=first,
            caption_column=caption_column,
            on_bad_sample=on_bad_sample,
            max_samples=max_samples,
            source=f"{dataset_name} ({split})",
            extra_conditioning_columns=tuple(others),
        )
        return TrainingRows(rows, stored)

    files = find_dataset_files(train_data_dir, split)
    # Each further column accepts the same key variants as the first (ImageFolder's "<name>_file_name").
    extra_keys = tuple(role_keys(files.form, None, column, None)["conditioning_image"] for column in others)
    scan = scan_folder(
        files,
        image_column=image_column,
        conditioning_image_column=first,
        caption_column=caption_column,
        max_samples=max_samples,
        extra_conditioning_keys=extra_keys,
    )
    enforce_bad_rows(scan, on_bad_sample)
    return TrainingRows(scan.good)
