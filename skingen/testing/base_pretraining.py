"""Pre-train a tiny base model on skins, so a ControlNet can be trained on top of a base that draws skin-like images.

Real SDXL (or Z-Image, Qwen-Image) has seen millions of images before a ControlNet is trained on it; a random tiny
pipeline has seen nothing, its VAE decodes noise and its denoiser predicts noise at random. This module builds the
tiny pipeline of a family (its builder in ``skingen.testing``, around a VAE fitted beforehand when one is given, as
real bases keep their VAE), fits an SDXL VAE to the skins (``fit_tiny_vae``) when asked, and trains the denoiser
with the one training loop in its denoiser mode (``skingen.train.denoiser_training``: the family's text-to-image
diffusion loss, a share of empty prompts so classifier-free guidance works), all with the real diffusers classes.
The trained UNet/transformer replaces the pipeline's own, and an untrained ControlNet initialised from it is saved
in ``<out>/controlnet`` (the starting point of ControlNet training, and the "untrained" arm of a comparison).

The result is cached: ``<out>/pretrain.json`` records a key made of the settings and the bytes of every
training image and caption; a run with the same key reuses the folder.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..backbones import backbone_class
from ..data.dataset import read_rows
from ..errors import SkingenError
from ..fileio import AtomicDirectory, atomic_write_json

CACHE_FILE = "pretrain.json"
# Bump when the procedure changes in a way that changes the weights, so old caches are not reused.
PROCEDURE_VERSION = 3  # 3: the denoiser is trained by the one training loop (was a loop of its own)


@dataclass(frozen=True)
class PretrainSettings:
    backbone: str = "sdxl"  # a family of skingen.backbones.registry with a tiny builder: sdxl, zimage, qwenimage, ...
    preset: str = "tiny"  # SDXL's tiny presets (skingen.testing.tiny_sdxl.PRESETS); the other families have "tiny"
    pretrained_vae: str | None = None  # a fitted VAE folder of the family (assets/tiny_skin_vae); None: a random one
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
    from .vae_fitting import dataset_pixels

    images = [TrainingImage(pixels, str(row.get("text") or "")) for row, pixels in dataset_pixels(dataset_dirs, resolution)]
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


def build_base(pipeline_dir: Path, settings: PretrainSettings) -> Path:
    """The family's random tiny pipeline in ``pipeline_dir``, around ``settings.pretrained_vae`` when given (passed
    to a builder that takes a ``vae``; else copied over the ``vae`` folder the builder wrote)."""
    family = backbone_class(settings.backbone)
    module = "tiny_models" if settings.backbone in ("sdxl", "sd3", "flux") else f"tiny_{settings.backbone}"
    builder = getattr(importlib.import_module(f"{__package__}.{module}"), family.tiny_builder)
    kwargs = {"seed": settings.seed}
    if settings.backbone == "sdxl":
        kwargs["preset"] = settings.preset
    elif settings.preset != "tiny":
        raise SkingenError(f"--preset {settings.preset}: the {settings.backbone} pipeline has only the 'tiny' preset")
    takes_vae = "vae" in inspect.signature(builder).parameters
    if settings.pretrained_vae is not None and takes_vae:
        kwargs["vae"] = settings.pretrained_vae
    builder(pipeline_dir, **kwargs)
    if settings.pretrained_vae is not None and not takes_vae:
        with AtomicDirectory(pipeline_dir / "vae") as vae_dir:
            for path in Path(settings.pretrained_vae).iterdir():
                if path.is_file():
                    shutil.copy2(path, vae_dir / path.name)
    return pipeline_dir


def denoiser_training_args(pipeline_dir: Path, dataset_dir: str | os.PathLike, run_dir: Path,
                           settings: PretrainSettings):
    """The settings as the flags of the loop's denoiser mode (``train_text_to_image.py``)."""
    from ..train.denoiser_training import parse_denoiser_args

    return parse_denoiser_args([
        "--backbone", settings.backbone, "--pretrained_model_name_or_path", str(pipeline_dir),
        "--train_data_dir", str(dataset_dir), "--output_dir", str(run_dir), "--resolution", str(settings.resolution),
        "--train_batch_size", str(settings.train_batch_size), "--max_train_steps", str(settings.max_train_steps),
        "--learning_rate", str(settings.learning_rate), "--lr_scheduler", settings.lr_scheduler,
        "--lr_warmup_steps", "0", "--proportion_empty_prompts", str(settings.proportion_empty_prompts),
        "--seed", str(settings.seed), "--mixed_precision", "no", "--report_to", "none",
        # No checkpoints: the run lives in the temporary folder of the whole pre-training.
        "--checkpointing_steps", str(settings.max_train_steps + 1),
    ])


