"""The trainer's flags: diffusers' names (``examples/controlnet/train_controlnet_*.py``), checked before anything loads.

``build_arg_parser`` makes the common flags; each backbone adds its own (``skingen.backbones``) and each trainer
script its extras (e.g. the text loss). ``parse_training_args`` reads ``--config`` too and checks every value.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Sequence
from pathlib import Path

from ..backbones import backbone_class
from ..config import parse_args_with_config
from ..data.dataset import ON_BAD_SAMPLE
from ..errors import require
from .edge_loss import add_edge_loss_arguments, build_edge_loss
from .options import add_option_args, check_option_args, lr_scheduler_names, tracker_names
from .text_loss_options import add_text_loss_arguments, check_text_loss_arguments

LR_SCHEDULERS = lr_scheduler_names()  # every name diffusers.optimization.get_scheduler takes
REPORT_TO = tracker_names()  # every tracker accelerate knows, "all" and "none"


# ---------------------------------------------------------------------------------------------------------------
# Flags


def build_arg_parser(description: str | None = None, backbone: str = "sdxl") -> argparse.ArgumentParser:
    """The trainer's flags for a ``backbone`` family (diffusers' names where diffusers has the flag); other
    trainers add theirs to it."""
    family = backbone_class(backbone)
    parser = argparse.ArgumentParser(description=description or f"Train a {family.title} ControlNet on a skin dataset.")
    add = parser.add_argument

    models = parser.add_argument_group("models")
    models.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                        help="Base pipeline (SDXL, SD3/SD3.5 or FLUX.1, as the trainer script says): a local "
                             "diffusers folder or a hub id (required).")
    models.add_argument("--pretrained_vae_model_name_or_path", type=str, default=None,
                        help="An fp16-safe VAE (e.g. madebyollin/sdxl-vae-fp16-fix); it then runs in the mixed "
                             "precision dtype instead of fp32.")
    models.add_argument("--controlnet_model_name_or_path", type=str, default=None,
                        help="ControlNet to fine-tune (e.g. a Canny one of the same base model); default: "
                             "initialise from the base model's UNet or transformer.")
    models.add_argument("--controlnet_conditioning_init", choices=("diffusers", "kaiming"), default="diffusers",
                        help="Initialisation of a new SDXL ControlNet's conditioning encoder (the convolutions before "
                             "its zero conv): diffusers' default, whose output is about 1%% of its input's scale so the "
                             "control's gradient starts near zero, or Kaiming (He) init, which keeps the scale (on the demo's "
                             "tiny model, one seed, 400 steps: blacking out the control moved the outputs by 0.025 "
                             "with it, by 0.0000 without).")
    models.add_argument("--variant", type=str, default=None, help="Weight variant of the base model files, e.g. fp16.")
    models.add_argument("--revision", type=str, default=None, help="Revision of a hub model.")
    models.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are stored.")

    data = parser.add_argument_group("data")
    data.add_argument("--train_data_dir", type=str, default=None,
                      help="Dataset folder: train.jsonl (skingen) or an ImageFolder metadata.jsonl.")
    data.add_argument("--dataset_name", type=str, default=None, help="A hub dataset (instead of --train_data_dir).")
    data.add_argument("--dataset_config_name", type=str, default=None, help="Config of the hub dataset, if it has several.")
    data.add_argument("--image_column", type=str, default=None, help="Target image column/key (default: the form's own).")
    data.add_argument("--conditioning_image_column", type=str, nargs="+", default=None,
                      help="Conditioning image column/key; several (e.g. conditioning_image conditioning_image_canny) "
                           "are concatenated on channels, 3 per image, in this order.")
    data.add_argument("--caption_column", type=str, default=None, help="Caption column/key.")
    data.add_argument("--max_train_samples", type=int, default=None, help="Train on the first N good rows only.")
    data.add_argument("--on_bad_sample", choices=ON_BAD_SAMPLE, default="error",
                      help="A bad dataset row stops with a report (error) or is dropped and listed (skip).")
    data.add_argument("--proportion_empty_prompts", type=float, default=0.0,
                      help="Probability, per sample and step, of training with the empty prompt.")
    data.add_argument("--resolution", type=int, default=512,
                      help="Training size: the shorter side is resized to this, then centre-cropped to a square.")
    data.add_argument("--crops_coords_top_left_h", type=int, default=None,
                      help="Fixed crop top for SDXL's time ids (default: the actual centre-crop offset; unused by "
                           "SD3/FLUX).")
    data.add_argument("--crops_coords_top_left_w", type=int, default=None,
                      help="Fixed crop left for SDXL's time ids (default: the actual centre-crop offset).")
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="Data loading subprocesses (0: main process).")

    cache = parser.add_argument_group("caching")
    cache.add_argument("--embeddings_cache_dir", type=str, default=None,
                       help="Where text embeddings and VAE latents are cached (default: OUTPUT_DIR/cache); "
                            "point several runs at one folder to share it.")
    cache.add_argument("--cache_latents", dest="cache_latents", action="store_true", default=True,
                       help="Encode every training image with the VAE once and reuse the latents (default).")
    cache.add_argument("--no_cache_latents", dest="cache_latents", action="store_false",
                       help="Encode images with the VAE at every step instead (as diffusers does).")

    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", type=str, default="controlnet-model", help="Checkpoints, weights, logs, samples.")
    train.add_argument("--seed", type=int, default=None, help="Seed for reproducible training (random when unset).")
    train.add_argument("--train_batch_size", type=int, default=4, help="Batch size per process.")
    train.add_argument("--num_train_epochs", type=int, default=1)
    train.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides --num_train_epochs.")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for activation memory.")
    train.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
                       help="Default: the accelerate config's value.")
    train.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    train.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                       help="Use xformers attention (default: PyTorch SDPA).")
    train.add_argument("--torch_compile", action="store_true", help="Compile the UNet and ControlNet with torch.compile.")
    train.add_argument("--max_nonfinite_steps", type=int, default=10,
                       help="Stop after this many optimizer steps in a row whose loss was NaN/inf (each is skipped).")

    optim = parser.add_argument_group("optimizer")
    optim.add_argument("--learning_rate", type=float, default=5e-6)
    optim.add_argument("--scale_lr", action="store_true",
                       help="Multiply the learning rate by processes x batch size x accumulation steps.")
    optim.add_argument("--lr_scheduler", choices=LR_SCHEDULERS, default="constant")
    optim.add_argument("--lr_warmup_steps", type=int, default=500)
    optim.add_argument("--lr_num_cycles", type=int, default=1, help="Hard restarts of cosine_with_restarts.")
    optim.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial scheduler.")
    optim.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes' 8-bit AdamW.")
    optim.add_argument("--adam_beta1", type=float, default=0.9)
    optim.add_argument("--adam_beta2", type=float, default=0.999)
    optim.add_argument("--adam_weight_decay", type=float, default=1e-2)
    optim.add_argument("--adam_epsilon", type=float, default=1e-08)
    optim.add_argument("--max_grad_norm", type=float, default=1.0)
    optim.add_argument("--set_grads_to_none", action="store_true", help="zero_grad(set_to_none=True).")

    ckpt = parser.add_argument_group("checkpoints")
    ckpt.add_argument("--checkpointing_steps", type=int, default=500, help="Save training state every N steps.")
    ckpt.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep only the newest N checkpoints.")
    ckpt.add_argument("--resume_from_checkpoint", type=str, default=None,
                      help="'latest' or a checkpoint-N folder; continues at the next unseen batch.")

    val = parser.add_argument_group("validation")
    val.add_argument("--validation_prompt", type=str, nargs="+", default=None)
    val.add_argument("--validation_image", type=str, nargs="+", default=None,
                     help="Conditioning images: one per prompt, or one for all prompts.")
    val.add_argument("--validation_split", type=str, default=None,
                     help="Without --validation_prompt/--validation_image: take prompts and conditioning images "
                          "from this split of the dataset (e.g. 'validation', made by dataset_tool.py split).")
    val.add_argument("--validation_rows", type=int, default=4, help="How many rows of --validation_split to use.")
    val.add_argument("--num_validation_images", type=int, default=4, help="Images per prompt/conditioning pair.")
    val.add_argument("--validation_steps", type=int, default=100, help="Validate every N steps (and at the end).")
    val.add_argument("--validation_inference_steps", type=int, default=20, help="Sampling steps per validation image.")
    val.add_argument("--validation_loss_timesteps", type=int, nargs="+", default=None,
                     help="Also compute the losses at these fixed timesteps (e.g. 50 100 150 200) with fixed noise on "
                          "the first --validation_loss_rows rows of --validation_split when it is given (held out, as "
                          "kohya sd-scripts' validation loss), else of the training rows: before training, every "
                          "--validation_steps and at the end. Logged as val_loss_diffusion and val_<extra loss log> (val_text_ctc): "
                          "curves without the timestep and noise sampling of the training loss, comparable between "
                          "runs (as kohya sd-scripts' fixed-timestep validation loss).")
    val.add_argument("--validation_loss_rows", type=int, default=8,
                     help="How many rows (of --validation_split, else of the training data) --validation_loss_timesteps "
                          "evaluates.")

    log = parser.add_argument_group("logging and hub")
    log.add_argument("--report_to", type=str, default="tensorboard",
                     help=f"Tracker(s), comma-separated: {', '.join(REPORT_TO)} ('all': every installed one).")
    log.add_argument("--logging_dir", type=str, default="logs", help="TensorBoard folder, under --output_dir.")
    log.add_argument("--tracker_project_name", type=str, default="sd_xl_train_controlnet")
    log.add_argument("--push_to_hub", action="store_true", help="Upload the result to the Hugging Face Hub.")
    log.add_argument("--hub_model_id", type=str, default=None)
    log.add_argument("--hub_token", type=str, default=None)

    add_option_args(parser)
    add_text_loss_arguments(parser)
    add_edge_loss_arguments(parser)
    family.add_arguments(parser)
    parser.set_defaults(backbone=backbone, tracker_project_name=family.default_tracker_project_name)
    add("--debug_inject_nan_at_step", type=int, nargs="+", default=None, help=argparse.SUPPRESS)
    return parser


def parse_training_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse (``--config`` included) and check the flags; mistakes raise ``SkingenError``."""
    args = parse_args_with_config(parser, argv)
    backbone_class(args.backbone).normalize_arguments(args)
    for name in ("validation_prompt", "validation_image", "validation_loss_timesteps", "debug_inject_nan_at_step"):
        value = getattr(args, name)
        if value is not None and not isinstance(value, list):
            setattr(args, name, [value])  # a single value from a --config file
    validate_training_args(args)
    return args


