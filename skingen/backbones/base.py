"""What every backbone family shares: the :class:`Backbone` interface the trainer calls, the denoiser output
the losses read, loading helpers and the ControlNet compatibility check.

A backbone owns the frozen parts of a base pipeline (tokenizers, text encoders, VAE, the UNet or transformer,
the noise scheduler) and everything family-specific about a training step: what the text cache stores, how
the noise level is drawn, how the noisy input is built, what the ControlNet and the denoiser are called with,
the target, the one-step x0 estimate and the pipeline class that generates with the result.
"""

from __future__ import annotations

import abc
import argparse
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..errors import SkingenError
from ..train.loss_weighting import LossOptions

# ---------------------------------------------------------------------------------------------------------------
# What a training step produces


@dataclass
class DenoiserOutput:
    """One forward pass of ControlNet + frozen denoiser, in unpacked latent space ``(B, C, h, w)``.

    ``latents`` are the clean, scaled (and shifted) latents, ``noisy_latents`` the denoiser's input, ``timesteps``
    the noise level on the scheduler's 0..num_train_timesteps scale (DDPM steps, or sigma x 1000 for flow
    matching), ``weighting`` an optional per-sample loss weight broadcastable to the prediction.
    ``x0`` gives the one-step estimate of the clean latents (with gradients), ``signal`` the fraction of the
    clean signal's variance in the input per sample (alpha_bar for DDPM, (1 - sigma)^2 for flow matching).
    """

    model_pred: torch.Tensor
    target: torch.Tensor
    latents: torch.Tensor
    noisy_latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    estimate_x0: Callable[[torch.Tensor | None], torch.Tensor]
    signal: torch.Tensor
    weighting: torch.Tensor | None = None

    def x0(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The one-step x0 estimate (fp32) of all rows, or of ``rows`` (an index tensor)."""
        return self.estimate_x0(rows)

    def diffusion_loss(self) -> torch.Tensor:
        """Mean squared error between prediction and target, weighted per sample when the scheme says so."""
        if self.weighting is None:
            return F.mse_loss(self.model_pred.float(), self.target.float(), reduction="mean")
        error = self.weighting.float() * (self.model_pred.float() - self.target.float()) ** 2
        return error.reshape(error.shape[0], -1).mean(dim=1).mean()


# ---------------------------------------------------------------------------------------------------------------
# Pixels <-> latents


def posterior_mean_std(parameters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation (fp32) of a VAE's diagonal Gaussian from its parameters ``(B, 2C, ...)`` (mean,
    log-variance), as diffusers' ``DiagonalGaussianDistribution`` reads them."""
    mean, logvar = parameters.float().chunk(2, dim=1)
    return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))


