"""Losses added to the diffusion loss, all built one way: :func:`build_extra_losses` from the flags (the OCR text
loss of ``--text_loss_weight``, the edge consistency loss of ``--edge_loss_weight``). A new loss is one more line
there and its flags in :func:`skingen.train.args.build_arg_parser`.
"""

from __future__ import annotations

import argparse
from typing import Protocol

import torch

from ..backbones.base import Backbone, DenoiserOutput
from .edge_loss import build_edge_loss
from .text_loss_options import build_text_loss


class ExtraLoss(Protocol):
    """An extra loss added to the diffusion loss (the OCR text loss, the edge loss; a run may have several).

    ``__call__`` gets the batch, the step's :class:`~skingen.backbones.base.DenoiserOutput` (prediction, target,
    clean latents, noise level, ``x0(rows)``: the one-step clean estimate for any backbone, ``signal``: alpha_bar
    or its flow-matching equivalent) and the backbone (``backbone.latent_space``: decoding, scale factor; ``backbone.vae``). It returns ``(loss, logs)``: a scalar tensor that is added as is (apply your
    own weight; make it a per-sample mean so multi-process training averages it correctly) and a dict of floats to
    log. Set ``needs_pixel_values = True`` to get ``batch["pixel_values"]`` even when latents are cached.
    """

    name: str

    def __call__(self, *, batch: dict, output: DenoiserOutput, backbone: Backbone, weight_dtype: torch.dtype,
                 step: int) -> tuple[torch.Tensor, dict[str, float]]: ...


def build_extra_losses(args: argparse.Namespace) -> list[ExtraLoss]:
    """The extra losses the flags turn on, in the order they are added: text loss, edge loss."""
    return [loss for loss in (build_text_loss(args), build_edge_loss(args)) if loss is not None]
