"""Pre-train a tiny SDXL base on skins, so a ControlNet can be trained on top of a base that draws skin-like images.

Real SDXL has seen millions of images before a ControlNet is trained on it; a random tiny SDXL has seen
nothing, its VAE decodes noise and its UNet predicts noise at random. This module builds the tiny pipeline
(``build_tiny_sdxl``, around a VAE fitted beforehand when one is given, as real SDXL keeps its VAE), fits
its VAE to the skins (``fit_tiny_vae``) and trains its UNet with the plain
text-to-image diffusion loss (epsilon prediction, SDXL's size conditioning, a share of empty prompts so
classifier-free guidance works), all with the real diffusers classes, then saves the pipeline and an
untrained ControlNet initialised from the trained UNet (``<out>/controlnet``: the starting point of
ControlNet training, and the "untrained" arm of a comparison).

The result is cached: ``<out>/pretrain.json`` records a key made of the settings and the bytes of every
training image and caption; a run with the same key reuses the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..data.dataset import read_rows
from ..data.images import open_rgb
from ..errors import SkingenError
from ..fileio import AtomicDirectory, atomic_write_json

CACHE_FILE = "pretrain.json"
# Bump when the procedure changes in a way that changes the weights, so old caches are not reused.
PROCEDURE_VERSION = 2


@dataclass(frozen=True)
class PretrainSettings:
    preset: str = "tiny"
    pretrained_vae: str | None = None  # an AutoencoderKL folder to start from (assets/tiny_skin_vae); None: a random one
    resolution: int = 128
    vae_fit_steps: int = 400
    vae_learning_rate: float = 5e-3
    vae_fit_images: int = 8  # the fit is full-batch: its cost grows with every image, its quality hardly
    max_train_steps: int = 800
    train_batch_size: int = 8
    learning_rate: float = 1e-3
    lr_scheduler: str = "cosine"  # diffusers' get_scheduler name (the demo base: edge F1 0.568 vs 0.554 constant, one seed)
    proportion_empty_prompts: float = 0.1
    seed: int = 0


@dataclass
class TrainingImage:
    pixels: torch.Tensor  # (3, R, R) in [-1, 1]
    caption: str


def load_training_images(dataset_dirs: Sequence[str | os.PathLike], resolution: int) -> list[TrainingImage]:
    """Every row of each dataset folder's train split, resized and centre-cropped to ``resolution``."""
    from ..train.batches import training_pixels

    images = []
    for dataset_dir in dataset_dirs:
        folder = Path(dataset_dir)
        for index, row in enumerate(read_rows(folder), start=1):
            where = f"{folder / 'train.jsonl'}:{index}"
            image = row.get("image")
            if not isinstance(image, str):
                raise SkingenError(f'{where}: "image" must be a path relative to {folder}, got {image!r}')
            pixels = training_pixels(open_rgb(folder / image, where), resolution)[0]
            images.append(TrainingImage(pixels, str(row.get("text") or "")))
    if not images:
        raise SkingenError(f"no training rows in {', '.join(map(str, dataset_dirs))}; pre-training needs images")
    return images


def spread_subset(items: Sequence, count: int) -> list:
    """``count`` items spread evenly over ``items`` (all of them when there are fewer)."""
    if count >= len(items):
        return list(items)
    return [items[round(i * (len(items) - 1) / max(count - 1, 1))] for i in range(count)]


def cache_key(settings: PretrainSettings, dataset_dirs: Sequence[str | os.PathLike]) -> str:
    """A hash of the settings, the procedure version and every training image's bytes and caption."""
    digest = hashlib.sha256(json.dumps({**asdict(settings), "version": PROCEDURE_VERSION}, sort_keys=True).encode())
    if settings.pretrained_vae is not None:
        for path in sorted(Path(settings.pretrained_vae).glob("*")):
            if path.is_file():
                digest.update(path.name.encode() + path.read_bytes())
    for dataset_dir in dataset_dirs:
        folder = Path(dataset_dir)
        for row in read_rows(folder):
            digest.update(str(row.get("text") or "").encode())
            image = folder / str(row.get("image"))
            digest.update(image.read_bytes() if image.is_file() else b"missing")
    return digest.hexdigest()


def cached_result(out_dir: str | os.PathLike, key: str) -> dict | None:
    """The record of a finished pre-training in ``out_dir`` made with ``key``, else None."""
    record_path = Path(out_dir) / CACHE_FILE
    if not record_path.is_file() or not (Path(out_dir) / "model_index.json").is_file():
        return None
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return record if record.get("key") == key else None