class VaeLatents:
    """A family's pixel <-> latent conversion around its VAE: encoding, the latent normalisation
    ``(latent - shift_factor) * scaling_factor``, decoding, channels and downsampling. A family whose VAE normalises
    otherwise (e.g. per channel) subclasses it and names the subclass in ``Backbone.latent_space_class``."""

    def __init__(self, vae):
        self.vae = vae

    @property
    def scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def channels(self) -> int:
        return self.vae.config.latent_channels

    @torch.no_grad()
    def encode_parameters(self, pixels: torch.Tensor) -> torch.Tensor:
        """The latent distribution's parameters (mean and log-variance on channels) of pixels in [-1, 1]."""
        return self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist.parameters

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.vae.config
        shift = getattr(config, "shift_factor", None) or 0.0
        return (latents - shift) * config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (fp32) from normalised latents; gradients flow when enabled."""
        config = self.vae.config
        latents = latents.float() / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
        return self.vae.decode(latents.to(self.vae.dtype)).sample.float()


# ---------------------------------------------------------------------------------------------------------------
# The interface


class Backbone(abc.ABC):
    """A base-model family. Subclasses set the class attributes and implement its abstract methods."""

    family: ClassVar[str]  # "sdxl", "sd3", "flux"
    title: ClassVar[str]  # what users call it, for messages
    pipeline_class_name: ClassVar[str]  # the diffusers ControlNet pipeline that generates with the result
    base_pipeline_classes: ClassVar[tuple[str, ...]]  # model_index.json _class_name values of this family
    controlnet_class_name: ClassVar[str]
    denoiser_subfolder: ClassVar[str]  # "unet" or "transformer"
    text_subfolders: ClassVar[tuple[str, ...]]  # tokenizers + text encoders, for the cache fingerprint
    default_tracker_project_name: ClassVar[str]
    encodes_conditioning: ClassVar[bool] = False  # the ControlNet sees the conditioning image through the VAE
    latent_space_class: ClassVar[type[VaeLatents]] = VaeLatents
    # The family's diffusers classes (every table of family facts is derived from these: skingen.backbones.pipelines,
    # the ControlNet check, scripts/make_tiny_pipeline.py).
    denoiser_class_name: ClassVar[str]  # "UNet2DConditionModel", "SD3Transformer2DModel", ...
    multi_controlnet_class_name: ClassVar[str]
    vae_class_name: ClassVar[str] = "AutoencoderKL"
    text_encoder_classes: ClassVar[tuple[tuple[str, str], ...]]  # (subfolder, "transformers.Class") per text encoder
    tiny_builder: ClassVar[str]  # the builder in skingen.testing.tiny_models of a random-weight pipeline
    # Inference: the pipeline call and its defaults.
    schedulers: ClassVar[dict[str, str]]  # sampler name -> diffusers scheduler class
    default_scheduler: ClassVar[str]
    default_guidance_scale: ClassVar[float] = 5.0
    guidance_argument: ClassVar[str] = "guidance_scale"  # the pipeline-call keyword of the guidance scale
    control_image_argument: ClassVar[str] = "control_image"  # the pipeline-call keyword of the control image(s)
    # The pipeline-call keywords of the ControlNet's guidance window (every family so far takes both).
    control_guidance_arguments: ClassVar[tuple[str, ...]] = ("control_guidance_start", "control_guidance_end")
    size_multiple: ClassVar[int] = 8  # output sides: VAE downsampling x patch or packing size
    cuda_dtype: ClassVar[str] = "bf16"  # default dtype on CUDA
    negative_prompt: ClassVar[bool] = True  # whether a negative prompt is used (FLUX.1-dev is guidance-distilled)
    needs_negative_embeds: ClassVar[bool] = False  # given prompt embeddings, the pipeline needs negative ones too
    tags: ClassVar[tuple[str, ...]] = ()  # model-card tags
    license: ClassVar[str] = "other"  # model-card licence of ControlNets trained on the base model
    pipeline_kwargs: ClassVar[dict[str, Any]] = {}  # extra from_pretrained arguments of the pipeline at inference
    ddp_find_unused_parameters: ClassVar[bool] = False  # the ControlNet has parameters a step leaves unused
    default_negative_prompt: ClassVar[str | None] = None  # sent at inference when none is given (Qwen-Image's CFG)
    denoiser_quantized: bool = False  # the frozen denoiser was loaded quantized (--base_quantization): never cast it

    # Set by load(): frozen models, in loading order.
    tokenizers: list
    text_encoders: list
    vae: Any
    denoiser: Any
    noise_scheduler: Any

    # -- flags (optional hooks: a family without flags of its own inherits these no-ops) ----------------------

    @classmethod  # noqa: B027
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add the family's own flags (diffusers' names for that family's trainer)."""

    @classmethod  # noqa: B027
    def validate_arguments(cls, args: argparse.Namespace) -> None:
        """Check the family's flags before anything loads; raise ``SkingenError``."""

    @classmethod  # noqa: B027
    def normalize_arguments(cls, args: argparse.Namespace) -> None:
        """Map the family trainer's diffusers-only flag forms onto skingen's (e.g. FLUX's --jsonl_for_train)."""

    # -- loading --------------------------------------------------------------------------------------------

    def __init__(self, args: argparse.Namespace, frozen_dtype: torch.dtype = torch.float32):
        """Load the frozen parts; text encoders (and the flow-matching transformers, whose hub weights are bf16
        anyway) load straight in ``frozen_dtype``, so N processes never hold fp32 copies of FLUX's 12 B weights."""
        self.args = args
        self.frozen_dtype = frozen_dtype
        self.source = resolve_model_source(args.pretrained_model_name_or_path, self)
        self.common = {"revision": args.revision, "cache_dir": None if args.cache_dir is None else str(args.cache_dir)}
        self.loss_options = LossOptions.from_args(args)
        self.load()
        self.vae = self._load_vae()

    @abc.abstractmethod
    def load(self) -> None:
        """Load tokenizers, text encoders, denoiser and noise scheduler (not the VAE)."""

    def part(self, what: str, loader, subfolder: str | None = None, **kwargs):
        """One component of the base pipeline (``subfolder`` of it); load errors name the part and the folder."""
        return load_part(what, self.source, loader, layout_help=self.layout_help(),
                         **({"subfolder": subfolder} if subfolder else {}), **self.common, **kwargs)

    @property
    def text_encoder_kwargs(self) -> dict:
        """transformers' ``from_pretrained`` arguments of a frozen text encoder."""
        return {"variant": self.args.variant, "dtype": self.frozen_dtype}

    def _load_vae(self):
        import diffusers

        vae_class = getattr(diffusers, self.vae_class_name)
        separate = self.args.pretrained_vae_model_name_or_path
        if separate is None:
            return self.part("VAE", vae_class.from_pretrained, "vae", variant=self.args.variant)
        # A separate VAE (e.g. madebyollin/sdxl-vae-fp16-fix) is a model folder of its own, as in diffusers.
        source = str(separate)
        if not Path(source).expanduser().exists() and looks_like_local_path(source):
            raise SkingenError(f"--pretrained_vae_model_name_or_path {source}: folder not found; expected a diffusers "
                               f"{self.vae_class_name} folder with config.json and diffusion_pytorch_model.safetensors")
        return load_part("VAE", str(Path(source).expanduser()) if Path(source).expanduser().exists() else source,
                         vae_class.from_pretrained, layout_help=f"expected a diffusers {self.vae_class_name} folder",
                         **self.common)

    @classmethod
    def layout_help(cls) -> str:
        return (f"expected a diffusers {cls.title} pipeline folder holding model_index.json and the subfolders "
                + ", ".join(f"{name}/" for name in cls.required_subfolders())
                + f"; build a tiny one offline with `python scripts/make_tiny_pipeline.py --backbone {cls.family} "
                  "--out DIR`")

    @classmethod
    def model_parts(cls) -> list[tuple[str, str]]:
        """``(subfolder, "library.Class")`` of each model in a pipeline folder of this family, ControlNet last."""
        return [(cls.denoiser_subfolder, f"diffusers.{cls.denoiser_class_name}"), ("vae", f"diffusers.{cls.vae_class_name}"),
                *cls.text_encoder_classes, ("controlnet", f"diffusers.{cls.controlnet_class_name}")]

    @classmethod
    def required_subfolders(cls) -> tuple[str, ...]:
        return (*cls.text_subfolders, "vae", cls.denoiser_subfolder, "scheduler")

    def frozen_models(self) -> list:
        return [model for model in (*self.text_encoders, self.vae, self.denoiser) if model is not None]

    def drop_text_encoders(self) -> None:
        """Free the text encoders once every caption is cached."""
        self.text_encoders = [None] * len(self.text_encoders)

    # -- sizes ----------------------------------------------------------------------------------------------

    @property
    def latent_space(self) -> VaeLatents:
        """Pixels <-> latents through this family's VAE (every module that encodes or decodes goes through it)."""
        return self.latent_space_class(self.vae)

    @property
    def vae_scale_factor(self) -> int:
        return self.latent_space.scale_factor

    @property
    def latent_channels(self) -> int:
        return self.latent_space.channels

    @abc.abstractmethod
    def resolution_multiple(self) -> tuple[int, str]:
        """The multiple a training resolution must be, and why."""

    @property
    def num_train_timesteps(self) -> int:
        return self.noise_scheduler.config.num_train_timesteps

    # -- text -----------------------------------------------------------------------------------------------

    def text_settings(self) -> dict[str, Any]:
        """Settings besides the models that change the cached embeddings (e.g. the T5 sequence length)."""
        return {}

    @torch.no_grad()
    @abc.abstractmethod
    def encode_prompts(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """What the text cache stores for each caption: tensors with the caption as first dimension."""

    @abc.abstractmethod
    def token_limits(self) -> list[tuple[Any, int]]:
        """``(tokenizer, max_length)`` per text encoder, to count captions that get truncated."""

    def count_truncated(self, captions: Sequence[str]) -> dict[str, int]:
        """How many of ``captions`` are longer than each text encoder's limit (they are cut there)."""
        counts = {}
        for index, (tokenizer, limit) in enumerate(self.token_limits()):
            name = f"{type(tokenizer).__name__.replace('Fast', '')} ({limit} tokens)"
            encoded = tokenizer(list(captions), truncation=False, verbose=False)["input_ids"] if captions else []
            lengths = [len(ids) for ids in encoded]
            counts[name if name not in counts else f"{name} #{index + 1}"] = sum(length > limit for length in lengths)
        return counts

    # -- per sample -----------------------------------------------------------------------------------------

    def sample_conditioning(self, original_size: tuple[int, int], crop_top_left: tuple[int, int],
                            target_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Per-sample conditioning besides text (SDXL's time ids); none by default."""
        return {}

    @abc.abstractmethod
    def draw_timestep(self, generator: torch.Generator) -> torch.Tensor:
        """The training noise level of one sample, drawn from its own generator (exact resume, N processes = 1)."""

    def fixed_timestep(self, timestep: int) -> torch.Tensor:
        """The noise level ``--validation_loss_timesteps`` value ``timestep`` stands for."""
        return torch.tensor(timestep)

    # -- the step -------------------------------------------------------------------------------------------

    def clean_latents(self, batch: dict, weight_dtype: torch.dtype) -> torch.Tensor:
        """Normalised latents ``(latent - shift_factor) * scaling_factor``: a sample of the VAE's distribution
        (cached, or encoded now) drawn with the batch's own noise."""
        if "latent_dist" in batch:
            parameters = batch["latent_dist"]
        else:
            parameters = self.latent_space.encode_parameters(batch["pixel_values"])
        mean, std = posterior_mean_std(parameters)
        latents = mean + std * batch["latent_noise"].float()
        return self.normalize_latents(latents).to(weight_dtype)

    def normalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.latent_space.normalize(latents)

    @abc.abstractmethod
    def forward(self, batch: dict, controlnet, weight_dtype: torch.dtype, denoiser=None) -> DenoiserOutput:
        """ControlNet + frozen denoiser on the batch: prediction, target and what the losses need. With
        ``controlnet=None`` the denoiser alone (training the denoiser itself; the control is not read); ``denoiser``:
        the module to call instead of ``self.denoiser`` (accelerate's wrapper of it when it is the trained one)."""

    # -- the ControlNet -------------------------------------------------------------------------------------

    @abc.abstractmethod
    def new_controlnet(self):
        """A ControlNet initialised from the denoiser's weights."""

    def create_controlnet(self, controlnet_model_name_or_path: str | os.PathLike | None):
        """The ControlNet to train: loaded (after the compatibility check) or initialised from the denoiser."""
        if controlnet_model_name_or_path is None:
            return self.new_controlnet()
        source = self.check_controlnet(controlnet_model_name_or_path)
        import diffusers

        controlnet_class = getattr(diffusers, self.controlnet_class_name)
        return load_part("ControlNet", source, controlnet_class.from_pretrained,
                         layout_help=self.controlnet_help(), cache_dir=self.common["cache_dir"])

    def enable_gradient_checkpointing(self, controlnet) -> None:
        """``--gradient_checkpointing`` on the ControlNet (None: none is trained) and the denoiser."""
        if controlnet is not None:
            controlnet.enable_gradient_checkpointing()
        self.denoiser.enable_gradient_checkpointing()

    @classmethod
    def controlnet_help(cls) -> str:
        return (f"expected a diffusers {cls.controlnet_class_name} folder with config.json and "
                "diffusion_pytorch_model.safetensors (e.g. the output of training, or <tiny pipeline>/controlnet)")

    def check_controlnet(self, controlnet_model_name_or_path: str | os.PathLike, flag: str = "--controlnet_model_name_or_path"
                         ) -> str:
        """Check a ControlNet folder against this base model before anything else loads or is cached."""
        return check_controlnet_source(type(self), controlnet_model_name_or_path, self.denoiser.config,
                                       source_of_base=self.source, flag=flag, cache_dir=self.common["cache_dir"])

    @classmethod
    def controlnet_mismatches(cls, controlnet_config: dict, denoiser_config) -> list[str]:
        """Config values of a ControlNet that do not fit the denoiser (``name: controlnet vs base``)."""
        return []

    # -- generating -----------------------------------------------------------------------------------------

    @abc.abstractmethod
    def validation_pipeline(self, controlnet, scheduler=None):
        """The family's ControlNet pipeline around the loaded parts, without text encoders (prompts come from
        the text cache)."""

    def save_denoiser_lora(self, output_dir) -> Path:
        """Save the denoiser's LoRA (``--unet_lora_rank``) in the family's diffusers format."""
        raise NotImplementedError(f"{self.title}: no denoiser LoRA")

    def prompt_kwargs(self, entry: dict[str, torch.Tensor], device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Pipeline keyword arguments for one cached caption (batch of 1)."""
        return {key: value[None].to(device, dtype) for key, value in entry.items()}

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (fp32) from normalised latents."""
        return self.latent_space.decode(latents)


# ---------------------------------------------------------------------------------------------------------------
# Loading helpers


def looks_like_local_path(name: str) -> bool:
    """Anything that is not shaped like a hub id (``name`` or ``owner/name``) is meant as a local folder."""
    return re.fullmatch(r"[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?", name) is None


def load_part(what: str, source: str, loader, *, layout_help: str, **kwargs):
    """Call ``loader(source, **kwargs)``; turn load failures into a SkingenError naming the part and the source."""
    try:
        return loader(source, **kwargs)
    except (OSError, ValueError, TypeError, json.JSONDecodeError) as err:
        sub = kwargs.get("subfolder")
        where = f"{source}/{sub}" if sub else source
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise SkingenError(
            f"{where}: could not load the {what} ({type(err).__name__}: {first_line}); {layout_help}. "
            "Without internet, pass a local folder (the model hub is used only for hub ids)."
        ) from None


def resolve_model_source(name_or_path, backbone: Backbone | type[Backbone]) -> str:
    """A local folder (checked for the family's layout, every missing piece reported at once) or a hub id."""
    source = str(name_or_path)
    folder = Path(source).expanduser()
    if folder.exists():
        missing = [name + "/" for name in backbone.required_subfolders() if not (folder / name).is_dir()]
        if missing:
            raise SkingenError(f"{folder}: not a {backbone.title} pipeline folder (missing {', '.join(missing)}); "
                               f"{backbone.layout_help()}")
        return str(folder)
    if looks_like_local_path(source):
        raise SkingenError(f"--pretrained_model_name_or_path {source}: folder not found; {backbone.layout_help()}")
    return source


def read_model_config(source: str, *, cache_dir: str | None = None) -> dict[str, Any]:
    """``config.json`` of a model folder or hub id, without loading weights."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        path = folder / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in {folder}")
        return json.loads(path.read_text(encoding="utf-8"))
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(source, "config.json", cache_dir=cache_dir)).read_text(encoding="utf-8"))


def denoiser_class_names() -> tuple[str, ...]:
    """The denoiser classes of every registered family (a folder holding one is a base model's part)."""
    from .registry import FAMILIES, backbone_class

    return tuple(backbone_class(name).denoiser_class_name for name in FAMILIES)


def check_controlnet_source(backbone: type[Backbone], name_or_path, denoiser_config, *, source_of_base: str,
                            flag: str = "--controlnet_model_name_or_path", cache_dir: str | None = None) -> str:
    """The ControlNet architecture check (training and inference): the folder must hold a ControlNet of the base
    model's family whose sizes fit the base model's denoiser. Returns the resolved source."""
    source = str(name_or_path)
    folder = Path(source).expanduser()
    if folder.exists():
        source = str(folder)
    elif looks_like_local_path(source):
        raise SkingenError(f"{flag} {source}: folder not found; {backbone.controlnet_help()}")
    if folder.is_dir() and not (folder / "config.json").is_file():
        inside = (folder / backbone.denoiser_subfolder / "config.json").is_file() or (folder / "model_index.json").is_file()
        hint = (" (this is a whole pipeline folder; a ControlNet folder holds config.json itself)" if inside else "")
        raise SkingenError(f"{flag} {folder}: no config.json there{hint}; {backbone.controlnet_help()}")
    try:
        config = read_model_config(source, cache_dir=cache_dir)
    except (OSError, ValueError) as err:
        raise SkingenError(f"{flag} {source}: could not read its config.json ({type(err).__name__}: {err}); "
                           f"{backbone.controlnet_help()}") from None
    class_name = config.get("_class_name")
    if class_name in denoiser_class_names():
        raise SkingenError(f"{flag} {source}: this folder holds a {class_name} (a base model's denoiser), not a "
                           f"ControlNet; give a {backbone.controlnet_class_name} folder, or drop the flag to initialise "
                           f"the ControlNet from {source_of_base}")
    if class_name != backbone.controlnet_class_name:
        raise SkingenError(f"{flag} {source}: a {class_name or 'model without _class_name'}, but the base model "
                           f"{source_of_base} is {backbone.title}, which needs a {backbone.controlnet_class_name}; the "
                           "ControlNet was made for another architecture")
    mismatches = backbone.controlnet_mismatches(config, denoiser_config)
    if mismatches:
        raise SkingenError(f"{flag} {source}: does not fit the base model {source_of_base} ({'; '.join(mismatches)}); "
                           "the ControlNet was made for another base model")
    return source


def config_mismatches(controlnet_config: dict, denoiser_config, pairs: Sequence[tuple[str, str]]) -> list[str]:
    """``name: controlnet X vs base Y`` for each ``(controlnet key, denoiser key)`` whose values differ."""
    found = []
    for controlnet_key, denoiser_key in pairs:
        theirs = controlnet_config.get(controlnet_key)
        ours = getattr(denoiser_config, denoiser_key, None) if not isinstance(denoiser_config, dict) \
            else denoiser_config.get(denoiser_key)
        if isinstance(theirs, list):
            theirs = tuple(theirs)
        if isinstance(ours, list):
            ours = tuple(ours)
        if theirs is not None and ours is not None and theirs != ours:
            found.append(f"{controlnet_key}: ControlNet {theirs} vs base {ours}")
    return found
