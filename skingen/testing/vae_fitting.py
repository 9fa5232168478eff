"""Fitting a tiny VAE from scratch on skins or layouts: the recipe behind ``assets/tiny_skin_vae``, for the VAE class
of each family whose tiny builder takes a fitted VAE (``vae=``).

A tiny SDXL's VAE fitted for a minute inside the demo (``skingen.testing.tiny_sdxl.fit_tiny_vae``) decodes blurred,
textured atlases, and at 128 px that blur hides most of a skin's own edges from the Canny F1. Real SDXL starts
from a VAE trained once, long, and kept; this is that step for the tiny model: a wider VAE (16-32-32-32),
minibatches of many images, a one-cycle rate and an image-gradient term for sharp edges. It runs for minutes to tens
of minutes on CPU, saves a checkpoint as it goes (a second run resumes) and writes a diffusers VAE folder plus
``recipe.json``.

The VAE class and its latent normalisation follow the family (``VaeRecipe.backbone``), measured on the images so
the latents the denoiser sees have zero mean and unit spread, as the real VAEs' constants were chosen:

- ``sdxl``: ``AutoencoderKL`` with quant convs; ``scaling_factor`` (SDXL's VAE).
- ``zimage``: ``AutoencoderKL`` without quant convs; ``shift_factor`` and ``scaling_factor`` (FLUX.1's VAE, which
  Z-Image uses: its pipelines compute ``(z - shift_factor) * scaling_factor``).
- ``qwenimage``: ``AutoencoderKLQwenImage`` (a causal video VAE fed one frame, ``(B, C, 1, H, W)``) with per-channel
  ``latents_mean`` / ``latents_std``. Its widths are ``base_dim * dim_mult``: ``block_out_channels`` (16, 32, 32, 32)
  becomes ``base_dim`` 16, ``dim_mult`` [1, 2, 2, 2]; ``layers_per_block`` is ``num_res_blocks``. It needs a rate
  about 50x lower than ``AutoencoderKL`` (1e-4, not 5e-3) and a narrower starting posterior (log-variance -12):
  its blocks normalise each pixel's features (RMS norm), its random encoder's means differ little between images
  (spread 0.026 against ``AutoencoderKL``'s 0.11), and from scratch at 1e-3 Adam drives the encoder to one latent
  for every image within ten steps (spread 0.001; the L1 stays at the mean-colour image's). On 8 layouts at 32 px
  and 1e-4 it reached L1 0.032 in 400 steps (``AutoencoderKL`` 0.037 in 300 at 1e-3); on the bench's 512 layouts at
  64 px, 1000 steps reached L1 0.44 (round-trip edge F1 0.09-0.12) and 3000 steps 0.415 (0.18-0.32): it learns, slowly.

Latent channels: 4 for every family by default, though the real Z-Image (FLUX) and Qwen-Image VAEs have 16. The
count is a config choice of a tiny pipeline (the builders give the transformer ``in_channels`` = channels, or
``4 * z_dim`` packed for Qwen-Image), and 4 is what a tiny denoiser could learn to generate: with 16 the VAE
reconstructs better, but the demo's tiny SDXL UNet never learned to generate such latents, and the tiny transformers
(width 32, 2x2 patches) would take 64-value tokens, twice their width. With 4, the layouts' edges survive a round trip
(edge F1 about 0.9 at 64 px; colours much less), and the tiny Z-Image and Qwen-Image bases pre-trained on them draw
shapes that a ControlNet moves (``bench/new_backbones_evidence.py`` records both). 16 channels were not tried on
these two families. Everything else is the real classes and loading path: the builders load the folder with
``from_pretrained`` and the families' pipelines use it unchanged.
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

CHECKPOINT_NAME = "fit_checkpoint.pt"
RECIPE_FILE = "recipe.json"
# The families whose tiny builder takes a fitted VAE folder, and the diffusers class each one's VAE is.
VAE_CLASSES = {"sdxl": "AutoencoderKL", "zimage": "AutoencoderKL", "qwenimage": "AutoencoderKLQwenImage"}
BACKBONES = tuple(VAE_CLASSES)


@dataclass(frozen=True)
class VaeRecipe:
    backbone: str = "sdxl"  # whose VAE class and latent normalisation (module docstring)
    block_out_channels: tuple[int, ...] = (16, 32, 32, 32)  # four blocks: downsamples by 8, as the real VAEs
    latent_channels: int = 4
    layers_per_block: int = 1
    norm_num_groups: int = 4  # AutoencoderKL's group norm; AutoencoderKLQwenImage normalises with RMS norm
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
        if self.backbone not in VAE_CLASSES:
            raise SkingenError(f"--backbone {self.backbone!r}: no fitted-VAE recipe; choose one of {', '.join(BACKBONES)}")
        if len(self.block_out_channels) != 4:
            raise SkingenError(f"--block_out_channels needs 4 widths (a VAE that downsamples by 8), got {list(self.block_out_channels)}")
        if any(width < 1 or width % self.norm_num_groups for width in self.block_out_channels):
            raise SkingenError(f"--block_out_channels must be positive multiples of --norm_num_groups "
                               f"({self.norm_num_groups}), got {list(self.block_out_channels)}")
        if self.backbone == "qwenimage" and any(width % self.block_out_channels[0] for width in self.block_out_channels):
            raise SkingenError(f"--block_out_channels {list(self.block_out_channels)}: Qwen-Image's VAE has widths "
                               "base_dim * dim_mult, so every width must be a multiple of the first")
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
    """A randomly initialised VAE of the recipe's family and shape (the seed fixes the weights), its posterior's
    log-variance starting at ``recipe.initial_logvar``."""
    import diffusers

    torch.manual_seed(recipe.seed)
    channels, widths = recipe.latent_channels, tuple(recipe.block_out_channels)
    if recipe.backbone == "qwenimage":
        vae = diffusers.AutoencoderKLQwenImage(
            base_dim=widths[0], z_dim=channels, dim_mult=[width // widths[0] for width in widths],
            num_res_blocks=recipe.layers_per_block, temperal_downsample=[False, True, True],
            latents_mean=[0.0] * channels, latents_std=[1.0] * channels)
        moments = vae.quant_conv
    else:
        quant_convs = recipe.backbone == "sdxl"  # FLUX's VAE (Z-Image's) has none
        vae = diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(widths),
            up_block_types=("UpDecoderBlock2D",) * len(widths), block_out_channels=widths,
            layers_per_block=recipe.layers_per_block, norm_num_groups=recipe.norm_num_groups,
            latent_channels=channels, sample_size=recipe.resolution, use_quant_conv=quant_convs,
            use_post_quant_conv=quant_convs, shift_factor=None if quant_convs else 0.0)
        moments = vae.quant_conv if quant_convs else vae.encoder.conv_out
    with torch.no_grad():  # the last conv before the posterior: its second half of outputs is the log-variance
        moments.bias[channels:] += recipe.initial_logvar
    return vae


# ---------------------------------------------------------------------------------------------------------------
# One interface over image and single-frame video VAEs


def is_video_vae(vae) -> bool:
    return type(vae).__name__ == "AutoencoderKLQwenImage"


def posterior(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation ``(N, C, h, w)`` of the posterior of ``pixels`` ``(N, 3, H, W)`` in [-1, 1]."""
    if is_video_vae(vae):
        dist = vae.encode(pixels.unsqueeze(2)).latent_dist
        return dist.mean.squeeze(2), dist.std.squeeze(2)
    dist = vae.encode(pixels).latent_dist
    return dist.mean, dist.std


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Raw (unnormalised) latents ``(N, C, h, w)`` decoded to ``(N, 3, H, W)``."""
    if is_video_vae(vae):
        return vae.decode(latents.unsqueeze(2)).sample.squeeze(2)
    return vae.decode(latents).sample


def vae_round_trip(vae, pixels: torch.Tensor) -> torch.Tensor:
    """``pixels`` encoded (posterior mean) and decoded by ``vae``, without gradients."""
    with torch.no_grad():
        return decode(vae, posterior(vae, pixels)[0])


def reconstruction_l1(vae, pixels: torch.Tensor) -> float:
    """Mean absolute error in [-1, 1] of ``pixels`` encoded (posterior mean) and decoded by ``vae``."""
    return (vae_round_trip(vae, pixels) - pixels).abs().mean().item()


def vae_reconstruction_loss(
    vae, pixels: torch.Tensor, generator: torch.Generator, kl_weight: float = 1e-6, gradient_weight: float = 0.0
) -> torch.Tensor:
    """L1 + L2 reconstruction through a sampled latent (as training encodes), ``kl_weight`` times the KL term and
    ``gradient_weight`` times the L1 error of the image's horizontal and vertical differences (sharper edges:
    the pixel losses alone average an uncertain edge into a blur, which Canny then misses)."""
    mean, std = posterior(vae, pixels)
    decoded = decode(vae, mean + std * torch.randn(mean.shape, generator=generator))
    error = decoded - pixels
    variance = std.pow(2)
    kl = 0.5 * (mean.pow(2) + variance - 1.0 - variance.clamp_min(1e-12).log()).sum(dim=(1, 2, 3))
    loss = error.abs().mean() + error.pow(2).mean() + kl_weight * kl.mean()
    if gradient_weight:
        for dim in (-1, -2):
            loss = loss + gradient_weight * (decoded.diff(dim=dim) - pixels.diff(dim=dim)).abs().mean()
    return loss


def set_latent_normalisation(vae, pixels: torch.Tensor) -> dict:
    """Set the family's normalisation so the normalised latents of ``pixels`` (posterior means) have zero mean and
    unit standard deviation: ``scaling_factor`` alone (SDXL, how SD/SDXL chose theirs), ``shift_factor`` and
    ``scaling_factor`` (FLUX-style, as SD3's and FLUX's), or per-channel ``latents_mean`` / ``latents_std``
    (Qwen-Image). Returns what it set."""
    with torch.no_grad():
        latents = posterior(vae, pixels)[0]
    if is_video_vae(vae):
        per_channel = latents.transpose(0, 1).flatten(1)
        values = {"latents_mean": per_channel.mean(dim=1).tolist(),
                  "latents_std": per_channel.std(dim=1).clamp_min(1e-6).tolist()}
    elif vae.config.shift_factor is None:
        values = {"scaling_factor": 1.0 / max(latents.std().item(), 1e-6)}
    else:
        values = {"shift_factor": latents.mean().item(), "scaling_factor": 1.0 / max(latents.std().item(), 1e-6)}
    vae.register_to_config(**values)
    return values


def load_fitted_vae(vae_dir: str | os.PathLike, backbone: str):
    """A VAE folder for ``backbone``'s tiny builder: the family's class, downsampling by 8 (as the real VAEs and
    the ControlNets' control embeddings), with the normalisation the family's pipelines read."""
    import diffusers

    vae_dir, expected = Path(vae_dir), VAE_CLASSES[backbone]
    hint = f"fit one with `python scripts/fit_tiny_vae.py --backbone {backbone}`"
    try:
        config = json.loads((vae_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise SkingenError(f"{vae_dir / 'config.json'}: not readable ({error}); give a diffusers VAE folder ({hint})") from None
    if config.get("_class_name") != expected:
        raise SkingenError(f"{vae_dir}: {config.get('_class_name')} folder, but the {backbone} pipeline's VAE is "
                           f"{expected}; {hint}")
    if backbone == "zimage" and config.get("shift_factor") is None:
        raise SkingenError(f"{vae_dir}: no shift_factor (an SDXL-style VAE); Z-Image's pipelines shift the latents "
                           f"as FLUX's VAE does; {hint}")
    try:
        vae = getattr(diffusers, expected).from_pretrained(vae_dir, torch_dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise SkingenError(f"{vae_dir}: not a loadable {expected} ({error}); {hint}") from None
    factor = 2 ** len(vae.config.temperal_downsample if is_video_vae(vae) else vae.config.block_out_channels[1:])
    if factor != 8:
        raise SkingenError(f"{vae_dir}: this VAE downsamples by {factor}; the tiny {backbone} pipeline needs one that "
                           "downsamples by 8 (four block_out_channels)")
    return vae


def dataset_pixels(dataset_dirs: Sequence[str | os.PathLike], resolution: int, column: str = "image"
                   ) -> list[tuple[dict, torch.Tensor]]:
    """Every train row of each dataset folder with its ``column`` image as (3, R, R) in [-1, 1] (resized and
    centre-cropped). ``conditioning_image`` too: Z-Image's and Qwen-Image's ControlNets take the control through
    the VAE, so its fit should see controls."""
    from ..data.dataset import read_rows
    from ..data.images import open_rgb
    from ..train.batches import training_pixels

    loaded = []
    for dataset_dir in dataset_dirs:
        folder = Path(dataset_dir)
        for index, row in enumerate(read_rows(folder), start=1):
            where = f"{folder / 'train.jsonl'}:{index}"
            path = row.get(column)
            if not isinstance(path, str):
                raise SkingenError(f'{where}: "{column}" must be a path relative to {folder}, got {path!r}')
            loaded.append((row, training_pixels(open_rgb(folder / path, where), resolution)[0]))
    return loaded


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
    total = max(recipe.steps, 2)
    # 5% warm-up; OneCycleLR divides by zero when that is exactly one step (20 steps in all): two steps then.
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.learning_rate, total_steps=total, pct_start=0.1 if total == 20 else 0.05
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
    normalisation = set_latent_normalisation(vae, sample)
    record = {
        "recipe": asdict(recipe),
        "images": len(pixels),
        "initial_l1": state.initial_l1,  # mean absolute error in [-1, 1] on up to 64 of the images
        "final_l1": reconstruction_l1(vae, sample),
        "seconds": round(state.seconds, 1),
        "latent_normalisation": normalisation,
    }
    with AtomicDirectory(out_dir) as tmp_dir:
        vae.save_pretrained(tmp_dir, safe_serialization=True)
        (Path(tmp_dir) / RECIPE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    checkpoint.unlink(missing_ok=True)
    if checkpoint.parent.is_dir() and not any(checkpoint.parent.iterdir()):
        checkpoint.parent.rmdir()
    return record
