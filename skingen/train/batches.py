"""Training data: rows, images and boxes at training size, the data order and every sample's randomness.

The data order is a function of ``(seed, epoch)`` over global batches, and all randomness of a sample (prompt
dropout, timestep, noise, the VAE latent sample) comes from a generator seeded by ``(seed, micro-batch number,
position in the global batch)``. So a resumed run sees the same samples as an uninterrupted one, and N processes
with the same global batch see what one process would. Batches carry ``boxes`` and ``texts`` for an extra loss.
"""

from __future__ import annotations

import argparse
import hashlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..data.caches import LatentCache, TextEmbeddingCache
from ..data.training_rows import TrainingRows, load_rows
from .buckets import Placement, bucket_placement, bucket_sizes, nearest_bucket, square_placement
from .loss_weighting import LossOptions
from .options import conditioning_columns

# ---------------------------------------------------------------------------------------------------------------
# Rows


def load_training_rows(args: argparse.Namespace, split: str = "train", max_samples: int | None = None
                       ) -> TrainingRows:
    """The checked rows of ``split`` the data flags name (see ``skingen.data.training_rows``); ``max_samples`` caps a
    split other than ``train`` (which ``--max_train_samples`` caps).

    With several ``--conditioning_image_column``, the first one fills a row's first conditioning image and the
    others the further ones, all checked in one scan; a row is kept when every column has a usable image for it.
    """
    return load_rows(
        args.train_data_dir, args.dataset_name, image_column=args.image_column,
        conditioning_image_columns=conditioning_columns(args), caption_column=args.caption_column,
        on_bad_sample=args.on_bad_sample, cache_dir=args.cache_dir,
        max_samples=max_samples if split != "train" else args.max_train_samples,
        dataset_config_name=args.dataset_config_name, split=split,
    )


def row_placements(args: argparse.Namespace, rows: TrainingRows) -> list[Placement]:
    """Where each row's image goes at training size: its aspect-ratio bucket with ``--enable_bucket``, else the
    centre-cropped ``--resolution`` square (from each row's checked, displayed image size)."""
    sizes = rows.sizes
    if not args.enable_bucket:
        return [square_placement(width, height, args.resolution) for width, height in sizes]
    buckets = bucket_sizes(args.resolution, args.min_bucket_reso, args.max_bucket_reso, args.bucket_reso_steps)
    return [bucket_placement(width, height, nearest_bucket(width, height, buckets)) for width, height in sizes]


def latent_cache_tag(args: argparse.Namespace) -> str:
    """What besides the image decides its cached latents: the training size rule and the resampling filter."""
    size = (f"bucket{args.resolution}-{args.min_bucket_reso}-{args.max_bucket_reso}-{args.bucket_reso_steps}"
            if args.enable_bucket else str(args.resolution))
    return f"{size}-{args.image_interpolation_mode}"


# ---------------------------------------------------------------------------------------------------------------
# Images and boxes


def _resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(width, height) after resizing the shorter side to ``resolution`` (as torchvision's Resize(int))."""
    resized_h, resized_w = square_placement(width, height, resolution).resized
    return resized_w, resized_h


def place_image(image: Image.Image, placement: Placement, resample: int = Image.BILINEAR) -> Image.Image:
    """Resize and crop ``image`` as ``placement`` says (no flip: keyboards carry text)."""
    resized_h, resized_w = placement.resized
    if (resized_w, resized_h) != image.size:
        image = image.resize((resized_w, resized_h), resample)
    top, left = placement.crop
    height, width = placement.target
    return image.crop((left, top, left + width, top + height))


def resize_and_center_crop(image: Image.Image, resolution: int, resample: int = Image.BILINEAR
                           ) -> tuple[Image.Image, tuple[int, int], tuple[int, int]]:
    """Resize the shorter side to ``resolution`` and centre-crop a square; no flip (keyboards carry text).

    Returns the crop, the original ``(height, width)`` and the crop's ``(top, left)`` in the resized image,
    which is what SDXL's time ids record.
    """
    placement = square_placement(*image.size, resolution)
    return place_image(image, placement, resample), placement.original, placement.crop


def image_to_tensor(image: Image.Image, normalize: bool) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1], or [-1, 1] with ``normalize``."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1)
    return tensor * 2.0 - 1.0 if normalize else tensor


