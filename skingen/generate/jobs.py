"""What to generate: rows (from a dataset split or prompt/control lists) and their image jobs, for batch generation with a ControlNet pipeline of any backbone family (SDXL, SD3/SD3.5, FLUX.1).

What to generate comes from a dataset split (each row's caption and conditioning image) or from
``--prompt`` / ``--control_image`` lists; each row gives ``num_images_per_prompt`` images, each with its
own seed and its own ``torch.Generator``, so an image depends only on its row and seed, never on the
batch it was generated in. Images are generated several per pipeline call, saved atomically as
``images/<row>_s<seed>.png`` and listed in ``results.jsonl`` (each batch kept as a part file, merged at the end); a
rerun skips every image already listed there whose file exists, so an interrupted run resumes.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..data import dataset as data
from ..data import rows
from ..errors import SkingenError

IMAGES_DIR = "images"
PACKAGES_DIR = "packages"


@dataclass(frozen=True)
class GenerationRow:
    """One prompt with its control image(s) (one per ControlNet): a dataset row or one prompt/control pair."""

    row_id: str
    prompt: str
    control_images: tuple[str, ...]
    where: str  # "file:line" or "pair 3", for error messages
    seed: int | None = None  # the row's own seed; None: --seed + row index
    box: list | None = None  # 4-point quads in the pixels of box_size
    texts: list[str] | None = None
    box_size: tuple[int, int] | None = None  # (w, h) of the image the boxes were measured on
    reference_image: str | None = None  # the row's target image, when the dataset has one


@dataclass(frozen=True)
class ImageJob:
    """One image to generate: a row, a seed and the output size."""

    row: GenerationRow
    seed: int
    height: int
    width: int

    @property
    def output(self) -> str:
        """Path of the image, relative to the output folder."""
        return f"{IMAGES_DIR}/{file_stem(self.row.row_id)}_s{self.seed}.png"

    @property
    def package(self) -> str:
        return f"{PACKAGES_DIR}/{file_stem(self.row.row_id)}_s{self.seed}"


@dataclass(frozen=True)
class SamplingSettings:
    """Pipeline-call arguments shared by every image of a run."""

    num_inference_steps: int = 20
    guidance_scale: float = 5.0
    negative_prompt: str | None = None
    controlnet_conditioning_scale: tuple[float, ...] = (1.0,)
    control_guidance_start: tuple[float, ...] = (0.0,)
    control_guidance_end: tuple[float, ...] = (1.0,)


def file_stem(row_id: str) -> str:
    """A row id as a file-name stem: ``images/0.png`` -> ``images_0``; any character unsafe in file names -> ``_``."""
    stem = posixpath.splitext(row_id.replace("\\", "/"))[0]
    return re.sub(r"[^\w.-]+", "_", stem).strip("._") or "row"


def pair_prompts_and_controls(
    prompts: Sequence[str], control_groups: Sequence[Sequence[str]]
) -> list[tuple[str, tuple[str, ...]]]:
    """Pair ``--prompt`` entries with ``--control_image`` entries as diffusers pairs validation prompts and images.

    ``control_groups`` holds one list per ControlNet (or one list shared by all). Each list, and the prompts,
    must have either one entry (used for every pair) or the same number N as the longest (paired in order).
    Returns ``(prompt, controls)`` pairs, ``controls`` one path per group.
    """
    if not prompts:
        raise SkingenError("--prompt: give at least one prompt (or use --dataset_dir)")
    if not control_groups or not all(control_groups):
        raise SkingenError("--control_image: give at least one control image for the prompts (or use --dataset_dir)")
    lengths = [len(prompts)] + [len(group) for group in control_groups]
    count = max(lengths)
    if any(n not in (1, count) for n in lengths):
        shown = ", ".join(
            [f"--prompt has {len(prompts)}"]
            + [f"--control_image group {i + 1} has {len(g)}" for i, g in enumerate(control_groups)]
        )
        raise SkingenError(
            f"cannot pair prompts with control images ({shown}); give one prompt for all control images, "
            "one control image for all prompts, or the same number of each (paired in order)"
        )

    def pick(entries: Sequence[str], index: int) -> str:
        return entries[0] if len(entries) == 1 else entries[index]

    return [(pick(prompts, i), tuple(pick(group, i) for group in control_groups)) for i in range(count)]


def rows_from_prompts(prompts: Sequence[str], control_groups: Sequence[Sequence[str]]) -> list[GenerationRow]:
    """Rows for prompt/control lists; row ids are the pair numbers ``0000``, ``0001``, ..."""
    rows = []
    for index, (prompt, controls) in enumerate(pair_prompts_and_controls(prompts, control_groups)):
        resolved = tuple(_existing_image(path, f"--control_image {path}") for path in controls)
        rows.append(
            GenerationRow(row_id=f"{index:04d}", prompt=prompt, control_images=resolved, where=f"pair {index + 1}")
        )
    return rows


def rows_from_dataset(
    dataset_dir: str | os.PathLike,
    split: str = "train",
    *,
    caption_column: str | None = None,
    conditioning_image_columns: Sequence[str] | None = None,
    image_column: str | None = None,
    max_samples: int | None = None,
) -> list[GenerationRow]:
    """Rows of one split of a dataset folder (``<split>.jsonl`` or ImageFolder ``metadata.jsonl``).

    Each row is checked by :func:`skingen.data.rows.check_row` as training checks it: a caption and conditioning
    image(s) are needed (one column per ControlNet, or one for all); the target image is optional (when present
    it names the row, as in training, and sizes its boxes). Rows may carry ``seed``, ``box`` and ``texts``
    (``texts`` default: ``writing "..."`` in the caption). Bad rows stop the run, every problem listed by file:line.
    """
    files = data.find_dataset_files(dataset_dir, split)
    control_keys = list(conditioning_image_columns or [None])
    scan = data.scan_folder(
        files,
        image_column=image_column,
        conditioning_image_column=control_keys[0],
        caption_column=caption_column,
        max_samples=max_samples,
        spec=rows.INFERENCE,
        extra_conditioning_keys=tuple(control_keys[1:]),
    )
    data.enforce_rows(
        scan,
        fix="fix or remove those rows (caption.py / render_glyphs.py fill captions and conditioning images), "
        "or choose other keys with --caption_column / --conditioning_image_column",
    )
    return [_generation_row(row) for row in scan.good]


def _generation_row(row: rows.Row) -> GenerationRow:
    return GenerationRow(
        row_id=row.row_id,
        prompt=row.text,
        control_images=tuple(os.path.abspath(ref.path) for ref in row.conditioning_images),
        where=row.where,
        seed=row.seed,
        box=row.box or None,
        texts=list(row.texts) if row.box else None,
        box_size=row.box_size if row.box else None,
        reference_image=os.path.abspath(row.image.path) if row.image is not None else None,
    )


def _existing_image(path: str | os.PathLike, label: str) -> str:
    """Absolute path of an image file; a missing or unreadable one is a SkingenError naming ``label``."""
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise SkingenError(f"{label}: control image not found (looked for {resolved}); check the path")
    _image_size(str(resolved), label)
    return str(resolved)


@lru_cache(maxsize=4096)
def _image_size(path: str, label: str | None = None) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise SkingenError(f"{label or path}: not a readable image ({err})") from None


@lru_cache(maxsize=32)
def load_control_image(path: str) -> Image.Image:
    """A control image as RGB (cached: a shared template is read once)."""
    try:
        with Image.open(path) as image:
            image.load()
            return data.to_rgb(image)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise SkingenError(f"{path}: not a readable control image ({err})") from None


def plan_jobs(
    rows: Sequence[GenerationRow],
    *,
    num_images_per_prompt: int = 1,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    size_multiple: int = 8,
) -> list[ImageJob]:
    """Every image of a run, in row order.

    Seeds: row ``i`` gives images with seeds ``seed + i * num_images_per_prompt + k`` (k < num_images_per_prompt),
    so with one image per prompt row i uses ``seed + i`` and no two images of a run share noise; a row's own
    ``seed`` field replaces the first seed. Size: ``height``/``width`` when given, else the first control image's
    size rounded down to a multiple of ``size_multiple`` (8 for SDXL's VAE; 16 for SD3's patches and FLUX's packing).
    """
    if num_images_per_prompt < 1:
        raise SkingenError(f"--num_images_per_prompt must be at least 1, got {num_images_per_prompt}")
    for name, value in (("--height", height), ("--width", width)):
        if value is not None and (value < size_multiple or value % size_multiple):
            raise SkingenError(
                f"{name} {value}: must be a positive multiple of {size_multiple} "
                "(the model works on blocks of that many pixels: 8 for SDXL, 16 for SD3 and FLUX)"
            )
    jobs = []
    for index, row in enumerate(rows):
        control_w, control_h = _image_size(row.control_images[0])
        job_h = height if height is not None else max(size_multiple, control_h // size_multiple * size_multiple)
        job_w = width if width is not None else max(size_multiple, control_w // size_multiple * size_multiple)
        first = row.seed if row.seed is not None else seed + index * num_images_per_prompt
        jobs.extend(ImageJob(row=row, seed=first + k, height=job_h, width=job_w) for k in range(num_images_per_prompt))
    outputs: dict[str, ImageJob] = {}
    for job in jobs:
        other = outputs.setdefault(job.output, job)
        if other is not job:
            raise SkingenError(
                f"{job.row.where} and {other.row.where} would both write {job.output} (same file name and seed); "
                "give the rows distinct 'row_id' values or seeds"
            )
    return jobs


def controls_for(row: GenerationRow, inputs: Sequence[int], index: int) -> tuple[str, ...]:
    """The row's control images for ControlNet ``index`` (``inputs``: images per ControlNet, in order); a single
    control image serves every single-input ControlNet."""
    if len(row.control_images) == 1 and set(inputs) == {1}:
        return row.control_images
    start = sum(inputs[:index])
    return row.control_images[start:start + inputs[index]]


def check_control_counts(rows: Sequence[GenerationRow], count: int | Sequence[int]) -> None:
    """Every row has the control images the ControlNets take: ``count`` ControlNets of one image each, or a list
    of images per ControlNet (several for one trained on several conditioning columns)."""
    inputs = [1] * count if isinstance(count, int) else list(count)
    needed = sum(inputs)
    for row in rows:
        if set(inputs) == {1} and len(row.control_images) not in (1, needed):
            raise SkingenError(
                f"{row.where}: {len(row.control_images)} control images for {needed} ControlNet(s); "
                "give one control image (shared) or one per --controlnet"
            )
        if set(inputs) != {1} and len(row.control_images) != needed:
            raise SkingenError(
                f"{row.where}: {len(row.control_images)} control images, but the ControlNet(s) take {needed} "
                f"({' + '.join(map(str, inputs))}: one per conditioning column they were trained on); name them with "
                "--conditioning_image_column (or repeat --control_image) in training order"
            )
