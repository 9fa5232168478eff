"""Aspect-ratio buckets (``--enable_bucket``), as kohya sd-scripts define them.

The bucket sizes hold about ``resolution`` squared pixels: for every width from ``min_bucket_reso`` to
``max_bucket_reso`` in steps of ``bucket_reso_steps``, the largest height (a multiple of the step, at most
``max_bucket_reso``) whose area stays within ``resolution**2``, and the transposed size; plus the square. An image
goes to the bucket whose aspect ratio is closest to its own, is scaled so it covers the bucket (the side that
fits exactly decides the scale) and is centre-cropped to the bucket, so at most a few pixels are cut where the
ratios differ. A whole keyboard (e.g. 1600x1000) trains at 640x384 at 512 px instead of a centre-cropped
square.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    """Where an image goes at training size: resized to ``resized`` (height, width), then cropped at ``crop``
    (top, left) to ``target`` (height, width). ``original`` is the image's own (height, width)."""

    original: tuple[int, int]
    resized: tuple[int, int]
    crop: tuple[int, int]
    target: tuple[int, int]


def bucket_sizes(resolution: int, min_reso: int, max_reso: int, step: int) -> list[tuple[int, int]]:
    """Every bucket as ``(width, height)``, sorted (kohya's ``make_bucket_resolutions``)."""
    area = resolution * resolution
    sizes = {(int(math.sqrt(area) // step) * step,) * 2}
    width = min_reso
    while width <= max_reso:
        height = min(max_reso, int((area // width) // step) * step)
        if height >= min_reso:
            sizes.add((width, height))
            sizes.add((height, width))
        width += step
    return sorted(sizes)


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to ``width / height`` (the first of equals)."""
    ratio = width / height
    return min(buckets, key=lambda size: abs(size[0] / size[1] - ratio))


def bucket_placement(width: int, height: int, bucket: tuple[int, int]) -> Placement:
    """Scale the image to cover ``bucket`` (width, height) and centre-crop it there."""
    bucket_w, bucket_h = bucket
    scale = bucket_h / height if width / height > bucket_w / bucket_h else bucket_w / width
    resized_w, resized_h = max(bucket_w, int(width * scale + 0.5)), max(bucket_h, int(height * scale + 0.5))
    crop = ((resized_h - bucket_h) // 2, (resized_w - bucket_w) // 2)
    return Placement((height, width), (resized_h, resized_w), crop, (bucket_h, bucket_w))


def square_placement(width: int, height: int, resolution: int) -> Placement:
    """The shorter side resized to ``resolution`` and a centred square cropped (torchvision's Resize(int) +
    CenterCrop, as diffusers' trainer)."""
    if width <= height:
        resized_w, resized_h = resolution, max(resolution, int(resolution * height / width))
    else:
        resized_w, resized_h = max(resolution, int(resolution * width / height)), resolution
    crop = (int(round((resized_h - resolution) / 2.0)), int(round((resized_w - resolution) / 2.0)))
    return Placement((height, width), (resized_h, resized_w), crop, (resolution, resolution))