def tensor_to_image(tensor: torch.Tensor) -> Image.Image:
    """A (3, H, W) tensor in [-1, 1] (what ``image_to_tensor(..., normalize=True)`` and a VAE decoder give) as RGB."""
    return Image.fromarray(((tensor.detach().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy())


def training_pixels(image: Image.Image, resolution: int, placement: Placement | None = None,
                    resample: int = Image.BILINEAR) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """A training image as (3, H, W) in [-1, 1] (a ``resolution`` square, or ``placement``'s target), with its
    original size and crop offsets."""
    placement = placement or square_placement(*image.size, resolution)
    return image_to_tensor(place_image(image, placement, resample), normalize=True), placement.original, placement.crop


def place_boxes(quads: Sequence, texts: Sequence[str], placement: Placement) -> tuple[torch.Tensor, list[str]]:
    """Map 4-point boxes from original-image pixels to training pixels (same resize and crop as the image).

    Boxes entirely outside the crop are dropped with their text; boxes partly outside are kept unclipped.
    Returns a float32 ``(N, 4, 2)`` tensor of ``(x, y)`` points and the N aligned strings.
    """
    height, width = placement.original
    resized_h, resized_w = placement.resized
    target_h, target_w = placement.target
    points = torch.tensor(quads, dtype=torch.float32).reshape(-1, 4, 2)
    points[..., 0] = points[..., 0] * (resized_w / width) - placement.crop[1]
    points[..., 1] = points[..., 1] * (resized_h / height) - placement.crop[0]
    inside = (
        (points[..., 0].amax(dim=1) > 0)
        & (points[..., 0].amin(dim=1) < target_w)
        & (points[..., 1].amax(dim=1) > 0)
        & (points[..., 1].amin(dim=1) < target_h)
    )
    return points[inside], [text for text, keep in zip(texts, inside.tolist()) if keep]


def transform_boxes(
    quads: Sequence, texts: Sequence[str], original_size: tuple[int, int], crop_top_left: tuple[int, int], resolution: int
) -> tuple[torch.Tensor, list[str]]:
    """:func:`place_boxes` for the centre-cropped ``resolution`` square."""
    height, width = original_size
    placement = square_placement(width, height, resolution)
    return place_boxes(quads, texts, Placement(placement.original, placement.resized, tuple(crop_top_left), placement.target))


# ---------------------------------------------------------------------------------------------------------------
# Data order, per-sample randomness and batches


def sample_seed(seed: int, micro_step: int, position: int) -> int:
    """The seed of one sample's randomness: global micro-batch number and position in the global batch."""
    digest = hashlib.sha256(f"{seed}:{micro_step}:{position}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Yields this process's share of each global batch, as ``(row, sample_seed)`` pairs.

    Epoch ``e`` visits the rows in ``randperm(seed, e)`` order, ``global_batch_size`` at a time; the last batch
    of an epoch is topped up from the start of that order, so every global batch is full and the plan does not
    depend on how many processes share it. Starting at ``start_micro_step`` continues a resumed run at the
    next unseen batch without loading the skipped ones.

    With ``buckets`` (a bucket id per row, e.g. its training size), every global batch holds rows of one bucket:
    each bucket's rows, in the epoch's order, are cut into global batches (the last one topped up from the
    start of that bucket's rows), and the epoch visits these batches in an order drawn from ``(seed, epoch)``.
    """

    def __init__(self, num_rows: int, batch_size: int, num_processes: int, process_index: int, seed: int,
                 start_micro_step: int, end_micro_step: int, buckets: Sequence | None = None):
        self.num_rows = num_rows
        self.batch_size = batch_size
        self.global_batch_size = batch_size * num_processes
        self.first_position = process_index * batch_size
        self.seed = seed
        self.start, self.end = start_micro_step, end_micro_step
        self.buckets = list(buckets) if buckets is not None and len(set(buckets)) > 1 else None
        if self.buckets is None:
            self.batches_per_epoch = math.ceil(num_rows / self.global_batch_size)
        else:
            counts = {bucket: self.buckets.count(bucket) for bucket in set(self.buckets)}
            self.batches_per_epoch = sum(math.ceil(count / self.global_batch_size) for count in counts.values())

    def epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(sample_seed(self.seed, -1, epoch))
        return torch.randperm(self.num_rows, generator=generator).tolist()

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The rows of every global batch of ``epoch``, in visiting order."""
        order = self.epoch_order(epoch)
        size = self.global_batch_size
        if self.buckets is None:
            groups = [order]
        else:
            by_bucket: dict = {}
            for row in order:
                by_bucket.setdefault(self.buckets[row], []).append(row)
            groups = [by_bucket[bucket] for bucket in sorted(by_bucket)]
        batches = [
            [group[(first + position) % len(group)] for position in range(size)]
            for group in groups for first in range(0, len(group), size)
        ]
        if self.buckets is not None:
            generator = torch.Generator().manual_seed(sample_seed(self.seed, -3, epoch))
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return batches

    def __len__(self) -> int:
        return max(0, self.end - self.start)

    def __iter__(self):
        epoch, batches = None, None
        for micro_step in range(self.start, self.end):
            batch_epoch, index = divmod(micro_step, self.batches_per_epoch)
            if batch_epoch != epoch:
                epoch, batches = batch_epoch, self.epoch_batches(batch_epoch)
            rows = batches[index][self.first_position:self.first_position + self.batch_size]
            yield [(row, sample_seed(self.seed, micro_step, self.first_position + i)) for i, row in enumerate(rows)]


class TrainingSamples(torch.utils.data.Dataset):
    """A training sample per ``(row, sample_seed)``: tensors ready for the step, plus boxes and texts.

    Keys: ``conditioning_pixel_values`` (3 per conditioning column, H, W) in [0, 1]; ``latent_dist`` (2C, H/f, W/f)
    when latents are cached, and/or ``pixel_values`` (3, H, W) in [-1, 1]; ``prompt_embeds``,
    ``pooled_prompt_embeds`` (what the backbone caches), SDXL's ``time_ids`` (6,); ``noise`` and ``latent_noise`` (C, H/f, W/f); ``timesteps`` ();
    with the loss options ``offset_noise`` (C, 1, 1) and ``perturbation_noise`` (C, H/f, W/f); ``boxes``
    (N, 4, 2); ``texts``, ``captions`` (the caption used, "" when dropped), ``row_ids`` and ``sample_seeds`` (seed
    an extra loss's own randomness from these to keep resume and multi-process runs exact). H x W is the
    ``resolution`` square, or the row's placement target (its aspect-ratio bucket).
    """

    def __init__(self, rows: TrainingRows, *, resolution: int, text_cache: TextEmbeddingCache, latent_cache: LatentCache | None,
                 latent_keys: Sequence[str] | None, latent_shape: tuple[int, int, int], backbone,
                 proportion_empty_prompts: float, load_pixel_values: bool,
                 placements: Sequence[Placement] | None = None, bucketed: bool = False,
                 resample: int = Image.BILINEAR, conditioning_dropout: Sequence[float] | None = None,
                 loss_options: LossOptions | None = None):
        self.rows = rows
        self.resolution = resolution
        self.text_cache = text_cache
        self.latent_cache, self.latent_keys = latent_cache, latent_keys
        self.latent_shape = latent_shape
        self.backbone = backbone  # draws the noise level, adds per-sample conditioning (SDXL's time ids)
        self.proportion_empty_prompts = proportion_empty_prompts
        self.load_pixel_values = load_pixel_values or latent_cache is None
        self.placements = list(placements) if placements is not None else None
        self.bucketed = bucketed
        self.resample = resample
        self.conditioning_dropout = list(conditioning_dropout or [0.0] * rows.conditioning_count)
        self.loss_options = loss_options or LossOptions()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        row, seed = item
        return self.sample(row, seed)

    def target_size(self, row: int) -> tuple[int, int]:
        """The row's training size (height, width)."""
        return self.placements[row].target if self.placements is not None else (self.resolution, self.resolution)

    def _place(self, image: Image.Image, target: tuple[int, int]) -> Image.Image:
        width, height = image.size
        placement = (bucket_placement(width, height, (target[1], target[0])) if self.bucketed
                     else square_placement(width, height, self.resolution))
        return place_image(image, placement, self.resample)

    def sample(self, row: int, seed: int, fixed_timestep: int | None = None) -> dict[str, Any]:
        """Row ``row`` with the randomness of ``seed``; with ``fixed_timestep``, at that timestep and never with the
        caption dropped (the fixed-timestep validation loss), the noise still drawn from ``seed``."""
        target = self.target_size(row)
        channels, latent_height, _ = self.latent_shape
        factor = self.resolution // latent_height
        shape = (channels, target[0] // factor, target[1] // factor)
        # The draw order is fixed: changing it changes every run's randomness. Draws of options come last, so
        # turning an option on leaves the others' draws as they were.
        generator = torch.Generator().manual_seed(seed)
        dropped = bool(torch.rand((), generator=generator) < self.proportion_empty_prompts)
        timestep = self.backbone.draw_timestep(generator)
        noise = torch.randn(shape, generator=generator)
        latent_noise = torch.randn(shape, generator=generator)
        sample: dict[str, Any] = {}
        if self.loss_options.noise_offset:
            sample["offset_noise"] = torch.randn((channels, 1, 1), generator=generator)
        if self.loss_options.input_perturbation:
            sample["perturbation_noise"] = torch.randn(shape, generator=generator)
        conditioning_dropped = [bool(torch.rand((), generator=generator) < p) if p > 0 else False
                                for p in self.conditioning_dropout]
        if fixed_timestep is not None:
            dropped, timestep = False, self.backbone.fixed_timestep(fixed_timestep)
            conditioning_dropped = [False] * len(conditioning_dropped)

        sample.update(timesteps=timestep, noise=noise, latent_noise=latent_noise)
        placement = self.placements[row] if self.placements is not None else None
        if self.latent_cache is not None:
            sample["latent_dist"], original, crop = self.latent_cache.load(self.latent_keys[row])
        if self.load_pixel_values:
            sample["pixel_values"], original, crop = training_pixels(
                self.rows.image(row), self.resolution, placement, self.resample)
        if placement is not None:
            original, crop = placement.original, placement.crop
        controls = self.rows.conditioning_images(row)
        sample["conditioning_pixel_values"] = torch.cat([
            torch.zeros((3, *target)) if drop else image_to_tensor(self._place(control, target), normalize=False)
            for control, drop in zip(controls, conditioning_dropped)
        ])

        checked = self.rows[row]
        caption = "" if dropped else checked.text
        sample.update(self.text_cache.load(caption))
        sample.update(self.backbone.sample_conditioning(original, crop, target))
        height, width = original
        resized = placement.resized if placement is not None else square_placement(width, height, self.resolution).resized
        sample["boxes"], sample["texts"] = place_boxes(
            checked.box, checked.texts, Placement(original, resized, tuple(crop), target))
        sample["captions"] = caption
        sample["row_ids"] = checked.row_id
        sample["sample_seeds"] = seed
        return sample


LIST_KEYS = ("boxes", "texts", "captions", "row_ids", "sample_seeds")


def collate_samples(samples: list[dict]) -> dict[str, Any]:
    """Stack tensors; ``boxes``, ``texts``, ``captions``, ``row_ids`` and ``sample_seeds`` stay per-sample lists."""
    return {
        key: [s[key] for s in samples] if key in LIST_KEYS else torch.stack([s[key] for s in samples])
        for key in samples[0]
    }


def batch_to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            moved[key] = value.to(device, non_blocking=True)
        elif key == "boxes":
            moved[key] = [boxes.to(device) for boxes in value]
        else:
            moved[key] = value
    return moved
