"""SD3 / SD3.5: CLIP-L + CLIP-G + T5 text encoders, an MMDiT transformer, rectified-flow training.

As diffusers' ``examples/controlnet/train_controlnet_sd3.py``: the cache stores the joint prompt embedding (both
CLIPs' penultimate hidden states, concatenated and zero-padded to T5's width, followed by T5's
``--max_sequence_length`` tokens) and both CLIPs' projected pooled outputs; the ControlNet is
``SD3ControlNetModel.from_transformer`` and sees the conditioning image through the VAE; with
``--precondition_outputs`` (diffusers' default) the prediction is turned into an x0 estimate and compared with
the latents. Generation uses ``StableDiffusion3ControlNetPipeline``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from ..errors import SkingenError
from .base import DenoiserOutput, config_mismatches
from .flow_matching import FlowMatchingBackbone


class SD3Backbone(FlowMatchingBackbone):
    family = "sd3"
    title = "SD3"
    pipeline_class_name = "StableDiffusion3ControlNetPipeline"
    base_pipeline_classes = ("StableDiffusion3Pipeline", "StableDiffusion3ControlNetPipeline")
    controlnet_class_name = "SD3ControlNetModel"
    denoiser_subfolder = "transformer"
    text_subfolders = ("tokenizer", "tokenizer_2", "tokenizer_3", "text_encoder", "text_encoder_2", "text_encoder_3")
    default_tracker_project_name = "sd3_train_controlnet"
    denoiser_class_name = "SD3Transformer2DModel"
    multi_controlnet_class_name = "SD3MultiControlNetModel"
    text_encoder_classes = (("text_encoder", "transformers.CLIPTextModelWithProjection"),
                            ("text_encoder_2", "transformers.CLIPTextModelWithProjection"),
                            ("text_encoder_3", "transformers.T5EncoderModel"))
    tiny_builder = "build_tiny_sd3"
    size_multiple = 16  # 8x VAE, 2x2 patches
    needs_negative_embeds = True
    tags = ("sd3", "sd3.5")  # SD3.5: Stability AI Community License
    default_max_sequence_length = 77
    ddp_find_unused_parameters = True  # as diffusers' SD3 trainer

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        group = parser.add_argument_group("SD3")
        group.add_argument("--num_layers", type=int, default=None,
                           help="Transformer blocks the new ControlNet copies (default: 12, as diffusers, at most all "
                                "but the last block).")
        group.add_argument("--num_extra_conditioning_channels", type=int, default=0,
                           help="Extra input channels of the new ControlNet's conditioning embedding.")
        group.add_argument("--precondition_outputs", type=int, choices=(0, 1), default=1,
                           help="1: compare x_t - sigma * prediction with the latents (EDM preconditioning, diffusers' "
                                "default); 0: compare the prediction with the velocity noise - latents.")
        group.add_argument("--upcast_vae", action="store_true",
                           help="Accepted for diffusers' command lines: the VAE already runs in fp32 unless a "
                                "separate --pretrained_vae_model_name_or_path is given.")
        group.add_argument("--dataset_preprocess_batch_size", type=int, default=1000,
                           help="Accepted for diffusers' command lines (captions are cached per distinct string).")

    @classmethod
    def validate_arguments(cls, args: argparse.Namespace) -> None:
        super().validate_arguments(args)
        if args.num_layers is not None and args.num_layers < 1:
            raise SkingenError(f"--num_layers must be at least 1, got {args.num_layers}")

    def load(self) -> None:
        from diffusers import SD3Transformer2DModel
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        variant = self.args.variant
        self.tokenizers = [self.part(f"tokenizer {name}", AutoTokenizer.from_pretrained, name)
                           for name in ("tokenizer", "tokenizer_2", "tokenizer_3")]
        self.text_encoders = [
            self.part("CLIP-L text encoder", CLIPTextModelWithProjection.from_pretrained, "text_encoder", **self.text_encoder_kwargs),
            self.part("CLIP-G text encoder", CLIPTextModelWithProjection.from_pretrained, "text_encoder_2",
                      **self.text_encoder_kwargs),
            self.part("T5 text encoder", T5EncoderModel.from_pretrained, "text_encoder_3", **self.text_encoder_kwargs),
        ]
        self.denoiser = self.part("transformer", SD3Transformer2DModel.from_pretrained, "transformer", variant=variant,
                                  torch_dtype=self.frozen_dtype)
        self.load_scheduler()

    def resolution_multiple(self) -> tuple[int, str]:
        patch = self.denoiser.config.patch_size
        return self.vae_scale_factor * patch, f"VAE /{self.vae_scale_factor}, then {patch}x{patch} patches"

    # -- text -----------------------------------------------------------------------------------------------

    def text_settings(self):
        return {"max_sequence_length": self.args.max_sequence_length}

    def token_limits(self):
        return [(self.tokenizers[0], 77), (self.tokenizers[2], self.args.max_sequence_length)]

    @torch.no_grad()
    def encode_prompts(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        captions = list(captions)
        clip_embeds, pooled = [], []
        for tokenizer, encoder in zip(self.tokenizers[:2], self.text_encoders[:2]):
            ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            output = encoder(ids.to(encoder.device), output_hidden_states=True)
            pooled.append(output[0])
            clip_embeds.append(output.hidden_states[-2])
        t5_tokenizer, t5 = self.tokenizers[2], self.text_encoders[2]
        ids = t5_tokenizer(captions, padding="max_length", max_length=self.args.max_sequence_length, truncation=True,
                           add_special_tokens=True, return_tensors="pt").input_ids
        t5_embeds = t5(ids.to(t5.device))[0]
        clip = torch.cat(clip_embeds, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5_embeds.shape[-1] - clip.shape[-1]))
        return {"prompt_embeds": torch.cat([clip, t5_embeds.to(clip.dtype)], dim=-2),
                "pooled_prompt_embeds": torch.cat(pooled, dim=-1)}

    # -- the step -------------------------------------------------------------------------------------------

    def forward(self, batch: dict, controlnet, weight_dtype: torch.dtype, denoiser=None) -> DenoiserOutput:
        latents, noise, sigmas, noisy = self.flow_step(batch, weight_dtype)
        timesteps = batch["timesteps"].float()
        velocity = self.velocity(noisy, timesteps, batch, self.step_control(batch, controlnet, weight_dtype), controlnet,
                                 weight_dtype, denoiser)
        if self.args.precondition_outputs:
            model_pred, target = velocity * (-sigmas) + noisy, latents
        else:
            model_pred, target = velocity, noise - latents
        precondition = bool(self.args.precondition_outputs)

        def estimate_x0(rows):
            pick = (lambda t: t) if rows is None else (lambda t: t[rows])
            if precondition:
                return pick(model_pred).float()
            return pick(noisy).float() - pick(sigmas) * pick(velocity).float()

        return DenoiserOutput(model_pred=model_pred, target=target, latents=latents, noisy_latents=noisy, noise=noise,
                              timesteps=timesteps, estimate_x0=estimate_x0, signal=(1 - sigmas.flatten()) ** 2,
                              weighting=self.loss_weighting(sigmas))

    def velocity(self, noisy: torch.Tensor, timesteps: torch.Tensor, prompts: dict, control: torch.Tensor | None,
                 controlnet, weight_dtype: torch.dtype, denoiser=None) -> torch.Tensor:
        prompt_embeds = prompts["prompt_embeds"].to(weight_dtype)
        pooled = prompts["pooled_prompt_embeds"].to(weight_dtype)
        samples = None
        if controlnet is not None:
            samples = controlnet(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=prompt_embeds,
                                 pooled_projections=pooled, controlnet_cond=control, return_dict=False)[0]
            samples = [sample.to(weight_dtype) for sample in samples]
        return (denoiser or self.denoiser)(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=prompt_embeds,
                                           pooled_projections=pooled, block_controlnet_hidden_states=samples,
                                           return_dict=False)[0]

    # -- the ControlNet -------------------------------------------------------------------------------------

    def new_controlnet(self):
        from diffusers import SD3ControlNetModel

        num_layers = self.args.num_layers
        if num_layers is None:  # diffusers' 12; a ControlNet never copies the last, context-only block
            num_layers = max(1, min(12, self.denoiser.config.num_layers - 1))
        return SD3ControlNetModel.from_transformer(
            self.denoiser, num_layers=num_layers, num_extra_conditioning_channels=self.args.num_extra_conditioning_channels)

    @classmethod
    def controlnet_mismatches(cls, controlnet_config: dict, denoiser_config) -> list[str]:
        return config_mismatches(controlnet_config, denoiser_config, [
            ("in_channels", "in_channels"), ("patch_size", "patch_size"), ("attention_head_dim", "attention_head_dim"),
            ("num_attention_heads", "num_attention_heads"), ("joint_attention_dim", "joint_attention_dim"),
            ("caption_projection_dim", "caption_projection_dim"), ("pooled_projection_dim", "pooled_projection_dim"),
        ])

    # -- generating -----------------------------------------------------------------------------------------

    def validation_pipeline(self, controlnet, scheduler=None):
        from diffusers import StableDiffusion3ControlNetPipeline

        return StableDiffusion3ControlNetPipeline(
            transformer=self.denoiser, scheduler=scheduler or self.noise_scheduler, vae=self.vae, controlnet=controlnet,
            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
            tokenizer_3=None,
        )