def train_unet(pipeline_dir: Path, images: Sequence[TrainingImage], settings: PretrainSettings) -> dict[str, float]:
    """Train the pipeline's UNet on ``images`` with the text-to-image diffusion loss; saved back in place."""
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from ..backbones.sdxl import compute_time_ids, encode_prompt, load_sdxl_components

    parts = load_sdxl_components(pipeline_dir)
    generator = torch.Generator().manual_seed(settings.seed)
    with torch.no_grad():
        posterior = parts.vae.encode(torch.stack([image.pixels for image in images])).latent_dist
        latent_mean, latent_std = posterior.mean, posterior.std
        captions = sorted({image.caption for image in images} | {""})
        embeds, pooled = encode_prompt(captions, parts.tokenizers, parts.text_encoders)
    caption_index = torch.tensor([captions.index(image.caption) for image in images])
    empty_index = captions.index("")
    size = (settings.resolution, settings.resolution)
    time_ids = compute_time_ids(size, (0, 0), size)[None]
    scaling = parts.vae.config.scaling_factor
    unet, scheduler = parts.unet, parts.noise_scheduler
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=settings.learning_rate, weight_decay=1e-2)
    lr_schedule = get_scheduler(settings.lr_scheduler, optimizer, num_warmup_steps=0, num_training_steps=settings.max_train_steps)
    losses = []
    for _ in tqdm(range(settings.max_train_steps), desc="pre-training the tiny UNet", leave=False):
        batch = torch.randint(len(images), (settings.train_batch_size,), generator=generator)
        latents = latent_mean[batch] + latent_std[batch] * torch.randn(latent_mean[batch].shape, generator=generator)
        latents = latents * scaling
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(scheduler.config.num_train_timesteps, (len(batch),), generator=generator)
        prompts = caption_index[batch].clone()
        prompts[torch.rand(len(batch), generator=generator) < settings.proportion_empty_prompts] = empty_index
        prediction = unet(
            scheduler.add_noise(latents, noise, timesteps),
            timesteps,
            encoder_hidden_states=embeds[prompts],
            added_cond_kwargs={"text_embeds": pooled[prompts], "time_ids": time_ids.repeat(len(batch), 1)},
        ).sample
        loss = torch.nn.functional.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        losses.append(loss.item())
    unet.eval()
    unet.save_pretrained(pipeline_dir / "unet", safe_serialization=True)
    tenth = max(1, len(losses) // 10)
    return {"first_loss": sum(losses[:tenth]) / tenth, "last_loss": sum(losses[-tenth:]) / tenth}


def save_untrained_controlnet(pipeline_dir: Path) -> Path:
    """``<pipeline>/controlnet``: a ControlNet initialised from the trained UNet, as ControlNet training starts."""
    from diffusers import UNet2DConditionModel

    from ..backbones.sdxl import load_or_init_controlnet

    unet = UNet2DConditionModel.from_pretrained(pipeline_dir / "unet")
    controlnet = load_or_init_controlnet(unet)
    controlnet.save_pretrained(pipeline_dir / "controlnet", safe_serialization=True)
    return pipeline_dir / "controlnet"


def pretrain_tiny_base(
    out_dir: str | os.PathLike, dataset_dirs: Sequence[str | os.PathLike], settings: PretrainSettings
) -> dict:
    """Build, fit and train the tiny base into ``out_dir`` (replaced atomically), or reuse a cached one.

    Returns the record written to ``<out_dir>/pretrain.json`` with ``reused`` set when nothing was trained.
    """
    from .tiny_sdxl import build_tiny_sdxl, fit_tiny_vae

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / CACHE_FILE).is_file():
        raise SkingenError(f"{out_dir}: exists and was not written by this script; choose a new or empty --output_dir")
    key = cache_key(settings, dataset_dirs)
    if (record := cached_result(out_dir, key)) is not None:
        return {**record, "reused": True}
    images = load_training_images(dataset_dirs, settings.resolution)
    started = time.perf_counter()
    with AtomicDirectory(out_dir) as tmp_dir:
        build_tiny_sdxl(tmp_dir / "pipeline", preset=settings.preset, seed=settings.seed, vae=settings.pretrained_vae)
        pipeline_dir = tmp_dir / "pipeline"
        vae_fit = None
        if settings.vae_fit_steps > 0:
            vae_fit = fit_tiny_vae(pipeline_dir, spread_subset([image.pixels for image in images], settings.vae_fit_images),
                                   steps=settings.vae_fit_steps, seed=settings.seed,
                                   learning_rate=settings.vae_learning_rate)
        unet_fit = train_unet(pipeline_dir, images, settings)
        save_untrained_controlnet(pipeline_dir)
        for item in pipeline_dir.iterdir():
            os.replace(item, tmp_dir / item.name)
        pipeline_dir.rmdir()
        record = {
            "key": key,
            "settings": asdict(settings),
            "datasets": [str(d) for d in dataset_dirs],
            "images": len(images),
            "vae_fit": vae_fit,
            "unet_fit": unet_fit,
            "seconds": round(time.perf_counter() - started, 1),
        }
        atomic_write_json(tmp_dir / CACHE_FILE, record)
    return {**record, "reused": False}
