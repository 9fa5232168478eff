"""Captions for training rows: BLIP (conditional on a prefix) or a weight-free template captioner,
then the trigger word and ``writing "..."`` for the text the skin must show.

A finished caption reads like the seed's rows:
``a keyboard skin of a girl with long hair, iflyskin, writing "前往 搜索"``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from .. import sharding
from ..data.images import open_rgb, to_rgb
from ..data.writing import writing_phrase
from ..errors import SkingenError

DEFAULT_BLIP_MODEL = "Salesforce/blip-image-captioning-large"
DEFAULT_PROMPT = "a keyboard skin of"
TRIGGER_WORD = "iflyskin"
CAPTIONERS = ("blip", "template")
DTYPES = ("auto", "float32", "float16", "bfloat16")
# What the hub accepts as a model id ("name" or "owner/name"); anything else must be an existing local folder.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?")


def compose_caption(description: str, trigger_word: str = TRIGGER_WORD, texts: Sequence[str] = ()) -> str:
    """``description, trigger_word, writing "..."``, leaving out the parts that are empty."""
    parts = [description.strip().rstrip(","), trigger_word.strip(), writing_phrase(texts)]
    return ", ".join(part for part in parts if part)


# ---------------------------------------------------------------------------------------------------------------
# BLIP


def _torch_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise SkingenError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return getattr(torch, dtype)


class BlipCaptioner:
    """``BlipForConditionalGeneration`` captions, continuing ``prompt`` (the seed's "a keyboard skin of")."""

    def __init__(
        self,
        model_name_or_path: str | os.PathLike = DEFAULT_BLIP_MODEL,
        *,
        prompt: str = DEFAULT_PROMPT,
        device: str | None = None,
        dtype: str = "auto",
        max_new_tokens: int = 30,
        num_beams: int = 1,
    ):
        import torch
        from transformers import BlipForConditionalGeneration, BlipProcessor

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.torch_dtype = _torch_dtype(dtype, device)
        source = str(model_name_or_path)
        local = Path(source).expanduser()
        if not local.is_dir() and not _HUB_ID.fullmatch(source):
            raise SkingenError(
                f"--model {source}: folder not found; pass a local BLIP folder (config.json, weights and processor "
                f"files, e.g. a download of {DEFAULT_BLIP_MODEL}) or a hub id"
            )
        try:
            self.processor = BlipProcessor.from_pretrained(str(local) if local.is_dir() else source)
            self.model = BlipForConditionalGeneration.from_pretrained(str(local) if local.is_dir() else source)
        except (OSError, ValueError) as err:
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            if local.is_dir():
                raise SkingenError(
                    f"--model {local}: not a BLIP model folder ({reason}); it needs what save_pretrained writes for "
                    "BlipForConditionalGeneration and BlipProcessor (config.json, weights, preprocessor and tokenizer files)"
                ) from None
            raise SkingenError(
                f"--model {source}: could not load BLIP ({reason}). Without internet the model hub cannot be reached: "
                f"download the model where there is internet (e.g. `huggingface-cli download {DEFAULT_BLIP_MODEL} "
                "--local-dir blip-large`), then pass the local folder with --model /path/to/blip-large; "
                "or use --captioner template, which needs no weights"
            ) from None
        self.model.to(device=device, dtype=self.torch_dtype).eval()
        self.device = device
        self.prompt = prompt.strip()
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams

    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        import torch

        images = [to_rgb(image) for image in images]
        if self.prompt:
            inputs = self.processor(images=images, text=[self.prompt] * len(images), return_tensors="pt")
        else:
            inputs = self.processor(images=images, return_tensors="pt")
        inputs = inputs.to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.torch_dtype)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams)
        # The generated ids start with the prompt, so the decoded caption already reads "a keyboard skin of ...".
        return [" ".join(text.split()) for text in self.processor.batch_decode(out, skip_special_tokens=True)]


# ---------------------------------------------------------------------------------------------------------------
# Template captioner: colours and style words from image statistics, no weights

