"""The OCR text loss (ControlNet++ / AnyText design), without a sampling loop inside training.

At the training timestep t the model's prediction gives a one-step estimate of the clean latents x0.
Only the latent tiles around the text boxes are decoded by the VAE, *with* gradients; each box is cut
out as a rotated rectangle (``affine_grid``/``grid_sample``, differentiable), resized to the recognizer's
48-pixel height, and scored by the frozen PP-OCRv4 recognizer: CTC against the box's text and/or MSE
between the recognizer's neck features of the generated and the ground-truth crop. Applied where
t <= ``max_timestep`` (the x0 estimate is meaningless at high noise) and/or weighted by alpha_bar_t.

Why not the seed's approach (sampling full images inside the training step, CTC on the result): the
gradient through a multi-step sampler is either cut or unaffordable, so ``loss_text`` did not go down.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import SkingenError
from .recognizer import (
    REC_HEIGHT,
    REC_MAX_WIDTH,
    PPOCRRecognizer,
    encode_texts,
    load_recognizer,
    normalize_for_recognizer,
)

TEXT_LOSS_TYPES = ("ctc", "perceptual", "both")
TIMESTEP_WEIGHTINGS = ("none", "alpha_bar")
MIN_BOX_SIDE = 2.0  # pixels; thinner boxes cannot hold readable text
SKIP_REASONS = ("outside", "too_small", "unknown_text")  # why a box could not be used

logger = logging.getLogger(__name__)


@dataclass
class DecodedTile:
    """A decoded latent tile around one or more text boxes of one batch row."""

    row: int  # index into the latents given to decode_latent_regions
    image: torch.Tensor  # (3, h, w) decoded pixels in [-1, 1]
    boxes: torch.Tensor  # (N, 4, 2) the boxes' quads in tile pixels
    box_indices: list[int]  # which of the row's boxes these are
    latent_window: tuple[int, int, int, int]  # (y0, y1, x0, x1) in latent cells
    pixel_origin: tuple[int, int]  # (y, x) of the tile's top-left in image pixels


def _window_area(window: list[int]) -> int:
    return max(0, window[1] - window[0]) * max(0, window[3] - window[2])


def _mergeable_pair(windows: list[tuple[list[int], list[int]]]) -> tuple[int, int, list[int]] | None:
    """Two overlapping windows whose bounding window costs no more to decode than both apart."""
    for i in range(len(windows)):
        for j in range(i + 1, len(windows)):
            a, b = windows[i][0], windows[j][0]
            overlap = min(a[1], b[1]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[2], b[2])
            union = [min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), max(a[3], b[3])]
            if overlap and _window_area(union) <= _window_area(a) + _window_area(b):
                return i, j, union
    return None


def _merge_windows(windows: list[tuple[list[int], list[int]]]) -> list[tuple[list[int], list[int]]]:
    """Merge ``([y0, y1, x0, x1], box indices)`` windows while that saves decoding (neighbouring keys share a tile)."""
    while (pair := _mergeable_pair(windows)) is not None:
        i, j, union = pair
        windows[i] = (union, windows[i][1] + windows[j][1])
        del windows[j]
    return windows


def latent_windows(boxes: torch.Tensor, latent_hw: tuple[int, int], scale: int, margin: int) -> list[tuple[list[int], list[int]]]:
    """Latent-cell windows covering each box plus ``margin`` cells of context, overlapping ones merged."""
    height, width = latent_hw
    windows = []
    for k, quad in enumerate(boxes.detach().float().cpu()):
        x0, y0 = quad.min(dim=0).values.tolist()
        x1, y1 = quad.max(dim=0).values.tolist()
        window = [
            max(0, int(y0 // scale) - margin),
            min(height, int(-(-y1 // scale)) + margin),
            max(0, int(x0 // scale) - margin),
            min(width, int(-(-x1 // scale)) + margin),
        ]
        if window[1] > window[0] and window[3] > window[2]:
            windows.append((window, [k]))
    return _merge_windows(windows)


def decode_latent_regions(
    latent_space, latents_x0: torch.Tensor, boxes: list[torch.Tensor], margin: int = 4
) -> list[DecodedTile]:
    """Decode only the latent tiles around the text boxes (with gradients), so 1024 px training stays affordable.

    ``boxes[i]`` holds row i's quads ``(N, 4, 2)`` in image pixels; ``margin`` is the context around each box
    in latent cells. Returns the tiles with the boxes' coordinates relative to each tile. The decoder's
    GroupNorm and attention see only the tile, so a tile is close to (not equal to) that region of a full
    decode; the margin keeps the boxes away from the tile borders. ``latent_space`` is the backbone's
    (:class:`skingen.backbones.base.VaeLatents`).
    """
    scale = latent_space.scale_factor
    tiles = []
    for row, row_boxes in enumerate(boxes):
        if row_boxes is None or len(row_boxes) == 0:
            continue
        row_boxes = torch.as_tensor(row_boxes, dtype=torch.float32)
        for (y0, y1, x0, x1), indices in latent_windows(row_boxes, tuple(latents_x0.shape[-2:]), scale, margin):
            image = latent_space.decode(latents_x0[row : row + 1, :, y0:y1, x0:x1])[0]
            origin = row_boxes.new_tensor([x0 * scale, y0 * scale])
            tiles.append(
                DecodedTile(
                    row=row,
                    image=image,
                    boxes=(row_boxes[indices] - origin).to(image.device),
                    box_indices=indices,
                    latent_window=(y0, y1, x0, x1),
                    pixel_origin=(y0 * scale, x0 * scale),
                )
            )
    return tiles


def quad_size(quads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Widths and heights ``(N,)`` of quads ordered top-left, top-right, bottom-right, bottom-left."""
    top, bottom = quads[:, 1] - quads[:, 0], quads[:, 2] - quads[:, 3]
    left, right = quads[:, 3] - quads[:, 0], quads[:, 2] - quads[:, 1]
    width = (top.norm(dim=-1) + bottom.norm(dim=-1)) / 2
    height = (left.norm(dim=-1) + right.norm(dim=-1)) / 2
    return width, height


