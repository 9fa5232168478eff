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

import datasets

from .caching import LatentCache, TextEmbeddingCache
from .data import load_skin_dataset
from .models import compute_time_ids

# ---------------------------------------------------------------------------------------------------------------
# Rows


def load_training_rows(args: argparse.Namespace) -> datasets.Dataset:
    """The training rows the data flags name, with skingen's columns (see ``skingen.data.load_skin_dataset``)."""
    return load_skin_dataset(
        args.train_data_dir, args.dataset_name, image_column=args.image_column,
        conditioning_image_column=args.conditioning_image_column, caption_column=args.caption_column,
        on_bad_sample=args.on_bad_sample, cache_dir=args.cache_dir, max_samples=args.max_train_samples,
        dataset_config_name=args.dataset_config_name,
    )


# ---------------------------------------------------------------------------------------------------------------
# Images and boxes


def _resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(width, height) after resizing the shorter side to ``resolution`` (as torchvision's Resize(int))."""
    if width <= height:
        return resolution, max(resolution, int(resolution * height / width))
    return max(resolution, int(resolution * width / height)), resolution


def resize_and_center_crop(image: Image.Image, resolution: int) -> tuple[Image.Image, tuple[int, int], tuple[int, int]]:
    """Resize the shorter side to ``resolution`` (bilinear) and centre-crop a square; no flip (keyboards carry text).

    Returns the crop, the original ``(height, width)`` and the crop's ``(top, left)`` in the resized image,
    which is what SDXL's time ids record.
    """
    width, height = image.size
    new_w, new_h = _resized_size(width, height, resolution)
    resized = image.resize((new_w, new_h), Image.BILINEAR) if (new_w, new_h) != (width, height) else image
    top = int(round((new_h - resolution) / 2.0))
    left = int(round((new_w - resolution) / 2.0))
    return resized.crop((left, top, left + resolution, top + resolution)), (height, width), (top, left)


def image_to_tensor(image: Image.Image, normalize: bool) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1], or [-1, 1] with ``normalize``."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1)
    return tensor * 2.0 - 1.0 if normalize else tensor


def training_pixels(image: Image.Image, resolution: int) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """A training image as (3, R, R) in [-1, 1], with its original size and crop offsets."""
    cropped, original, crop = resize_and_center_crop(image, resolution)
    return image_to_tensor(cropped, normalize=True), original, crop