def validate_training_args(args: argparse.Namespace) -> None:
    """Flag combinations that cannot work, and optional packages a flag needs, before anything is loaded."""
    require(args.pretrained_model_name_or_path is not None,
             "--pretrained_model_name_or_path is required (the base pipeline), on the command line or in --config")
    backbone_class(args.backbone).validate_arguments(args)
    if args.controlnet_conditioning_init != "diffusers":
        require(args.controlnet_model_name_or_path is None,
                 "--controlnet_conditioning_init initialises a new ControlNet; it would overwrite the conditioning "
                 "encoder of --controlnet_model_name_or_path: drop one of them")
        require(not backbone_class(args.backbone).encodes_conditioning,
                 f"--controlnet_conditioning_init: a {args.backbone} ControlNet reads its control through the VAE "
                 "and has no conditioning encoder to initialise; drop the flag")
    require((args.train_data_dir is None) != (args.dataset_name is None),
             "give exactly one of --train_data_dir (a local dataset folder) or --dataset_name (a hub dataset)")
    require(0.0 <= args.proportion_empty_prompts <= 1.0,
             f"--proportion_empty_prompts must be between 0 and 1, got {args.proportion_empty_prompts}")
    require(args.resolution > 0 and args.resolution % 8 == 0,
             f"--resolution must be a positive multiple of 8 (the VAE downsamples by 8), got {args.resolution}")
    for name in ("train_batch_size", "num_train_epochs", "gradient_accumulation_steps", "checkpointing_steps",
                 "validation_steps", "num_validation_images", "validation_inference_steps", "max_nonfinite_steps",
                 "validation_rows", "validation_loss_rows"):
        require(getattr(args, name) >= 1, f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("max_train_steps", "checkpoints_total_limit"):
        value = getattr(args, name)
        require(value is None or value >= 1, f"--{name} must be at least 1, got {value}")
    require(args.learning_rate >= 0, f"--learning_rate must not be negative, got {args.learning_rate}")
    require(args.lr_warmup_steps >= 0, f"--lr_warmup_steps must not be negative, got {args.lr_warmup_steps}")
    require(args.dataloader_num_workers >= 0, "--dataloader_num_workers must not be negative")
    check_text_loss_arguments(args)
    build_edge_loss(args)  # its flags' checks
    require(all(t >= 0 for t in args.validation_loss_timesteps or ()),
             f"--validation_loss_timesteps must not be negative, got {args.validation_loss_timesteps}")

    prompts, images = args.validation_prompt, args.validation_image
    require((prompts is None) == (images is None),
             "--validation_prompt and --validation_image go together: give both (or neither)")
    if prompts is not None:
        require(len(images) in (1, len(prompts)) or len(prompts) == 1,
                 f"got {len(prompts)} --validation_prompt and {len(images)} --validation_image; give one image for "
                 "all prompts, one prompt for all images, or the same number of each")
        for path in (part for entry in images for part in entry.split(",")):  # a,b: one per conditioning column
            require(Path(path).is_file(), f"--validation_image {path}: file not found")
        require(args.validation_split is None, "--validation_split is used only without --validation_prompt/--validation_image")
    if args.validation_split is not None:
        require(args.train_data_dir is not None, "--validation_split needs --train_data_dir (a local dataset folder)")

    if args.use_8bit_adam:
        require(importlib.util.find_spec("bitsandbytes") is not None,
                 "--use_8bit_adam needs bitsandbytes: pip install bitsandbytes (CUDA GPUs only)")
    if args.enable_xformers_memory_efficient_attention:
        require(importlib.util.find_spec("xformers") is not None,
                 "--enable_xformers_memory_efficient_attention needs xformers: pip install xformers "
                 "(or drop the flag: PyTorch's SDPA attention is the default and as memory-efficient)")
    check_option_args(args)
    require(not (args.hub_token and any(name.strip() in ("wandb", "all") for name in args.report_to.split(","))),
             "--hub_token with --report_to wandb would expose the token in the run's logged config; log in with "
             "`huggingface-cli login` instead of passing --hub_token")
    if args.push_to_hub:
        from huggingface_hub import constants

        require(not constants.HF_HUB_OFFLINE,
                 "--push_to_hub: the Hugging Face Hub is offline here (HF_HUB_OFFLINE is set); drop --push_to_hub "
                 "and upload OUTPUT_DIR later with `huggingface-cli upload`")

