"""Fitting a tiny VAE from scratch on skins: the recipe behind ``assets/tiny_skin_vae``.

A tiny SDXL's VAE fitted for a minute inside the demo (``skingen.testing.tiny_sdxl.fit_tiny_vae``) decodes blurred,
textured atlases, and at 128 px that blur hides most of a skin's own edges from the Canny F1. Real SDXL starts
from a VAE trained once, long, and kept; this is that step for the tiny model: a wider VAE (16-32-32-32; four
latent channels as SDXL's: with 16, as SD3 and FLUX use, it reconstructs better but the demo's tiny UNet could not
learn to generate the latents), minibatches of many skins, a one-cycle rate and an image-gradient term for sharp
edges. It runs for minutes to tens of minutes on CPU, saves a checkpoint as it goes (a second run resumes) and
writes a diffusers ``AutoencoderKL`` folder plus ``recipe.json``.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import SkingenError
from ..fileio import AtomicDirectory, atomic_write_bytes
from .tiny_sdxl import reconstruction_l1, set_unit_latent_scale, vae_reconstruction_loss

CHECKPOINT_NAME = "fit_checkpoint.pt"
RECIPE_FILE = "recipe.json"


@dataclass(frozen=True)
class VaeRecipe:
    block_out_channels: tuple[int, ...] = (16, 32, 32, 32)  # four blocks: downsamples by 8, as SDXL's VAE
    latent_channels: int = 4
    layers_per_block: int = 1
    norm_num_groups: int = 4
    resolution: int = 128
    steps: int = 2000
    batch_size: int = 8
    learning_rate: float = 5e-3  # peak of the one-cycle schedule (5% warm-up, cosine down)
    gradient_loss_weight: float = 1.0
    kl_weight: float = 1e-6
    # Log-variance the posterior starts from: narrow, so every latent channel carries signal from the first step.
    # From diffusers' init (0: unit variance, as the prior) a tiny VAE left 2 of 4 channels as noise for good.
    initial_logvar: float = -6.0
    seed: int = 0

    def check(self) -> None:
        if len(self.block_out_channels) != 4:
            raise SkingenError(f"--block_out_channels needs 4 widths (a VAE that downsamples by 8), got {list(self.block_out_channels)}")
        if any(width < 1 or width % self.norm_num_groups for width in self.block_out_channels):
            raise SkingenError(f"--block_out_channels must be positive multiples of --norm_num_groups "
                               f"({self.norm_num_groups}), got {list(self.block_out_channels)}")
        for name in ("latent_channels", "layers_per_block", "steps", "batch_size", "norm_num_groups"):
            if getattr(self, name) < 1:
                raise SkingenError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.resolution < 8 or self.resolution % 8:
            raise SkingenError(f"--resolution must be a positive multiple of 8, got {self.resolution}")
        if not self.learning_rate > 0:
            raise SkingenError(f"--learning_rate must be > 0, got {self.learning_rate}")
        if self.gradient_loss_weight < 0 or self.kl_weight < 0:
            raise SkingenError("--gradient_loss_weight and --kl_weight must be >= 0")


def build_vae(recipe: VaeRecipe):
    """A randomly initialised ``AutoencoderKL`` of the recipe's shape (the seed fixes the weights), its posterior's
    log-variance starting at ``recipe.initial_logvar``."""
    from diffusers import AutoencoderKL

    torch.manual_seed(recipe.seed)
    blocks = len(recipe.block_out_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=tuple(recipe.block_out_channels),
        layers_per_block=recipe.layers_per_block,
        norm_num_groups=recipe.norm_num_groups,
        latent_channels=recipe.latent_channels,
        sample_size=recipe.resolution,
    )
    with torch.no_grad():  # quant_conv's second half of outputs is the log-variance
        vae.quant_conv.bias[recipe.latent_channels:] += recipe.initial_logvar
    return vae


@dataclass
class FitState:
    """What a checkpoint holds: the step reached and everything that continues from it."""

    vae: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    step: int = 0
    seconds: float = 0.0  # fitting time of every run so far
    initial_l1: float | None = None

    def save(self, path: Path, recipe: VaeRecipe) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save({"recipe": asdict(recipe), "step": self.step, "seconds": self.seconds, "initial_l1": self.initial_l1,
                    "vae": self.vae.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "schedule": self.schedule.state_dict(), "generator": self.generator.get_state()}, buffer)
        atomic_write_bytes(path, buffer.getvalue())

    def load(self, path: Path, recipe: VaeRecipe) -> None:
        try:
            saved = torch.load(path, map_location="cpu", weights_only=False)
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
            raise SkingenError(f"{path}: unreadable checkpoint ({error}); delete it to start the fit again") from None
        if not isinstance(saved, dict) or "vae" not in saved:
            raise SkingenError(f"{path}: not a checkpoint of scripts/fit_tiny_vae.py; delete it to start the fit again")
        if saved.get("recipe") != asdict(recipe):
            raise SkingenError(f"{path}: checkpoint of another recipe; delete it or use the recipe it was made with")
        self.vae.load_state_dict(saved["vae"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.schedule.load_state_dict(saved["schedule"])
        self.generator.set_state(saved["generator"])
        self.step = int(saved["step"])
        self.seconds = float(saved.get("seconds", 0.0))
        self.initial_l1 = saved.get("initial_l1")


def fit_vae_from_scratch(
    out_dir: str | os.PathLike,
    images: Sequence[torch.Tensor],
    recipe: VaeRecipe,
    checkpoint_dir: str | os.PathLike,
    checkpointing_steps: int = 250,
) -> dict:
    """Fit a new VAE of ``recipe`` on ``images`` ((3, R, R) tensors in [-1, 1]) and write it to ``out_dir``
    (replaced atomically) with ``recipe.json``. Checkpoints go to ``checkpoint_dir`` every ``checkpointing_steps``
    and a run that finds one there resumes from it; it is removed once the VAE is written.
    Returns the record written to ``recipe.json``."""
    from tqdm.auto import tqdm

    recipe.check()
    if len(images) == 0:
        raise SkingenError("fitting a VAE needs at least one training image")
    pixels = torch.stack([image.float() for image in images])
    sample = pixels[:64]  # what the L1 and the latent scale are measured on
    vae = build_vae(recipe)
    optimizer = torch.optim.Adam(vae.parameters(), lr=recipe.learning_rate)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.learning_rate, total_steps=max(recipe.steps, 2), pct_start=0.05
    )
    state = FitState(vae, optimizer, schedule, torch.Generator().manual_seed(recipe.seed))
    checkpoint = Path(checkpoint_dir) / CHECKPOINT_NAME
    if checkpoint.is_file():
        state.load(checkpoint, recipe)
    if state.step == 0:
        state.initial_l1 = reconstruction_l1(vae, sample)
    started, seconds_before = time.perf_counter(), state.seconds
    vae.train()
    progress = tqdm(range(state.step, recipe.steps), initial=state.step, total=recipe.steps, desc="fitting the VAE")
    for step in progress:
        batch = pixels[torch.randint(len(pixels), (recipe.batch_size,), generator=state.generator)]
        loss = vae_reconstruction_loss(vae, batch, state.generator, kl_weight=recipe.kl_weight,
                                       gradient_weight=recipe.gradient_loss_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        state.step = step + 1
        state.seconds = seconds_before + time.perf_counter() - started
        progress.set_postfix(loss=f"{loss.item():.4f}")
        if state.step % checkpointing_steps == 0 and state.step < recipe.steps:
            state.save(checkpoint, recipe)
    vae.eval()
    set_unit_latent_scale(vae, sample)
    record = {
        "recipe": asdict(recipe),
        "images": len(pixels),
        "initial_l1": state.initial_l1,  # mean absolute error in [-1, 1] on up to 64 of the images
        "final_l1": reconstruction_l1(vae, sample),
        "seconds": round(state.seconds, 1),
        "scaling_factor": float(vae.config.scaling_factor),
    }
    with AtomicDirectory(out_dir) as tmp_dir:
        vae.save_pretrained(tmp_dir, safe_serialization=True)
        (Path(tmp_dir) / RECIPE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    checkpoint.unlink(missing_ok=True)
    if checkpoint.parent.is_dir() and not any(checkpoint.parent.iterdir()):
        checkpoint.parent.rmdir()
    return record