def transform_boxes(
    quads: Sequence, texts: Sequence[str], original_size: tuple[int, int], crop_top_left: tuple[int, int], resolution: int
) -> tuple[torch.Tensor, list[str]]:
    """Map 4-point boxes from original-image pixels to training pixels (same resize and crop as the image).

    Boxes entirely outside the crop are dropped with their text; boxes partly outside are kept unclipped.
    Returns a float32 ``(N, 4, 2)`` tensor of ``(x, y)`` points and the N aligned strings.
    """
    height, width = original_size
    new_w, new_h = _resized_size(width, height, resolution)
    points = torch.tensor(quads, dtype=torch.float32).reshape(-1, 4, 2)
    points[..., 0] = points[..., 0] * (new_w / width) - crop_top_left[1]
    points[..., 1] = points[..., 1] * (new_h / height) - crop_top_left[0]
    inside = (
        (points[..., 0].amax(dim=1) > 0)
        & (points[..., 0].amin(dim=1) < resolution)
        & (points[..., 1].amax(dim=1) > 0)
        & (points[..., 1].amin(dim=1) < resolution)
    )
    return points[inside], [text for text, keep in zip(texts, inside.tolist()) if keep]


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
    """

    def __init__(self, num_rows: int, batch_size: int, num_processes: int, process_index: int, seed: int,
                 start_micro_step: int, end_micro_step: int):
        self.num_rows = num_rows
        self.batch_size = batch_size
        self.global_batch_size = batch_size * num_processes
        self.first_position = process_index * batch_size
        self.seed = seed
        self.start, self.end = start_micro_step, end_micro_step
        self.batches_per_epoch = math.ceil(num_rows / self.global_batch_size)

    def epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(sample_seed(self.seed, -1, epoch))
        return torch.randperm(self.num_rows, generator=generator).tolist()

    def __len__(self) -> int:
        return max(0, self.end - self.start)

    def __iter__(self):
        epoch, order = None, None
        for micro_step in range(self.start, self.end):
            batch_epoch, index = divmod(micro_step, self.batches_per_epoch)
            if batch_epoch != epoch:
                epoch, order = batch_epoch, self.epoch_order(batch_epoch)
            first = index * self.global_batch_size
            yield [
                (order[(first + position) % self.num_rows], sample_seed(self.seed, micro_step, position))
                for position in range(self.first_position, self.first_position + self.batch_size)
            ]


class TrainingSamples(torch.utils.data.Dataset):
    """A training sample per ``(row, sample_seed)``: tensors ready for the step, plus boxes and texts.

    Keys: ``conditioning_pixel_values`` (3, R, R) in [0, 1]; ``latent_dist`` (2C, R/f, R/f) when latents are
    cached, and/or ``pixel_values`` (3, R, R) in [-1, 1]; ``prompt_embeds``, ``pooled_prompt_embeds``,
    ``time_ids`` (6,); ``noise`` and ``latent_noise`` (C, R/f, R/f); ``timesteps`` (); ``boxes`` (N, 4, 2);
    ``texts``, ``captions`` (the caption used, "" when dropped), ``row_ids`` and ``sample_seeds`` (seed an
    extra loss's own randomness from these to keep resume and multi-process runs exact).
    """

    def __init__(self, dataset, *, resolution: int, text_cache: TextEmbeddingCache, latent_cache: LatentCache | None,
                 latent_keys: Sequence[str] | None, latent_shape: tuple[int, int, int], num_train_timesteps: int,
                 proportion_empty_prompts: float, time_ids_crop: tuple[int, int] | None, load_pixel_values: bool):
        self.images = dataset.select_columns(["image"])
        self.conditioning_images = dataset.select_columns(["conditioning_image"])
        self.captions = list(dataset["text"])
        self.boxes = list(dataset["box"])
        self.texts = list(dataset["texts"])
        self.row_ids = list(dataset["row_id"])
        self.resolution = resolution
        self.text_cache = text_cache
        self.latent_cache, self.latent_keys = latent_cache, latent_keys
        self.latent_shape = latent_shape
        self.num_train_timesteps = num_train_timesteps
        self.proportion_empty_prompts = proportion_empty_prompts
        self.time_ids_crop = time_ids_crop
        self.load_pixel_values = load_pixel_values or latent_cache is None

    def __len__(self) -> int:
        return len(self.row_ids)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        row, seed = item
        return self.sample(row, seed)

    def sample(self, row: int, seed: int, fixed_timestep: int | None = None) -> dict[str, Any]:
        """Row ``row`` with the randomness of ``seed``; with ``fixed_timestep``, at that timestep and never with the
        caption dropped (the fixed-timestep validation loss), the noise still drawn from ``seed``."""
        # The draw order is fixed: changing it changes every run's randomness.
        generator = torch.Generator().manual_seed(seed)
        dropped = bool(torch.rand((), generator=generator) < self.proportion_empty_prompts)
        timestep = torch.randint(0, self.num_train_timesteps, (), generator=generator)
        noise = torch.randn(self.latent_shape, generator=generator)
        latent_noise = torch.randn(self.latent_shape, generator=generator)
        if fixed_timestep is not None:
            dropped, timestep = False, torch.tensor(fixed_timestep)

        sample: dict[str, Any] = {"timesteps": timestep, "noise": noise, "latent_noise": latent_noise}
        if self.latent_cache is not None:
            sample["latent_dist"], original, crop = self.latent_cache.load(self.latent_keys[row])
        if self.load_pixel_values:
            sample["pixel_values"], original, crop = training_pixels(self.images[row]["image"], self.resolution)
        control, _, _ = resize_and_center_crop(self.conditioning_images[row]["conditioning_image"], self.resolution)
        sample["conditioning_pixel_values"] = image_to_tensor(control, normalize=False)

        caption = "" if dropped else self.captions[row]
        sample["prompt_embeds"], sample["pooled_prompt_embeds"] = self.text_cache.load(caption)
        sample["time_ids"] = compute_time_ids(original, self.time_ids_crop or crop, (self.resolution, self.resolution))
        sample["boxes"], sample["texts"] = transform_boxes(
            self.boxes[row], self.texts[row], original, crop, self.resolution
        )
        sample["captions"] = caption
        sample["row_ids"] = self.row_ids[row]
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