def crop_rotated_boxes(
    image: torch.Tensor, boxes: torch.Tensor, height: int = REC_HEIGHT, max_width: int = REC_MAX_WIDTH
) -> tuple[torch.Tensor, list[int]]:
    """Cut each 4-point box out of ``image`` (3, H, W) as a rotated rectangle, differentiably.

    Quads are in pixel coordinates, ordered top-left, top-right, bottom-right, bottom-left (reading
    direction along the top edge). Each crop is resampled to ``height`` rows keeping its aspect ratio
    (width capped at ``max_width``) and zero-padded on the right to ``max_width``. For images in [-1, 1]
    (VAE output) zero is mid-grey, which is the recognizer's own padding value.
    Returns ``(crops (N, 3, height, max_width), widths)``.
    """
    boxes = boxes.to(device=image.device, dtype=torch.float32)
    num_boxes = boxes.shape[0]
    if num_boxes == 0:
        return image.new_zeros(0, image.shape[0], height, max_width), []
    _, img_h, img_w = image.shape
    box_w, box_h = quad_size(boxes)
    widths = [
        max(1, min(max_width, round(height * float(w) / max(float(h), 1e-6)))) for w, h in zip(box_w, box_h)
    ]
    # Parallelogram axes (mean of opposite edges) and centre: an affine map from the output rectangle.
    axis_x = ((boxes[:, 1] - boxes[:, 0]) + (boxes[:, 2] - boxes[:, 3])) / 2
    axis_y = ((boxes[:, 3] - boxes[:, 0]) + (boxes[:, 2] - boxes[:, 1])) / 2
    centre = boxes.mean(dim=1)
    stretch = torch.tensor([max_width / w for w in widths], device=image.device).unsqueeze(1)
    # Output normalised (u, v) in [-1, 1]^2 -> source pixel centre + ((u+1)/2 * stretch - 1/2) * axis_x + v/2 * axis_y,
    # then to grid_sample's normalised coordinates (align_corners=False: x_n = 2 x / W - 1).
    offset = centre + (stretch - 1) / 2 * axis_x
    to_norm = torch.tensor([2.0 / img_w, 2.0 / img_h], device=image.device)
    theta = torch.stack(
        [stretch * axis_x / 2 * to_norm, axis_y / 2 * to_norm, offset * to_norm - 1], dim=2
    )  # (N, 2 [x/y rows], 3)
    grid = F.affine_grid(theta, [num_boxes, image.shape[0], height, max_width], align_corners=False)
    crops = F.grid_sample(
        image.unsqueeze(0).expand(num_boxes, -1, -1, -1), grid.to(image.dtype), mode="bilinear",
        padding_mode="zeros", align_corners=False,
    )
    keep = torch.arange(max_width, device=image.device)[None, :] < torch.tensor(widths, device=image.device)[:, None]
    return crops * keep[:, None, None, :].to(crops.dtype), widths


