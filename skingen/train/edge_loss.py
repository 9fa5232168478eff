"""Edge consistency loss (ControlNet++'s reward for edge controls): the edges of the model's one-step clean estimate,
decoded by the VAE, should lie where the control's edges are.

The diffusion loss teaches a ControlNet its control only through the noise it predicts; ControlNet++ (Li et al.,
2024) adds a loss on the condition extracted back from the generated image. For a Canny control that is an edge map:
here a soft one (Sobel gradient magnitude of the grey image through a sigmoid centred on Canny's high threshold),
scored against the control with a tolerance of ``tolerance`` pixels as ``evaluate.py``'s edge F1 is (an edge counts
as matched when the other map has one within the window), and the loss is ``1 - soft F1``. Rows with a noise level
above ``max_timestep`` count as zero. With ``crop_size`` each row decodes one window of that many pixels (at a
place drawn from the row's seed, with a latent cell of context around it that is decoded but not scored) instead of the
whole image, bounding the decoder's cost and memory at high resolution (at the demo's 128 px it saves 0.04 s of a
0.35 s step); any window of a Canny control has edges to learn from.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import SkingenError

# Sobel kernels on a [0, 255] grey image, as OpenCV's Canny (aperture 3) takes its gradient.
_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def soft_edges(images: torch.Tensor, threshold: float = 80.0, softness: float = 20.0) -> torch.Tensor:
    """(N, 3, H, W) images in [-1, 1] -> (N, 1, H, W) edge probabilities: sigmoid((|grad| - threshold) / softness)
    with the Sobel gradient of the grey image on OpenCV's 0..255 scale (Canny's high threshold is 80 in skingen)."""
    grey = (images.float().mean(dim=1, keepdim=True) + 1.0) * 127.5
    kernels = torch.stack([_SOBEL_X, _SOBEL_X.t()])[:, None].to(grey.device)
    gradient = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kernels)
    magnitude = torch.sqrt(gradient.pow(2).sum(dim=1, keepdim=True) + 1e-6)
    return torch.sigmoid((magnitude - threshold) / softness)


def control_edges(control: torch.Tensor, level: float = 0.2) -> torch.Tensor:
    """(N, C, H, W) control pixels in [0, 1] (edges white on black, possibly thinned by resizing) -> (N, 1, H, W) 0/1."""
    return (control.float().amax(dim=1, keepdim=True) > level).float()


def soft_edge_f1(predicted: torch.Tensor, target: torch.Tensor, tolerance: int = 1) -> torch.Tensor:
    """Per-sample soft F1 of two (N, 1, H, W) edge maps in [0, 1]; a pixel counts as matched when the other map has
    an edge within a (2 * tolerance + 1)^2 window (max pooling). Empty maps score 1 against each other."""
    window = 2 * tolerance + 1
    near_target = F.max_pool2d(target, window, stride=1, padding=tolerance)
    near_predicted = F.max_pool2d(predicted, window, stride=1, padding=tolerance)
    eps = 1e-6
    precision = ((predicted * near_target).sum(dim=(1, 2, 3)) + eps) / (predicted.sum(dim=(1, 2, 3)) + eps)
    recall = ((target * near_predicted).sum(dim=(1, 2, 3)) + eps) / (target.sum(dim=(1, 2, 3)) + eps)
    return 2 * precision * recall / (precision + recall)


def add_edge_loss_arguments(parser: argparse.ArgumentParser) -> None:
    """The edge-loss flags of every trainer (off unless ``--edge_loss_weight`` is given)."""
    edge = parser.add_argument_group("edge consistency loss (ControlNet++)")
    edge.add_argument("--edge_loss_weight", type=float, default=None,
                      help="Add weight x (1 - soft edge F1) between the decoded one-step x0 estimate and the control "
                           "(for edge controls: canny, reference); 0 logs it without training on it; unset: off.")
    edge.add_argument("--edge_loss_max_timestep", type=int, default=1000,
                      help="Apply it only where the noise level is at most this (of 1000: the DDPM step, or sigma x "
                           "1000 for flow matching). ControlNet++ uses 200 for its reward; 1000 also asks the blurry "
                           "estimates at high noise, where a sample's layout is decided, for the control's edges.")
    edge.add_argument("--edge_loss_tolerance", type=int, default=1,
                      help="Pixels (at training resolution) an edge may be off and still count as matched.")
    edge.add_argument("--edge_loss_crop_size", type=int, default=None,
                      help="Decode and score one window of this many pixels per row (a multiple of the VAE's 8) "
                           "instead of the whole image, to bound the decoder's cost at high resolution.")


def build_edge_loss(args: argparse.Namespace) -> EdgeLoss | None:
    """The edge loss the flags describe; None when ``--edge_loss_weight`` is unset (the other flags are checked even
    then, so a mistake in them is named before training)."""
    weight = getattr(args, "edge_loss_weight", None)
    loss = EdgeLoss(weight=0.0 if weight is None else weight,
                    max_timestep=getattr(args, "edge_loss_max_timestep", 1000),
                    tolerance=getattr(args, "edge_loss_tolerance", 1), crop_size=getattr(args, "edge_loss_crop_size", None))
    return None if weight is None else loss


@dataclass
class EdgeLoss:
    """``ExtraLoss`` for the shared training loop: ``weight`` x mean over the batch of (1 - soft edge F1) between
    the decoded one-step x0 estimate and the control (its first conditioning image), for rows with t <=
    ``max_timestep``. Logs ``edge_f1`` (the soft F1 of the rows scored)."""

    name: ClassVar[str] = "edge"
    needs_pixel_values: ClassVar[bool] = False

    weight: float = 0.1
    max_timestep: int = 1000
    tolerance: int = 1
    crop_size: int | None = None
    threshold: float = 80.0
    softness: float = 20.0

    def __post_init__(self) -> None:
        """The flags' checks (``validate_training_args`` builds the loss to run them before anything loads)."""
        if self.weight < 0:
            raise SkingenError(f"--edge_loss_weight must not be negative, got {self.weight}")
        if not 0 <= self.max_timestep <= 1000:
            raise SkingenError(f"--edge_loss_max_timestep is on the 0..1000 noise scale, got {self.max_timestep}")
        if self.tolerance < 0:
            raise SkingenError(f"--edge_loss_tolerance must not be negative, got {self.tolerance}")
        if self.crop_size is not None and (self.crop_size <= 0 or self.crop_size % 8):
            raise SkingenError(f"--edge_loss_crop_size must be a positive multiple of 8 (the VAE's cell), got "
                               f"{self.crop_size}")
        if self.softness <= 0:
            raise SkingenError(f"the edge loss's softness must be positive, got {self.softness}")

    def __call__(self, *, batch, output, backbone, weight_dtype, step) -> tuple[torch.Tensor, dict]:
        zero = output.model_pred.sum() * 0.0  # keeps every trained parameter in the graph on steps without rows
        rows = (output.timesteps <= self.max_timestep).nonzero().flatten()
        if len(rows) == 0:
            return zero, {}
        x0 = output.x0(rows)
        control = batch["conditioning_pixel_values"][rows.to(batch["conditioning_pixel_values"].device), :3].float()
        scale = backbone.vae_scale_factor
        control = F.interpolate(control, size=(x0.shape[-2] * scale, x0.shape[-1] * scale), mode="area")
        if self.crop_size is None:
            images, controls = backbone.decode_latents(x0), control
        else:
            seeds = batch.get("sample_seeds")
            windows = [self._window(x0.shape[-2:], scale, seeds[i] if seeds is not None else None) for i in rows.tolist()]
            images = self._decode_windows(backbone, x0, windows, scale)
            controls = torch.stack([control[k, :, y * scale:(y + cells) * scale, x * scale:(x + cells) * scale]
                                    for k, (y, x, cells) in enumerate(windows)])
        f1 = soft_edge_f1(soft_edges(images, self.threshold, self.softness), control_edges(controls).to(images.device),
                          self.tolerance)
        loss = zero + self.weight * (1.0 - f1).sum() / len(output.timesteps)
        return loss, {"edge_f1": f1.detach().mean().item()}

    def _window(self, latent_hw, scale: int, seed) -> tuple[int, int, int]:
        """(top, left, size) in latent cells of the window scored for one row, drawn from its seed."""
        cells = min(self.crop_size // scale, *latent_hw)
        generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        top = int(torch.randint(latent_hw[0] - cells + 1, (1,), generator=generator))
        left = int(torch.randint(latent_hw[1] - cells + 1, (1,), generator=generator))
        return top, left, cells

    @staticmethod
    def _decode_windows(backbone, latents: torch.Tensor, windows, scale: int) -> torch.Tensor:
        """Decode every row's window with one latent cell of context on each side (the latents padded by repeating
        their border cells, so windows at the edge have it too) in one batch, and return the windows' pixels: the
        decoder's borders are not what the full image would show there."""
        padded = F.pad(latents, (1, 1, 1, 1), mode="replicate")
        stacked = torch.stack([padded[k, :, top:top + cells + 2, left:left + cells + 2]
                               for k, (top, left, cells) in enumerate(windows)])
        decoded = backbone.decode_latents(stacked)
        return decoded[..., scale:-scale, scale:-scale]
