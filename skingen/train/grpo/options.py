"""The flags of ``train_controlnet_grpo.py`` beside the trainers' common ones (Flow-GRPO's names where it has one:
``sample.num_image_per_prompt``, ``sample.num_steps`` (here ``--train_sampling_steps``), ``sample.noise_level``,
``train.clip_range``, ``train.adv_clip_max``, ``train.beta``, ``train.timestep_fraction``,
``train.num_inner_epochs``, ``sample.global_std``), and their checks."""

from __future__ import annotations

import argparse
from pathlib import Path

from ...backbones import backbone_class
from ...backbones.flow_matching import FlowMatchingBackbone
from ...backbones.pipelines import family_of_pipeline
from ...errors import SkingenError
from ...prep.ocr import BACKENDS
from .rewards import parse_reward_weights


def family_from_argv(argv) -> str:
    """The backbone family: ``--backbone`` when given, else the base folder's ``model_index.json``."""
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--backbone")
    probe.add_argument("--pretrained_model_name_or_path")
    probe.add_argument("--config")
    known, _ = probe.parse_known_args(argv)
    if known.config and (known.backbone is None or known.pretrained_model_name_or_path is None):
        import yaml

        try:
            values = yaml.safe_load(Path(known.config).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as err:
            raise SkingenError(f"--config {known.config}: not readable ({type(err).__name__}: {err})") from None
        known.backbone = known.backbone or values.get("backbone")
        known.pretrained_model_name_or_path = known.pretrained_model_name_or_path or values.get(
            "pretrained_model_name_or_path")
    family = known.backbone
    if family is None and known.pretrained_model_name_or_path is not None:
        family = family_of_pipeline(known.pretrained_model_name_or_path).name
    if family is None:
        raise SkingenError("which model family? give a local --pretrained_model_name_or_path folder (its "
                           "model_index.json says) or --backbone sd3|flux|zimage|qwenimage for a hub id")
    if not issubclass(backbone_class(family), FlowMatchingBackbone):
        raise SkingenError(f"--backbone {family}: GRPO here needs a flow-matching family (its SDE sampler turns the "
                           "flow ODE into an SDE); SDXL is not supported")
    return family


def add_grpo_arguments(parser: argparse.ArgumentParser, family: str) -> None:
    group = parser.add_argument_group("GRPO")
    group.add_argument("--backbone", choices=[family], default=family,
                       help="The base model family (default: from the base folder's model_index.json).")
    group.add_argument("--reward", type=str, default="edge_f1=1,ocr_ned=1",
                       help="Rewards and weights: edge_f1 (Canny F1 against the control), ocr_ned (1 - normalised "
                            "edit distance of the OCR reading of each box), ocr_accuracy; e.g. edge_f1=1,ocr_ned=0.5.")
    group.add_argument("--ocr_backend", choices=(*BACKENDS, "none"), default="rapidocr",
                       help="The recogniser of the text rewards (evaluate.py's).")
    group.add_argument("--num_image_per_prompt", type=int, default=4,
                       help="Group size: images sampled per control, whose rewards are normalised together.")
    group.add_argument("--train_sampling_steps", type=int, default=10,
                       help="Sampling steps of the training rollouts (Flow-GRPO's sample.num_steps: fewer than at "
                            "evaluation, --validation_inference_steps).")
    group.add_argument("--sample_guidance_scale", type=float, default=1.0,
                       help="Classifier-free guidance of the rollouts and the held-out samples, with the empty "
                            "prompt as the negative one (Flow-GRPO: 4.5 on SD3.5; 1: none, e.g. for FLUX.1-dev, "
                            "whose guidance is the distilled --guidance_scale input).")
    group.add_argument("--noise_level", type=float, default=0.7,
                       help="Noise of the SDE sampler (0: the deterministic ODE, which has no log-probability).")
    group.add_argument("--clip_range", type=float, default=1e-4,
                       help="PPO clip range of the policy ratio (Flow-GRPO's 1e-4: its log-probabilities are means "
                            "over latent elements, so ratios stay near 1).")
    group.add_argument("--adv_clip_max", type=float, default=5.0, help="Advantages are clipped to +-this.")
    group.add_argument("--beta", type=float, default=0.04, help="Weight of the KL penalty to the starting ControlNet.")
    group.add_argument("--timestep_fraction", type=float, default=1.0,
                       help="Fraction of the sampling steps (the first ones) that are trained on (Flow-GRPO's OCR "
                            "setting: 0.99 of 10; with few steps, leaving out the last can turn the gradient's sign: "
                            "docs/grpo.md).")
    group.add_argument("--num_inner_epochs", type=int, default=1,
                       help="Optimizer steps on each set of rollouts (from the second on, the ratio is off-policy "
                            "and clipping acts).")
    group.add_argument("--denoiser_lora_rank", type=int, default=0,
                       help="Also train a LoRA of this rank on the frozen transformer's attention (Flow-GRPO trains a "
                            "rank-32 LoRA of SD3.5's transformer); saved as pytorch_lora_weights.safetensors. 0: off.")
    group.add_argument("--global_std", action="store_true",
                       help="Divide advantages by the std of all rewards of the step instead of each group's.")
    # Rollouts decode sampled latents; the training images' latents are never needed.
    parser.set_defaults(cache_latents=False)
    for action in parser._actions:
        if action.dest == "train_batch_size":
            action.help = "Controls per process and step (each sampled --num_image_per_prompt times)."


def validate_grpo_arguments(args: argparse.Namespace) -> None:
    def require(condition: bool, message: str) -> None:
        if not condition:
            raise SkingenError(message)

    require(args.controlnet_model_name_or_path is not None,
            "--controlnet_model_name_or_path is required: GRPO fine-tunes a ControlNet trained with the supervised "
            f"trainer (train_controlnet_{args.backbone}.py) first")
    args.reward_weights = parse_reward_weights(args.reward)
    require(not (args.ocr_backend == "none" and any(n.startswith("ocr") for n in args.reward_weights)),
            f"--reward {args.reward} names a text reward but --ocr_backend is none")
    require(args.num_image_per_prompt >= 2,
            f"--num_image_per_prompt must be at least 2 (advantages compare images of one control), got "
            f"{args.num_image_per_prompt}")
    require(args.train_sampling_steps >= 1, f"--train_sampling_steps must be at least 1, got {args.train_sampling_steps}")
    require(args.noise_level > 0, f"--noise_level must be positive (the ODE has no log-probability), got {args.noise_level}")
    require(args.clip_range > 0, f"--clip_range must be positive, got {args.clip_range}")
    require(args.adv_clip_max > 0, f"--adv_clip_max must be positive, got {args.adv_clip_max}")
    require(args.beta >= 0, f"--beta must not be negative, got {args.beta}")
    require(0 < args.timestep_fraction <= 1 and int(args.train_sampling_steps * args.timestep_fraction) >= 1,
            f"--timestep_fraction {args.timestep_fraction} x --train_sampling_steps {args.train_sampling_steps} must "
            "leave at least one step to train on")
    require(args.sample_guidance_scale >= 1, f"--sample_guidance_scale must be at least 1 (1: no guidance), got "
                                             f"{args.sample_guidance_scale}")
    require(args.denoiser_lora_rank >= 0, f"--denoiser_lora_rank must not be negative (0: off), got {args.denoiser_lora_rank}")
    require(args.num_inner_epochs >= 1, f"--num_inner_epochs must be at least 1, got {args.num_inner_epochs}")
    # Supervised-training flags that have no meaning for reward fine-tuning.
    require(args.gradient_accumulation_steps == 1,
            "--gradient_accumulation_steps: GRPO takes one optimizer step per inner epoch over all of a step's "
            "rollouts; raise --train_batch_size or the number of processes instead")
    for flag, value in (("--use_ema", args.use_ema), ("--edge_loss_weight", args.edge_loss_weight),
                        ("--validation_loss_timesteps", args.validation_loss_timesteps),
                        ("--unet_lora_rank", args.unet_lora_rank)):
        require(not value, f"{flag}: not used by GRPO fine-tuning (drop it)")