def train_denoiser(pipeline_dir: Path, dataset_dir: str | os.PathLike, settings: PretrainSettings) -> dict[str, float]:
    """Train the pipeline's denoiser on the dataset's rows with the one training loop; the trained one replaces the
    pipeline's (``unet/`` or ``transformer/``). Returns the mean diffusion loss of the first and last tenth."""
    from ..train.denoiser_training import trained_subfolder
    from ..train.loop import train

    run_dir = pipeline_dir.parent / "denoiser-training"
    args = denoiser_training_args(pipeline_dir, dataset_dir, run_dir, settings)
    losses: list[float] = []
    train(args, on_step=lambda step, logs: losses.append(logs["loss_diffusion"]))
    subfolder = trained_subfolder(args)
    shutil.rmtree(pipeline_dir / subfolder)
    os.replace(run_dir / subfolder, pipeline_dir / subfolder)
    shutil.rmtree(run_dir)
    tenth = max(1, len(losses) // 10)
    return {"first_loss": sum(losses[:tenth]) / tenth, "last_loss": sum(losses[-tenth:]) / tenth}


def save_untrained_controlnet(pipeline_dir: Path, settings: PretrainSettings) -> Path:
    """``<pipeline>/controlnet``: a new ControlNet initialised from the trained denoiser, as ControlNet training
    starts (the family's own initialisation, seeded)."""
    from ..train.args import build_arg_parser

    args = build_arg_parser(backbone=settings.backbone).parse_args(
        ["--pretrained_model_name_or_path", str(pipeline_dir), "--train_data_dir", "unused"])
    backbone = backbone_class(settings.backbone)(args)
    torch.manual_seed(settings.seed)
    backbone.new_controlnet().save_pretrained(pipeline_dir / "controlnet", safe_serialization=True)
    return pipeline_dir / "controlnet"


def pretrain_tiny_base(out_dir: str | os.PathLike, dataset_dir: str | os.PathLike, settings: PretrainSettings) -> dict:
    """Build, fit and train the tiny base into ``out_dir`` (replaced atomically), or reuse a cached one.

    Returns the record written to ``<out_dir>/pretrain.json`` with ``reused`` set when nothing was trained.
    """
    from .tiny_sdxl import fit_tiny_vae

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / CACHE_FILE).is_file():
        raise SkingenError(f"{out_dir}: exists and was not written by this script; choose a new or empty --output_dir")
    if settings.vae_fit_steps > 0 and settings.backbone != "sdxl":
        raise SkingenError(f"--vae_fit_steps {settings.vae_fit_steps}: the VAE fit here is SDXL's; give the "
                           f"{settings.backbone} base a fitted VAE (--pretrained_vae_model_name_or_path) and "
                           "--vae_fit_steps 0")
    key = cache_key(settings, [dataset_dir])
    if (record := cached_result(out_dir, key)) is not None:
        return {**record, "reused": True}
    started = time.perf_counter()
    with AtomicDirectory(out_dir) as tmp_dir:
        pipeline_dir = build_base(tmp_dir / "pipeline", settings)
        vae_fit = None
        if settings.vae_fit_steps > 0:
            images = load_training_images([dataset_dir], settings.resolution)
            vae_fit = fit_tiny_vae(pipeline_dir, spread_subset([image.pixels for image in images], settings.vae_fit_images),
                                   steps=settings.vae_fit_steps, seed=settings.seed,
                                   learning_rate=settings.vae_learning_rate)
        denoiser_fit = train_denoiser(pipeline_dir, dataset_dir, settings)
        save_untrained_controlnet(pipeline_dir, settings)
        for item in pipeline_dir.iterdir():
            os.replace(item, tmp_dir / item.name)
        pipeline_dir.rmdir()
        record = {
            "key": key,
            "settings": asdict(settings),
            "datasets": [str(dataset_dir)],
            "images": len(read_rows(Path(dataset_dir))),
            "vae_fit": vae_fit,
            "denoiser_fit": denoiser_fit,
            "seconds": round(time.perf_counter() - started, 1),
        }
        atomic_write_json(tmp_dir / CACHE_FILE, record)
    return {**record, "reused": False}
