"""Z-Image: a Qwen3 text encoder, a single-stream DiT (30 layers at width 3840) on FLUX's 16-channel VAE,
rectified-flow training; ControlNets are VACE-style (``ZImageControlNetModel``).

Conventions read from diffusers' ``ZImagePipeline`` / ``ZImageControlNetPipeline`` (0.42.1), which the trainer
follows so the ControlNet learns under the conditions it meets at inference:

- prompts: the tokenizer's chat template (``enable_thinking=True``), padded to ``--max_sequence_length``, Qwen3's
  ``hidden_states[-2]`` kept only where the attention mask is 1 (a variable-length list per batch). The cache
  stores them zero-padded with their mask; encoding calls the pipeline's own ``encode_prompt``.
- the transformer and the ControlNet take latents as a list of ``(C, 1, H, W)``, the timestep as ``1 - sigma``,
  and predict ``x0 - noise``: the velocity is the negated output.
- control latents: the VAE's mode, ``(z - shift_factor) * scaling_factor``, zero-padded to ``control_in_dim``.
- a ``ZImageControlNetModel`` holds only its control blocks; it borrows the transformer's embedders, RoPE and
  refiners (``from_transformer`` in diffusers attaches them as submodules). Here they are attached as plain
  attributes, so they neither train nor get saved: the saved folder loads with ``from_pretrained`` and
  ``ZImageControlNetPipeline`` like the published Fun ControlNet Union.

A new ControlNet follows alibaba-pai's Fun ControlNet Union: control blocks after layers 0, 5, ..., 25
(``--control_layers_places``) plus control refiner blocks after the 2 noise-refiner layers, each initialised
from the transformer layer it sits beside, with zero ``before_proj`` / ``after_proj``.
"""

from __future__ import annotations

import argparse
import copy
import logging
from collections.abc import Sequence

import numpy as np
import torch

from ..errors import SkingenError
from . import large_transformer
from .base import config_mismatches
from .flow_matching import FlowMatchingBackbone

logger = logging.getLogger(__name__)

# What ZImageControlNetModel borrows from the transformer (diffusers' ZImageControlNetModel.from_transformer).
SHARED_MODULES = ("t_embedder", "all_x_embedder", "cap_embedder", "rope_embedder", "noise_refiner",
                  "context_refiner", "x_pad_token", "cap_pad_token")
NOISE_REFINER_MODES = ("control_noise_refiner", "control_layers", "none")


def borrow_transformer_modules(controlnet, transformer):
    """Give ``controlnet`` the transformer's shared modules as plain attributes (not submodules): its forward
    runs, while its parameters, state dict and device moves stay its own. Also sets the
    ``gradient_checkpointing`` flag diffusers' class reads but never initialises."""
    object.__setattr__(controlnet, "t_scale", transformer.t_scale)
    for name in SHARED_MODULES:
        controlnet._modules.pop(name, None)
        controlnet._parameters.pop(name, None)
        object.__setattr__(controlnet, name, getattr(transformer, name))
    if "gradient_checkpointing" not in controlnet.__dict__:
        controlnet.gradient_checkpointing = False
    return controlnet


def default_control_places(num_layers: int) -> list[int]:
    """The Fun ControlNet Union's places: every 5th layer from 0 (0, 5, ..., 25 of Z-Image's 30)."""
    return list(range(0, num_layers, 5))