@dataclass
class _Crops:
    generated: list[torch.Tensor] = field(default_factory=list)
    reference: list[torch.Tensor] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)  # content width of each crop; the rest is padding

    def recognizer_width(self) -> int:
        """Pad to the widest crop of the batch (a multiple of 8, the recognizer's downsampling), not to 320 px:
        narrow key labels then cost a third of the recognizer's time, and readings match (checked in tests)."""
        return min(REC_MAX_WIDTH, -(-max(self.widths) // 8) * 8)


class TextLoss:
    """OCR text loss plugged into the shared training loop (``skingen.train.loop.train(args, extra_loss=...)``).

    ``loss_type``: ``ctc`` (recognizer CTC against the box texts, blank 0), ``perceptual`` (AnyText: MSE of
    the recognizer's neck features between generated and ground-truth crops), or ``both`` (their sum).
    Per row the loss is the mean over its boxes, times alpha_bar_t with ``timestep_weighting="alpha_bar"``;
    rows with t > ``max_timestep`` or without boxes count as zero; the batch loss is their mean times ``weight``
    (the trainer logs it as ``loss_text``). Logs: ``boxes_used``, ``unknown_chars`` (characters outside the
    recognizer's dictionary, dropped from the targets), ``boxes_skipped_outside`` / ``_too_small`` /
    ``_unknown_text`` (boxes that could not be used; running totals also go to a warning), and, when boxes were used, the unweighted per-box means
    ``text_ctc`` / ``text_perceptual``.

    Ground-truth crops for the perceptual loss come from ``batch["pixel_values"]`` when the batch has them,
    else from decoding the clean latents (the VAE's reconstruction: the best the generator can reach), so
    the trainer need not load training images next to its cached latents.
    """

    name = "text"
    needs_pixel_values = False

    def __init__(
        self,
        recognizer: PPOCRRecognizer | None = None,
        *,
        loss_type: str = "ctc",
        weight: float = 1.0,
        max_timestep: int | None = 200,
        timestep_weighting: str = "none",
        tile_margin: int = 4,
        max_boxes_per_row: int = 16,
    ) -> None:
        if loss_type not in TEXT_LOSS_TYPES:
            raise SkingenError(f"--text_loss_type {loss_type!r}: choose one of {', '.join(TEXT_LOSS_TYPES)}")
        if timestep_weighting not in TIMESTEP_WEIGHTINGS:
            raise SkingenError(
                f"--text_loss_timestep_weighting {timestep_weighting!r}: choose one of {', '.join(TIMESTEP_WEIGHTINGS)}"
            )
        if tile_margin < 0 or max_boxes_per_row < 1:
            raise SkingenError("--text_loss_tile_margin must be >= 0 and --text_loss_max_boxes >= 1")
        self.recognizer = recognizer if recognizer is not None else load_recognizer()
        self.loss_type = loss_type
        self.weight = weight
        self.max_timestep = max_timestep
        self.timestep_weighting = timestep_weighting
        self.tile_margin = tile_margin
        self.max_boxes_per_row = max_boxes_per_row
        self.skipped_boxes = dict.fromkeys(SKIP_REASONS, 0)  # running totals over the run, reported as warnings
        self._next_skip_report = 1

    # -- which boxes take part ------------------------------------------------------------------------

    def _usable_boxes(
        self, boxes, texts, image_hw: tuple[int, int], seed: int | None = None
    ) -> tuple[torch.Tensor, list[str], int, dict[str, int]]:
        """Boxes inside the image, big enough, with at least one known character; capped at ``max_boxes_per_row``.

        The subset is drawn from the sample's own seed, so it does not depend on the process count. Also returns
        how many boxes were left out for each of ``SKIP_REASONS`` (the first reason that applies counts).
        """
        skipped = dict.fromkeys(SKIP_REASONS, 0)
        if boxes is None or len(boxes) == 0:
            return torch.zeros(0, 4, 2), [], 0, skipped
        boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4, 2).cpu()
        if len(texts) != len(boxes):
            raise SkingenError(f"a training row has {len(boxes)} boxes but {len(texts)} texts; they must be aligned")
        width, height = quad_size(boxes)
        centre = boxes.mean(dim=1)
        inside = (centre[:, 0] >= 0) & (centre[:, 0] < image_hw[1]) & (centre[:, 1] >= 0) & (centre[:, 1] < image_hw[0])
        big_enough = (width >= MIN_BOX_SIDE) & (height >= MIN_BOX_SIDE)
        known = torch.ones_like(inside)
        if self.loss_type != "perceptual":  # CTC needs at least one character the recognizer knows
            known = encode_texts(texts, self.recognizer.charset)[1] > 0
        skipped["outside"] = int((~inside).sum())
        skipped["too_small"] = int((inside & ~big_enough).sum())
        skipped["unknown_text"] = int((inside & big_enough & ~known).sum())
        keep = inside & big_enough & known
        indices = keep.nonzero().flatten()
        if len(indices) > self.max_boxes_per_row:
            generator = torch.Generator().manual_seed(seed) if seed is not None else None
            order = torch.randperm(len(indices), generator=generator)
            indices = indices[order[: self.max_boxes_per_row]].sort().values
        chosen = [texts[i] for i in indices.tolist()]
        unknown = encode_texts(chosen, self.recognizer.charset)[2]
        return boxes[indices], chosen, unknown, skipped

    def _report_skipped(self, skipped: dict[str, int]) -> None:
        """A warning with the running counts of unusable boxes: at the first one, then each time the total doubles
        (a few lines per run, not one per step)."""
        for reason, count in skipped.items():
            self.skipped_boxes[reason] += count
        total = sum(self.skipped_boxes.values())
        if total and total >= self._next_skip_report:
            counts = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in self.skipped_boxes.items() if n)
            logger.warning(f"text loss: {total} boxes could not be used so far ({counts}; 'unknown text': no "
                           "character in the recognizer's dictionary, 'too small': a side under "
                           f"{MIN_BOX_SIDE:g} px, 'outside': centre outside the image); fix or drop those boxes")
            self._next_skip_report = 2 * total

    def row_weights(self, timesteps: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
        """Per row: 0 above ``max_timestep`` (DDPM steps, or sigma x 1000 for flow matching), times ``signal``
        (alpha_bar_t, or (1 - sigma)^2) with ``timestep_weighting="alpha_bar"``."""
        weights = torch.ones(len(timesteps), device=timesteps.device)
        if self.max_timestep is not None:
            weights = weights * (timesteps <= self.max_timestep).float()
        if self.timestep_weighting == "alpha_bar":
            weights = weights * signal.to(weights.device, torch.float32)
        return weights

    # -- the loss ---------------------------------------------------------------------------------------

    def __call__(self, *, batch, output, backbone, weight_dtype, step) -> tuple[torch.Tensor, dict]:
        """The trainer's ``ExtraLoss`` call: ``output`` is the step's ``skingen.backbones.base.DenoiserOutput``
        (its ``x0(rows)`` is the one-step clean estimate of any backbone), ``backbone`` its latent space."""
        model_pred, latents, timesteps = output.model_pred, output.latents, output.timesteps
        latent_space = backbone.latent_space
        device = model_pred.device
        self.recognizer.to(device)
        batch_size = model_pred.shape[0]
        scale = latent_space.scale_factor
        image_hw = (latents.shape[-2] * scale, latents.shape[-1] * scale)
        row_weight = self.row_weights(timesteps, output.signal)
        # Connected to the graph, so a step without text still gives every trained parameter a (zero) gradient.
        zero = model_pred.sum() * 0.0

        rows, row_boxes, row_texts, unknown = [], [], [], 0
        skipped = dict.fromkeys(SKIP_REASONS, 0)
        for i in range(batch_size):
            seeds = batch.get("sample_seeds")
            seed = int(seeds[i]) if seeds is not None else None
            boxes, texts, row_unknown, row_skipped = self._usable_boxes(
                batch["boxes"][i], batch["texts"][i], image_hw, seed
            )
            for reason, count in row_skipped.items():
                skipped[reason] += count
            if row_weight[i] > 0 and len(boxes) > 0:
                rows.append(i)
                row_boxes.append(boxes)
                row_texts.append(texts)
                unknown += row_unknown
        self._report_skipped(skipped)
        logs = {"boxes_used": sum(len(b) for b in row_boxes), "unknown_chars": unknown,
                **{f"boxes_skipped_{reason}": count for reason, count in skipped.items()}}
        if not rows:
            return zero, logs

        index = torch.tensor(rows, device=device)
        x0 = output.x0(index)
        crops = self._crops(latent_space, x0, latents[index], batch, rows, row_boxes, row_texts)
        per_crop, parts = self._per_crop_loss(crops)

        crop_rows = torch.tensor(crops.rows, device=device)
        per_row = torch.zeros(len(rows), device=device).index_add(0, crop_rows, per_crop)
        per_row = per_row / torch.bincount(crop_rows, minlength=len(rows)).clamp(min=1)
        loss = zero + self.weight * (per_row * row_weight[index]).sum() / batch_size
        logs.update(parts)
        return loss, logs

    def _crops(self, latent_space, x0, clean_latents, batch, rows, row_boxes, row_texts) -> _Crops:
        crops = _Crops()
        need_reference = self.loss_type in ("perceptual", "both")
        pixel_values = batch.get("pixel_values") if need_reference else None
        for tile in decode_latent_regions(latent_space, x0, row_boxes, margin=self.tile_margin):
            generated, widths = crop_rotated_boxes(tile.image, tile.boxes)
            crops.generated.append(generated)
            crops.widths.extend(widths)
            crops.texts.extend(row_texts[tile.row][k] for k in tile.box_indices)
            crops.rows.extend([tile.row] * len(tile.box_indices))
            if not need_reference:
                continue
            with torch.no_grad():
                if pixel_values is not None:
                    # Ground truth from the training image itself, with the boxes in full-image pixels.
                    reference_image = pixel_values[rows[tile.row]].to(tile.image.device, torch.float32)
                    reference_boxes = row_boxes[tile.row][tile.box_indices]
                else:
                    y0, y1, x0_, x1 = tile.latent_window
                    reference_image = latent_space.decode(clean_latents[tile.row : tile.row + 1, :, y0:y1, x0_:x1])[0]
                    reference_boxes = tile.boxes
                crops.reference.append(crop_rotated_boxes(reference_image, reference_boxes)[0])
        return crops

    def _per_crop_loss(self, crops: _Crops) -> tuple[torch.Tensor, dict]:
        width = crops.recognizer_width()
        recognizer_input = normalize_for_recognizer(torch.cat(crops.generated)[..., :width], value_range=(-1.0, 1.0))
        features = self.recognizer.features(recognizer_input)
        losses, parts = [], {}
        # CTC is logged in every mode (how readable the text is), and trained on with ctc/both.
        log_probs = F.log_softmax(self.recognizer.head(features).float(), dim=-1)
        targets, target_lengths, _ = encode_texts(crops.texts, self.recognizer.charset)
        input_lengths = torch.full((len(crops.texts),), log_probs.shape[1], dtype=torch.long)
        ctc = F.ctc_loss(
            log_probs.transpose(0, 1), targets.to(log_probs.device), input_lengths, target_lengths,
            blank=0, reduction="none", zero_infinity=True,
        ) / target_lengths.to(log_probs.device).clamp(min=1)
        if self.loss_type in ("ctc", "both"):
            losses.append(ctc)
        if (target_lengths > 0).any():  # perceptual keeps boxes without known characters; CTC cannot score them
            parts["text_ctc"] = ctc.detach()[target_lengths.to(ctc.device) > 0].mean().item()
        if self.loss_type in ("perceptual", "both"):
            with torch.no_grad():
                reference = self.recognizer.features(
                    normalize_for_recognizer(torch.cat(crops.reference)[..., :width], value_range=(-1.0, 1.0))
                )
            perceptual = (features.float() - reference.float()).pow(2).mean(dim=(1, 2))
            losses.append(perceptual)
            parts["text_perceptual"] = perceptual.detach().mean().item()
        return torch.stack(losses).sum(dim=0), parts