# Reference colours; a pixel takes the name of the nearest one in CIE Lab.
NAMED_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (10, 10, 10),
    "dark gray": (70, 70, 70),
    "gray": (128, 128, 128),
    "silver": (192, 192, 192),
    "white": (250, 250, 250),
    "red": (205, 35, 35),
    "maroon": (120, 20, 30),
    "orange": (245, 135, 30),
    "yellow": (245, 220, 50),
    "beige": (230, 210, 170),
    "brown": (125, 80, 40),
    "olive": (120, 120, 40),
    "green": (50, 165, 70),
    "dark green": (20, 85, 45),
    "mint": (170, 235, 200),
    "teal": (20, 130, 130),
    "cyan": (60, 205, 225),
    "light blue": (150, 200, 245),
    "blue": (40, 85, 210),
    "navy": (20, 30, 95),
    "purple": (120, 50, 165),
    "lavender": (195, 165, 230),
    "pink": (245, 165, 195),
    "magenta": (225, 40, 150),
}


def _to_lab(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB (..., 3) -> float Lab with L in 0..100."""
    flat = rgb.reshape(-1, 1, 3).astype(np.float32) / 255.0
    return cv2.cvtColor(flat, cv2.COLOR_RGB2Lab).reshape(-1, 3)


_DARK_NAMES = {"black", "dark gray", "navy", "maroon", "dark green"}
_LIGHT_NAMES = {"white", "silver", "beige", "mint"}
_PALETTE_NAMES = list(NAMED_COLOURS)
_PALETTE_LAB = _to_lab(np.array(list(NAMED_COLOURS.values()), dtype=np.uint8))


@dataclass
class ImageStyle:
    """What the template captioner measured; each field maps to words in the caption."""

    colours: list[tuple[str, float]]  # (name, share of pixels), largest first
    lightness: float  # mean L, 0..100
    contrast: float  # std of L
    edge_density: float  # fraction of Canny edge pixels at 256 px
    gradient: bool  # smooth large-scale change of lightness or colour
    warm_share: float  # among saturated pixels
    cool_share: float
    saturated_share: float


def _nearest_colour_table() -> np.ndarray:
    """Palette index of the nearest named colour (Lab distance) for every RGB cell of a 32x32x32 grid."""
    levels = np.arange(4, 256, 8, dtype=np.uint8)  # centres of the 32 cells per channel
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1)
    lab = _to_lab(grid)
    distances = ((lab[:, None, :] - _PALETTE_LAB[None, :, :]) ** 2).sum(axis=-1)
    return distances.argmin(axis=1).astype(np.uint8).reshape(32, 32, 32)


_NEAREST_COLOUR = _nearest_colour_table()


def dominant_colours(pixels: np.ndarray, min_share: float = 0.12, max_colours: int = 3) -> list[tuple[str, float]]:
    """Quantise every pixel to the nearest named colour (Lab distance, through a 32-level RGB table); the
    names covering at least ``min_share`` of the image, largest first (always at least one)."""
    cells = pixels.reshape(-1, 3) >> 3
    indices = _NEAREST_COLOUR[cells[:, 0], cells[:, 1], cells[:, 2]]
    counts = np.bincount(indices, minlength=len(_PALETTE_NAMES))
    shares = counts / counts.sum()
    order = np.argsort(-shares, kind="stable")
    picked = [(_PALETTE_NAMES[i], float(shares[i])) for i in order[:max_colours] if shares[i] >= min_share]
    return picked or [(_PALETTE_NAMES[order[0]], float(shares[order[0]]))]


def measure_style(image: Image.Image) -> ImageStyle:
    rgb = np.asarray(image.convert("RGB"))
    small = cv2.resize(rgb, (64, 64), interpolation=cv2.INTER_AREA)
    # Colours are counted on sampled pixels, not averaged ones: averaging turns fine black/white patterns grey.
    sampled = cv2.resize(rgb, (128, 128), interpolation=cv2.INTER_NEAREST)
    lab = _to_lab(small).reshape(64, 64, 3)
    lightness = lab[..., 0]

    gray = cv2.cvtColor(cv2.resize(rgb, (256, 256), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2GRAY)
    edge_density = float((cv2.Canny(gray, 50, 80) > 0).mean())

    # A gradient: the 8x8 average changes a lot across the image, yet neighbouring pixels stay close.
    coarse = cv2.resize(lab, (8, 8), interpolation=cv2.INTER_AREA)
    coarse_spread = float(np.ptp(coarse.reshape(-1, 3), axis=0).max())
    fine_step = float(np.abs(np.diff(lab, axis=1)).mean() + np.abs(np.diff(lab, axis=0)).mean())
    gradient = coarse_spread > 25 and fine_step < 3.0 and edge_density < 0.02

    hsv = cv2.cvtColor(sampled, cv2.COLOR_RGB2HSV_FULL).reshape(-1, 3).astype(np.float32)
    hue = hsv[:, 0] * 360.0 / 256.0
    saturated = (hsv[:, 1] > 76) & (hsv[:, 2] > 50)
    n_saturated = int(saturated.sum())
    warm = ((hue < 70) | (hue >= 300)) & saturated
    cool = (hue >= 150) & (hue < 270) & saturated
    return ImageStyle(
        colours=dominant_colours(sampled),
        lightness=float(lightness.mean()),
        contrast=float(lightness.std()),
        edge_density=edge_density,
        gradient=gradient,
        warm_share=float(warm.sum() / n_saturated) if n_saturated else 0.0,
        cool_share=float(cool.sum() / n_saturated) if n_saturated else 0.0,
        saturated_share=n_saturated / len(hsv),
    )


def describe_style(style: ImageStyle) -> str:
    """``a dark high-contrast navy and pink design, gradient, busy pattern, cool tones``."""
    names = [name for name, _ in style.colours]
    adjectives = []
    # "dark black" or "light white" says nothing the colour does not.
    if style.lightness < 35 and names[0] not in _DARK_NAMES:
        adjectives.append("dark")
    elif style.lightness > 72 and names[0] not in _LIGHT_NAMES:
        adjectives.append("light")
    if style.contrast > 28:
        adjectives.append("high-contrast")
    colour_phrase = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    details = []
    if style.gradient:
        details.append("gradient")
    if style.edge_density > 0.1:
        details.append("busy pattern")
    elif style.edge_density < 0.02 and not style.gradient:
        details.append("flat colours")
    if style.saturated_share < 0.05:
        details.append("muted colours")
    elif style.warm_share > 0.65:
        details.append("warm tones")
    elif style.cool_share > 0.65:
        details.append("cool tones")
    head = " ".join(["a", *adjectives, colour_phrase, "design"])
    return ", ".join([head, *details])


class TemplateCaptioner:
    """Captions from image statistics: needs no model weights, deterministic, fast."""

    def __init__(self, prompt: str = DEFAULT_PROMPT):
        self.prompt = prompt.strip()

    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        return [" ".join(filter(None, [self.prompt, describe_style(measure_style(image))])) for image in images]


def build_captioner(
    kind: str,
    *,
    model_name_or_path: str = DEFAULT_BLIP_MODEL,
    prompt: str = DEFAULT_PROMPT,
    device: str | None = None,
    dtype: str = "auto",
    max_new_tokens: int = 30,
    num_beams: int = 1,
):
    """``blip`` (device None: cuda when available) or ``template``."""
    if kind == "blip":
        return BlipCaptioner(
            model_name_or_path,
            prompt=prompt,
            device=device,
            dtype=dtype,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
        )
    if kind == "template":
        return TemplateCaptioner(prompt=prompt)
    raise SkingenError(f"--captioner must be one of {', '.join(CAPTIONERS)}, got {kind!r}")


# ---------------------------------------------------------------------------------------------------------------
# Captioning a dataset folder, resumably, over any number of processes


@dataclass
class CaptionStats:
    total: int
    captioned: int
    kept: int
    rows_with_texts_cut: int = 0  # captions that name only the largest --max_writing_texts of a row's texts
    texts_left_out: int = 0


def writing_texts(texts: Sequence[str], boxes: Sequence, max_texts: int = 0) -> list[str]:
    """The texts for ``writing "..."``: with ``max_texts`` > 0 only that many, largest boxes first (in row order).

    SDXL's text encoders read 77 tokens; a keyboard has 20+ labels, so the caption names the most
    prominent ones (the full list stays in the row's ``texts`` for the text loss).
    """
    if max_texts <= 0 or len(texts) <= max_texts:
        return list(texts)
    if len(boxes) != len(texts):
        return list(texts[:max_texts])
    areas = [_quad_area(quad) for quad in boxes]
    largest = sorted(range(len(texts)), key=lambda i: -areas[i])[:max_texts]
    return [texts[i] for i in sorted(largest)]


def _quad_area(quad) -> float:
    """Shoelace area of a 4-point box."""
    return abs(0.5 * sum(quad[i][0] * quad[(i + 1) % 4][1] - quad[(i + 1) % 4][0] * quad[i][1] for i in range(4)))


def caption_rows(
    rows: list,
    dataset_dir: str | os.PathLike,
    captioner,
    *,
    save: Callable[[list], object],
    trigger_word: str = TRIGGER_WORD,
    overwrite: bool = False,
    batch_size: int = 8,
    max_writing_texts: int = 0,
    captioner_settings: dict | None = None,
    num_shards: int = 1,
    shard_index: int = 0,
) -> CaptionStats:
    """Fill the caption (``row.raw["text"]``) of the checked rows (:class:`skingen.data.rows.Row`) that need it; the
    rows of this process (of the launched processes, times ``num_shards`` job-array shards) go in batches, each kept as a part file,
    and the main process merges them and calls ``save(rows)`` at the end (and on Ctrl-C).

    Without ``overwrite`` a row with a non-empty caption is kept, so rerunning after an interruption
    resumes. With ``overwrite`` every row is recaptioned; the rows done so far are in the part files until the
    run finishes, so an interrupted ``--overwrite`` run also resumes instead of starting over.
    ``captioner_settings`` (what shapes a caption: model, prompt, ...) decides which part files are still valid.
    """
    if batch_size < 1:
        raise SkingenError(f"--batch_size must be >= 1, got {batch_size}")
    settings = {
        "captioner": captioner_settings or type(captioner).__name__,
        "trigger_word": trigger_word,
        "max_writing_texts": max_writing_texts,
    }
    shard = sharding.Shard(sharding.process_group(), sharding.Parts(dataset_dir, "caption", settings), num_shards, shard_index)
    shard.group.on_main(shard.parts.prepare)
    finished = shard.parts.read()
    for row in rows:
        if row.row_id in finished:
            row.raw.update(finished[row.row_id].fields)
    if overwrite:
        todo = [(i, row) for i, row in enumerate(rows) if row.row_id not in finished]
    else:
        todo = [(i, row) for i, row in enumerate(rows) if not (row.raw.get("text") or "").strip()]

    def caption_batch(batch: list) -> list[sharding.Entry]:
        descriptions = captioner.caption([open_rgb(row.image.path, row.where) for row in batch])
        entries = []
        for row, description in zip(batch, descriptions):
            named = writing_texts(row.texts, row.box, max_writing_texts)
            left_out = len(row.texts) - len(named)
            caption = compose_caption(description, trigger_word, named)
            entries.append(sharding.Entry(row.row_id, {"text": caption}, {"cut": int(left_out > 0), "left_out": left_out}))
        return entries

    def merge(entries: dict[str, sharding.Entry]) -> dict:
        for row in rows:
            if row.row_id in entries:
                row.raw.update(entries[row.row_id].fields)
        if entries:
            save(rows)
        return sharding.sum_notes(entries.values())

    try:
        shard.run(todo, caption_batch, batch_size=batch_size, desc="captioning")
    except KeyboardInterrupt:
        shard.merge_on_interrupt(merge)  # keep what the finished batches produced, so the rerun starts right here
        raise
    notes = shard.finish(merge) or {}
    return CaptionStats(
        total=len(rows),
        captioned=len(todo),
        kept=len(rows) - len(todo),
        rows_with_texts_cut=notes.get("cut", 0),
        texts_left_out=notes.get("left_out", 0),
    )