def new_zimage_controlnet(transformer, control_layers_places: Sequence[int] | None = None,
                          control_refiner_layers_places: Sequence[int] | None = None,
                          add_control_noise_refiner: str = "control_noise_refiner", control_in_dim: int | None = None):
    """A ``ZImageControlNetModel`` for ``transformer``: control blocks copied from the layers they sit beside."""
    from diffusers import ZImageControlNetModel

    config = transformer.config
    places = list(control_layers_places if control_layers_places is not None
                  else default_control_places(config.n_layers))
    refiner_places = list(control_refiner_layers_places if control_refiner_layers_places is not None
                          else range(config.n_refiner_layers))
    mode = None if add_control_noise_refiner == "none" else add_control_noise_refiner
    controlnet = ZImageControlNetModel(
        control_layers_places=places, control_refiner_layers_places=refiner_places,
        control_in_dim=control_in_dim or config.in_channels, add_control_noise_refiner=mode,
        all_patch_size=tuple(config.all_patch_size), all_f_patch_size=tuple(config.all_f_patch_size), dim=config.dim,
        n_refiner_layers=config.n_refiner_layers, n_heads=config.n_heads, n_kv_heads=config.n_kv_heads,
        norm_eps=config.norm_eps, qk_norm=config.qk_norm)
    # VACE-style initialisation: each control block starts as the base block beside it (its zero projections keep
    # the base's output unchanged at step 0).
    for block, place in zip(controlnet.control_layers, places):
        block.load_state_dict(transformer.layers[place].state_dict(), strict=False)
    if mode == "control_noise_refiner":
        for block, place in zip(controlnet.control_noise_refiner, refiner_places):
            block.load_state_dict(transformer.noise_refiner[place].state_dict(), strict=False)
    elif mode is None:
        controlnet.control_noise_refiner.load_state_dict(transformer.noise_refiner.state_dict())
    return controlnet


def _places(text: str) -> list[int]:
    try:
        places = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like 0,5,10, got {text!r}") from None
    if not places or any(p < 0 for p in places):
        raise argparse.ArgumentTypeError(f"expected non-negative layer indices, got {text!r}")
    return places


class ZImageBackbone(FlowMatchingBackbone):
    family = "zimage"
    title = "Z-Image"
    pipeline_class_name = "ZImageControlNetPipeline"
    base_pipeline_classes = ("ZImagePipeline", "ZImageControlNetPipeline")
    controlnet_class_name = "ZImageControlNetModel"
    denoiser_subfolder = "transformer"
    text_subfolders = ("tokenizer", "text_encoder")
    default_tracker_project_name = "zimage_train_controlnet"
    default_max_sequence_length = 512  # the pipeline's default
    denoiser_class_name = "ZImageTransformer2DModel"
    multi_controlnet_class_name = ""  # diffusers has no multi-ControlNet for Z-Image
    text_encoder_classes = (("text_encoder", "transformers.Qwen3Model"),)
    tiny_builder = "build_tiny_zimage"
    default_guidance_scale = 5.0  # the pipeline's CFG default (Z-Image-Turbo samples with 0)
    control_guidance_arguments = ()  # ZImageControlNetPipeline applies the ControlNet at every step
    size_multiple = 16  # 8x VAE, 2x2 patches
    needs_negative_embeds = True
    tags = ("z-image",)
    license = "apache-2.0"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        group = parser.add_argument_group("Z-Image ControlNet")
        group.add_argument("--control_layers_places", type=_places, default=None,
                           help="Transformer layers a new ControlNet adds hints after, comma-separated; must hold 0 "
                                "(default: every 5th, 0,5,...,25 of 30, as the Fun ControlNet Union).")
        group.add_argument("--control_refiner_layers_places", type=_places, default=None,
                           help="Noise-refiner layers the new ControlNet's refiner blocks add hints after (default: all).")
        group.add_argument("--add_control_noise_refiner", choices=NOISE_REFINER_MODES, default="control_noise_refiner",
                           help="control_noise_refiner: control refiner blocks hinting the noise refiner (Union 2.1); "
                                "control_layers: the control blocks do it; none: a plain refiner on the control.")
        large_transformer.add_arguments(parser, cls.title, "Validation guidance (the pipeline's CFG; Z-Image-Turbo "
                                                            "samples with 0). Default 5.")

    @classmethod
    def validate_arguments(cls, args: argparse.Namespace) -> None:
        super().validate_arguments(args)
        if args.control_layers_places is not None and 0 not in args.control_layers_places:
            raise SkingenError(f"--control_layers_places {args.control_layers_places}: must contain 0 (the first "
                               "control block embeds the control; diffusers' ZImageControlNetModel requires it)")
        large_transformer.validate_arguments(args)

    def load(self) -> None:
        from diffusers import ZImageTransformer2DModel
        from transformers import AutoModel, AutoTokenizer

        self.tokenizers = [self.part("tokenizer", AutoTokenizer.from_pretrained, "tokenizer")]
        self.text_encoders = [self.part("Qwen3 text encoder", AutoModel.from_pretrained, "text_encoder",
                                        **self.text_encoder_kwargs)]
        quantized = large_transformer.quantization_kwargs(self.args, self.frozen_dtype)
        self.denoiser = self.part("transformer", ZImageTransformer2DModel.from_pretrained, "transformer",
                                  variant=self.args.variant, torch_dtype=self.frozen_dtype, **quantized)
        self.denoiser_quantized = bool(quantized)
        self.control_in_dim = self.denoiser.config.in_channels  # until a ControlNet with a wider input is made
        self.load_scheduler()

    def resolution_multiple(self) -> tuple[int, str]:
        patch = max(self.denoiser.config.all_patch_size)
        return self.vae_scale_factor * patch, f"VAE /{self.vae_scale_factor}, then {patch}x{patch} patches"

    # -- text -----------------------------------------------------------------------------------------------

    def text_settings(self):
        return {"max_sequence_length": self.args.max_sequence_length, "hidden_state": -2, "chat_template": True}

    def token_limits(self):
        return [(self.tokenizers[0], self.args.max_sequence_length)]

    @torch.no_grad()
    def encode_prompts(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """The pipeline's own ``encode_prompt`` (chat template, ``hidden_states[-2]`` where the mask is 1), stored
        zero-padded to ``--max_sequence_length`` with the mask."""
        from diffusers import ZImagePipeline

        encoder = self.text_encoders[0]
        pipeline = ZImagePipeline(scheduler=None, vae=None, text_encoder=encoder, tokenizer=self.tokenizers[0],
                                  transformer=None)
        # encode_prompt rewrites the list it is given in place (chat template), so it gets a copy.
        embeds, _ = pipeline.encode_prompt(list(captions), device=encoder.device, do_classifier_free_guidance=False,
                                           max_sequence_length=self.args.max_sequence_length)
        return pad_embeddings(embeds, self.args.max_sequence_length)

    def caption_features(self, batch: dict, dtype: torch.dtype) -> list[torch.Tensor]:
        """The pipeline's list of unpadded caption features from the cached padded ones."""
        return [embeds[mask.bool()].to(dtype) for embeds, mask in zip(batch["prompt_embeds"], batch["prompt_embeds_mask"])]

    def prompt_kwargs(self, entry, device, dtype):
        return {"prompt_embeds": [entry["prompt_embeds"][entry["prompt_embeds_mask"].bool()].to(device, dtype)]}

    # -- the step -------------------------------------------------------------------------------------------

    def control_latents(self, batch: dict, weight_dtype: torch.dtype) -> torch.Tensor:
        """As ``ZImageControlNetPipeline``: the VAE's mode, shifted and scaled, zero-padded to ``control_in_dim``."""
        latents = super().control_latents(batch, weight_dtype)
        return pad_control_channels(latents, self.control_in_dim)

    def velocity(self, noisy: torch.Tensor, timesteps: torch.Tensor, prompts: dict, control: torch.Tensor | None,
                 controlnet, weight_dtype: torch.dtype, denoiser=None) -> torch.Tensor:
        model_time = 1.0 - timesteps / self.num_train_timesteps  # the pipeline's (1000 - t) / 1000
        captions = self.caption_features(prompts, weight_dtype)
        frames = list(noisy.unsqueeze(2).unbind(0))  # (C, 1, h, w) per sample
        hints = None  # without a ControlNet: the transformer alone
        if controlnet is not None:
            hints = controlnet(frames, model_time, captions, control.unsqueeze(2))  # (B, C, 1, h, w), as the pipeline
            hints = {k: v.to(weight_dtype) for k, v in hints.items()}
        output = (denoiser or self.denoiser)(frames, model_time, captions, return_dict=False,
                                             controlnet_block_samples=hints)[0]
        return -torch.stack(output).squeeze(2)  # the transformer predicts x0 - noise

    def pipeline_sigmas(self, num_steps: int) -> np.ndarray | None:
        return np.linspace(1.0, 1 / num_steps, num_steps)  # as ZImageControlNetPipeline (get_default_z_image_sigmas)

    # -- the ControlNet -------------------------------------------------------------------------------------

    def new_controlnet(self):
        args, config = self.args, self.denoiser.config
        places = args.control_layers_places or default_control_places(config.n_layers)
        beyond = [p for p in places if p >= config.n_layers]
        if beyond:
            raise SkingenError(f"--control_layers_places {places}: the transformer has layers 0..{config.n_layers - 1}")
        refiner = args.control_refiner_layers_places
        if refiner is not None and any(p >= config.n_refiner_layers for p in refiner):
            raise SkingenError(f"--control_refiner_layers_places {refiner}: the transformer has noise-refiner layers "
                               f"0..{config.n_refiner_layers - 1}")
        return new_zimage_controlnet(self.denoiser, places, refiner, args.add_control_noise_refiner)

    def create_controlnet(self, controlnet_model_name_or_path):
        controlnet = borrow_transformer_modules(super().create_controlnet(controlnet_model_name_or_path),
                                                self.denoiser)
        self.control_in_dim = controlnet.config.control_in_dim
        return controlnet

    def enable_gradient_checkpointing(self, controlnet) -> None:
        if controlnet is not None and "gradient_checkpointing" not in controlnet.__dict__:  # diffusers' class never sets it
            controlnet.gradient_checkpointing = False
        super().enable_gradient_checkpointing(controlnet)

    @classmethod
    def controlnet_mismatches(cls, controlnet_config: dict, denoiser_config) -> list[str]:
        found = config_mismatches(controlnet_config, denoiser_config, [
            ("dim", "dim"), ("n_heads", "n_heads"), ("n_kv_heads", "n_kv_heads"), ("qk_norm", "qk_norm"),
            ("n_refiner_layers", "n_refiner_layers"), ("all_patch_size", "all_patch_size"),
            ("all_f_patch_size", "all_f_patch_size"),
        ])
        config = denoiser_config if isinstance(denoiser_config, dict) else dict(denoiser_config)
        places = controlnet_config.get("control_layers_places") or []
        if places and max(places) >= config.get("n_layers", 0):
            found.append(f"control_layers_places: ControlNet {places} vs base layers 0..{config.get('n_layers', 0) - 1}")
        in_dim = controlnet_config.get("control_in_dim")
        if in_dim is not None and in_dim < config.get("in_channels", 0):
            found.append(f"control_in_dim: ControlNet {in_dim} vs base in_channels {config.get('in_channels')}")
        return found

    # -- generating -----------------------------------------------------------------------------------------

    def validation_pipeline(self, controlnet, scheduler=None):
        from diffusers import ZImageControlNetPipeline

        # The pipeline attaches the shared modules to the ControlNet it gets as submodules; a view with its own
        # module tables keeps the trained ControlNet as it is.
        view = copy.copy(controlnet)
        view._modules, view._parameters, view._buffers = (dict(controlnet._modules), dict(controlnet._parameters),
                                                          dict(controlnet._buffers))
        return ZImageControlNetPipeline(scheduler=scheduler or self.noise_scheduler, vae=self.vae, text_encoder=None,
                                        tokenizer=None, transformer=self.denoiser, controlnet=view)


def pad_embeddings(embeds: Sequence[torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """A list of ``(L_i, D)`` caption features -> ``prompt_embeds`` ``(B, length, D)`` zero-padded and
    ``prompt_embeds_mask`` ``(B, length)``."""
    padded = embeds[0].new_zeros(len(embeds), length, embeds[0].shape[-1])
    mask = torch.zeros(len(embeds), length, dtype=torch.long)
    for row, tensor in enumerate(embeds):
        padded[row, : len(tensor)] = tensor[:length]
        mask[row, : len(tensor)] = 1
    return {"prompt_embeds": padded, "prompt_embeds_mask": mask}


def pad_control_channels(latents: torch.Tensor, channels: int) -> torch.Tensor:
    """Zero channels up to ``channels`` (a union ControlNet's inpaint/mask inputs, unused for a plain control)."""
    missing = channels - latents.shape[1]
    if missing <= 0:
        return latents
    return torch.cat([latents, latents.new_zeros(latents.shape[0], missing, *latents.shape[2:])], dim=1)
