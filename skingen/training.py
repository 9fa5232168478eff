"""The shared SDXL ControlNet training loop (``train_controlnet_sdxl.py`` and the text-loss trainer).

Flags follow diffusers' ``examples/controlnet/train_controlnet_sdxl.py``; what differs:

- Text embeddings (per distinct caption) and VAE latent distributions are cached on disk and reused by
  later runs (``skingen.caching``); prompt dropout is still decided per step.
- The data order and every sample's randomness follow from the seed (``skingen.training_data``), so a resumed
  run ends with the same weights as an uninterrupted one, and N processes with the same global batch train
  like one process.
- Checkpoints are written atomically (``skingen.checkpointing``); a non-finite loss skips the optimizer
  update and ``--max_nonfinite_steps`` in a row stop training with the last good checkpoint kept.
- An optional extra loss (``ExtraLoss``, e.g. the OCR text loss) is added to the diffusion loss.

Validation grids and the model card: ``skingen.validation``.

Testing hook: ``--debug_inject_nan_at_step N [N ...]`` (hidden from ``--help``) turns the loss of those
optimizer steps (1-based, as in ``checkpoint-N``) into NaN, to exercise the non-finite handling.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import logging
import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .caching import LatentCache, TextEmbeddingCache, fill_sharded, image_signature, model_fingerprint
from .checkpointing import (
    list_checkpoints,
    read_training_state,
    recover_interrupted_saves,
    register_controlnet_hooks,
    resolve_resume_checkpoint,
    save_checkpoint,
    save_controlnet_weights,
)
from .config import parse_args_with_config
from .data import ON_BAD_SAMPLE
from .errors import SkingenError
from .models import load_or_init_controlnet, load_sdxl_components
from .training_data import (
    GlobalBatchSampler,
    TrainingSamples,
    batch_to_device,
    collate_samples,
    load_training_rows,
    sample_seed,
    training_pixels,
)
from .validation import load_validation_pairs, log_validation, write_model_card

logger = logging.getLogger(__name__)

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
REPORT_TO = ("tensorboard", "wandb", "all", "none")


# ---------------------------------------------------------------------------------------------------------------
# Flags


def build_arg_parser(description: str = "Train an SDXL ControlNet on a skin dataset.") -> argparse.ArgumentParser:
    """The trainer's flags (diffusers' names where diffusers has the flag); other trainers add theirs to it."""
    parser = argparse.ArgumentParser(description=description)
    add = parser.add_argument

    models = parser.add_argument_group("models")
    models.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                        help="SDXL base pipeline: a local diffusers folder or a hub id (required).")
    models.add_argument("--pretrained_vae_model_name_or_path", type=str, default=None,
                        help="An fp16-safe VAE (e.g. madebyollin/sdxl-vae-fp16-fix); it then runs in the mixed "
                             "precision dtype instead of fp32.")
    models.add_argument("--controlnet_model_name_or_path", type=str, default=None,
                        help="ControlNet to fine-tune (e.g. an SDXL Canny one); default: initialise from the UNet.")
    models.add_argument("--variant", type=str, default=None, help="Weight variant of the base model files, e.g. fp16.")
    models.add_argument("--revision", type=str, default=None, help="Revision of a hub model.")
    models.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are stored.")

    data = parser.add_argument_group("data")
    data.add_argument("--train_data_dir", type=str, default=None,
                      help="Dataset folder: train.jsonl (skingen) or an ImageFolder metadata.jsonl.")
    data.add_argument("--dataset_name", type=str, default=None, help="A hub dataset (instead of --train_data_dir).")
    data.add_argument("--dataset_config_name", type=str, default=None, help="Config of the hub dataset, if it has several.")
    data.add_argument("--image_column", type=str, default=None, help="Target image column/key (default: the form's own).")
    data.add_argument("--conditioning_image_column", type=str, default=None, help="Conditioning image column/key.")
    data.add_argument("--caption_column", type=str, default=None, help="Caption column/key.")
    data.add_argument("--max_train_samples", type=int, default=None, help="Train on the first N good rows only.")
    data.add_argument("--on_bad_sample", choices=ON_BAD_SAMPLE, default="error",
                      help="A bad dataset row stops with a report (error) or is dropped and listed (skip).")
    data.add_argument("--proportion_empty_prompts", type=float, default=0.0,
                      help="Probability, per sample and step, of training with the empty prompt.")
    data.add_argument("--resolution", type=int, default=512,
                      help="Training size: the shorter side is resized to this, then centre-cropped to a square.")
    data.add_argument("--crops_coords_top_left_h", type=int, default=None,
                      help="Fixed crop top for SDXL's time ids (default: the actual centre-crop offset).")
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
                          "the first --validation_loss_rows training rows: before training, every --validation_steps "
                          "and at the end. Logged as val_loss_diffusion and val_<extra loss log> (val_text_ctc): "
                          "curves without the timestep and noise sampling of the training loss, comparable between "
                          "runs (as kohya sd-scripts' fixed-timestep validation loss).")
    val.add_argument("--validation_loss_rows", type=int, default=8,
                     help="How many training rows --validation_loss_timesteps evaluates.")

    log = parser.add_argument_group("logging and hub")
    log.add_argument("--report_to", choices=REPORT_TO, default="tensorboard")
    log.add_argument("--logging_dir", type=str, default="logs", help="TensorBoard folder, under --output_dir.")
    log.add_argument("--tracker_project_name", type=str, default="sd_xl_train_controlnet")
    log.add_argument("--push_to_hub", action="store_true", help="Upload the result to the Hugging Face Hub.")
    log.add_argument("--hub_model_id", type=str, default=None)
    log.add_argument("--hub_token", type=str, default=None)

    add("--debug_inject_nan_at_step", type=int, nargs="+", default=None, help=argparse.SUPPRESS)
    return parser


def parse_training_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse (``--config`` included) and check the flags; mistakes raise ``SkingenError``."""
    args = parse_args_with_config(parser, argv)
    for name in ("validation_prompt", "validation_image", "validation_loss_timesteps", "debug_inject_nan_at_step"):
        value = getattr(args, name)
        if value is not None and not isinstance(value, list):
            setattr(args, name, [value])  # a single value from a --config file
    validate_training_args(args)
    return args


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise SkingenError(message)


def validate_training_args(args: argparse.Namespace) -> None:
    """Flag combinations that cannot work, and optional packages a flag needs, before anything is loaded."""
    _require(args.pretrained_model_name_or_path is not None,
             "--pretrained_model_name_or_path is required (the SDXL base pipeline), on the command line or in --config")
    _require((args.train_data_dir is None) != (args.dataset_name is None),
             "give exactly one of --train_data_dir (a local dataset folder) or --dataset_name (a hub dataset)")
    _require(0.0 <= args.proportion_empty_prompts <= 1.0,
             f"--proportion_empty_prompts must be between 0 and 1, got {args.proportion_empty_prompts}")
    _require(args.resolution > 0 and args.resolution % 8 == 0,
             f"--resolution must be a positive multiple of 8 (the VAE downsamples by 8), got {args.resolution}")
    for name in ("train_batch_size", "num_train_epochs", "gradient_accumulation_steps", "checkpointing_steps",
                 "validation_steps", "num_validation_images", "validation_inference_steps", "max_nonfinite_steps",
                 "validation_rows", "validation_loss_rows"):
        _require(getattr(args, name) >= 1, f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("max_train_steps", "checkpoints_total_limit"):
        value = getattr(args, name)
        _require(value is None or value >= 1, f"--{name} must be at least 1, got {value}")
    _require(args.learning_rate >= 0, f"--learning_rate must not be negative, got {args.learning_rate}")
    _require(args.lr_warmup_steps >= 0, f"--lr_warmup_steps must not be negative, got {args.lr_warmup_steps}")
    _require(args.dataloader_num_workers >= 0, "--dataloader_num_workers must not be negative")
    _require(all(t >= 0 for t in args.validation_loss_timesteps or ()),
             f"--validation_loss_timesteps must not be negative, got {args.validation_loss_timesteps}")

    prompts, images = args.validation_prompt, args.validation_image
    _require((prompts is None) == (images is None),
             "--validation_prompt and --validation_image go together: give both (or neither)")
    if prompts is not None:
        _require(len(images) in (1, len(prompts)) or len(prompts) == 1,
                 f"got {len(prompts)} --validation_prompt and {len(images)} --validation_image; give one image for "
                 "all prompts, one prompt for all images, or the same number of each")
        for path in images:
            _require(Path(path).is_file(), f"--validation_image {path}: file not found")
        _require(args.validation_split is None, "--validation_split is used only without --validation_prompt/--validation_image")
    if args.validation_split is not None:
        _require(args.train_data_dir is not None, "--validation_split needs --train_data_dir (a local dataset folder)")

    if args.use_8bit_adam:
        _require(importlib.util.find_spec("bitsandbytes") is not None,
                 "--use_8bit_adam needs bitsandbytes: pip install bitsandbytes (CUDA GPUs only)")
    if args.enable_xformers_memory_efficient_attention:
        _require(importlib.util.find_spec("xformers") is not None,
                 "--enable_xformers_memory_efficient_attention needs xformers: pip install xformers "
                 "(or drop the flag: PyTorch's SDPA attention is the default and as memory-efficient)")
    if args.report_to == "wandb":
        _require(importlib.util.find_spec("wandb") is not None, "--report_to wandb needs wandb: pip install wandb")
    if args.report_to == "tensorboard":
        _require(importlib.util.find_spec("tensorboard") is not None,
                 "--report_to tensorboard needs tensorboard: pip install tensorboard (or --report_to none)")
    _require(not (args.hub_token and args.report_to in ("wandb", "all")),
             "--hub_token with --report_to wandb would expose the token in the run's logged config; log in with "
             "`huggingface-cli login` instead of passing --hub_token")
    if args.push_to_hub:
        from huggingface_hub import constants

        _require(not constants.HF_HUB_OFFLINE,
                 "--push_to_hub: the Hugging Face Hub is offline here (HF_HUB_OFFLINE is set); drop --push_to_hub "
                 "and upload OUTPUT_DIR later with `huggingface-cli upload`")


# ---------------------------------------------------------------------------------------------------------------
# The loop


class ExtraLoss(Protocol):
    """An extra loss added to the diffusion loss (e.g. the OCR text loss).

    ``__call__`` returns ``(loss, logs)``: a scalar tensor that is added as is (apply your own weight; make it
    a per-sample mean so multi-process training averages it correctly) and a dict of floats to log. Set
    ``needs_pixel_values = True`` to get ``batch["pixel_values"]`` even when latents are cached.
    """

    name: str

    def __call__(self, *, batch: dict, model_pred: torch.Tensor, noisy_latents: torch.Tensor, latents: torch.Tensor,
                 timesteps: torch.Tensor, noise: torch.Tensor, noise_scheduler, vae, weight_dtype: torch.dtype,
                 step: int) -> tuple[torch.Tensor, dict[str, float]]: ...


@dataclass
class TrainingResult:
    output_dir: Path
    global_step: int
    nonfinite_steps: int
    checkpoints: list[Path]
    validation_grids: list[Path]
    cache_stats: dict[str, int]
    validation_losses: dict[int, dict[str, float]]  # step (0: before training) -> val_* values
    is_main_process: bool


def train(args: argparse.Namespace, extra_loss: ExtraLoss | None = None, *,
          on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainingResult:
    """Train a ControlNet as ``args`` (from :func:`build_arg_parser`) say; ``on_step(step, logs)`` runs after each
    optimizer step on every process."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
    )
    try:
        return _run(args, accelerator, extra_loss, on_step)
    finally:
        accelerator.end_training()


def _run(args, accelerator, extra_loss: ExtraLoss | None, on_step) -> TrainingResult:
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    _setup_logging(accelerator)
    output_dir = Path(args.output_dir)
    device = accelerator.device
    if accelerator.mixed_precision == "fp16" and device.type == "cpu":
        raise SkingenError("--mixed_precision fp16 needs a CUDA GPU; on CPU use --mixed_precision bf16 or no")
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        recover_interrupted_saves(output_dir)
    accelerator.wait_for_everyone()
    resume_path = resolve_resume_checkpoint(output_dir, args.resume_from_checkpoint)
    if args.resume_from_checkpoint and resume_path is None:
        logger.info(f"no checkpoint in {output_dir} yet; starting a new run")
    state = read_training_state(resume_path) if resume_path else {}
    if args.seed is not None and state.get("seed") not in (None, args.seed):
        logger.warning(f"--seed {args.seed} differs from the checkpoint's seed {state['seed']}: the rest of the run "
                       "will see other noise and data order than the interrupted one would have")
    seed = args.seed if args.seed is not None else state.get("seed")
    if seed is None:
        seed = _main_process_value(accelerator, lambda: secrets.randbelow(2**31))
    args.seed = seed
    set_seed(seed)
    repo_id = None
    if args.push_to_hub and accelerator.is_main_process:
        from huggingface_hub import create_repo

        repo_id = create_repo(repo_id=args.hub_model_id or output_dir.name, exist_ok=True, token=args.hub_token).repo_id

    with accelerator.main_process_first():
        dataset = load_training_rows(args)
    pairs = load_validation_pairs(args)

    # Models. Only the ControlNet trains; the rest are frozen and kept in the mixed-precision dtype, except the
    # VAE, which stays fp32 unless an fp16-safe VAE was given (SDXL's own VAE overflows in fp16).
    components = load_sdxl_components(args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant,
                                      vae_model_name_or_path=args.pretrained_vae_model_name_or_path, cache_dir=args.cache_dir)
    vae, unet, noise_scheduler = components.vae, components.unet, components.noise_scheduler
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    size_factor = vae_scale * 2 ** (len(unet.config.block_out_channels) - 1)
    if args.resolution % size_factor:
        raise SkingenError(f"--resolution {args.resolution}: this model needs a multiple of {size_factor} "
                           f"(VAE /{vae_scale}, then the UNet halves the latents {len(unet.config.block_out_channels) - 1} times)")
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    if any(t >= num_train_timesteps for t in args.validation_loss_timesteps or ()):
        raise SkingenError(f"--validation_loss_timesteps {args.validation_loss_timesteps}: the scheduler has timesteps "
                           f"0..{num_train_timesteps - 1}")
    # Trainable weights stay fp32 even under mixed precision (an fp16 ControlNet is upcast).
    controlnet = _place(load_or_init_controlnet(unet, args.controlnet_model_name_or_path), "cpu", torch.float32)
    for frozen in (vae, unet, *components.text_encoders):
        frozen.requires_grad_(False)
    controlnet.train()
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
        controlnet.enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()
        unet.enable_gradient_checkpointing()
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    vae_dtype = weight_dtype if args.pretrained_vae_model_name_or_path else torch.float32

    # Caches: every caption the run can use (dropout's "" and validation prompts included), then latents.
    cache_root = Path(args.embeddings_cache_dir) if args.embeddings_cache_dir else output_dir / "cache"
    captions = set(dataset["text"]) | {pair.prompt for pair in pairs} | ({""} if args.proportion_empty_prompts > 0 else set())
    text_cache, cache_stats = _cache_text_embeddings(args, accelerator, components, captions, weight_dtype, cache_root)
    components.text_encoder_one = components.text_encoder_two = None  # no longer needed anywhere
    latent_cache = latent_keys = None
    if args.cache_latents:
        images = dataset.select_columns(["image"])
        latent_cache, latent_keys, latent_stats = _cache_latents(
            args, accelerator, dataset, vae, vae_dtype, cache_root,
            load_pixels=lambda row: training_pixels(images[row]["image"], args.resolution))
        cache_stats.update(latent_stats)
    vae_on_device = not args.cache_latents or extra_loss is not None
    _place(vae, device if vae_on_device else "cpu", vae_dtype)
    _place(unet, device, weight_dtype)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    crop_flags = (args.crops_coords_top_left_h, args.crops_coords_top_left_w)
    samples = TrainingSamples(
        dataset, resolution=args.resolution, text_cache=text_cache, latent_cache=latent_cache, latent_keys=latent_keys,
        latent_shape=(vae.config.latent_channels, args.resolution // vae_scale, args.resolution // vae_scale),
        num_train_timesteps=num_train_timesteps,
        proportion_empty_prompts=args.proportion_empty_prompts,
        time_ids_crop=None if crop_flags == (None, None) else tuple(v or 0 for v in crop_flags),
        load_pixel_values=bool(getattr(extra_loss, "needs_pixel_values", False)),
    )

    # Steps: the data is a stream of global batches; an optimizer step takes gradient_accumulation_steps of them.
    processes, accumulation = accelerator.num_processes, args.gradient_accumulation_steps
    global_batch_size = args.train_batch_size * processes
    batches_per_epoch = math.ceil(len(samples) / global_batch_size)
    max_train_steps = args.max_train_steps or math.ceil(args.num_train_epochs * batches_per_epoch / accumulation)
    learning_rate = args.learning_rate * (accumulation * global_batch_size if args.scale_lr else 1)
    optimizer = _make_optimizer(args, controlnet.parameters(), learning_rate)
    lr_scheduler = get_scheduler(  # accelerate steps a prepared scheduler once per process
        args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * processes,
        num_training_steps=max_train_steps * processes, num_cycles=args.lr_num_cycles, power=args.lr_power,
    )
    if args.torch_compile:
        unet.compile()
        controlnet.compile()
    if accelerator.state.deepspeed_plugin is not None:  # no dataloader goes through prepare to tell it
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = args.train_batch_size
    controlnet, optimizer, lr_scheduler = accelerator.prepare(controlnet, optimizer, lr_scheduler)
    register_controlnet_hooks(accelerator)

    if resume_path is not None:
        accelerator.load_state(str(resume_path))
        if (state.get("global_batch_size"), state.get("num_rows")) not in ((None, None), (global_batch_size, len(samples))):
            logger.warning(f"{resume_path}: saved with global batch {state.get('global_batch_size')} over "
                           f"{state.get('num_rows')} rows, now {global_batch_size} over {len(samples)}; "
                           "the data order will differ from an uninterrupted run")
        logger.info(f"resumed from {resume_path} at step {state['global_step']}")
    global_step = int(state.get("global_step", 0))
    nonfinite_total = int(state.get("nonfinite_steps", 0))
    nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))

    if accelerator.is_main_process:
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) and k != "hub_token"}
        accelerator.init_trackers(args.tracker_project_name, config=config)
    logger.info(f"{len(samples)} rows, {global_batch_size} per global batch x {accumulation} accumulation, "
                f"{max_train_steps} steps, {processes} process(es), seed {seed}; cache: {cache_stats}")

    sampler = GlobalBatchSampler(len(samples), args.train_batch_size, processes, accelerator.process_index, seed,
                                 global_step * accumulation, max_train_steps * accumulation)
    loader = torch.utils.data.DataLoader(samples, batch_sampler=sampler, collate_fn=collate_samples,
                                         num_workers=args.dataloader_num_workers, pin_memory=device.type == "cuda")
    progress = tqdm(total=max_train_steps, initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process)
    inject_nan = set(args.debug_inject_nan_at_step or ())
    loss_name = f"loss_{extra_loss.name}" if extra_loss is not None else None
    window_finite, window_sums, extra_logs = True, torch.zeros(3, dtype=torch.float64), {}
    grids: list[Path] = []
    last_validated = None
    validation_losses: dict[int, dict[str, float]] = {}

    def run_validation_loss(step: int) -> dict[str, float]:
        if not args.validation_loss_timesteps or not accelerator.is_main_process:
            return {}
        validation_losses[step] = fixed_timestep_losses(
            samples, rows=range(min(args.validation_loss_rows, len(samples))), timesteps=args.validation_loss_timesteps,
            seed=seed, batch_size=args.train_batch_size, device=device, controlnet=accelerator.unwrap_model(controlnet),
            unet=unet, vae=vae, noise_scheduler=noise_scheduler, weight_dtype=weight_dtype, extra_loss=extra_loss,
            step=step)
        logger.info(f"step {step}: losses at fixed timesteps {args.validation_loss_timesteps}: "
                    + ", ".join(f"{k} {v:.4g}" for k, v in validation_losses[step].items()))
        return validation_losses[step]

    if global_step == 0 and (start_values := run_validation_loss(0)):
        accelerator.log(start_values, step=0)

    def run_validation(step: int) -> None:
        nonlocal last_validated
        grids.append(log_validation(pairs, args=args, accelerator=accelerator, vae=vae, unet=unet, controlnet=controlnet,
                                    noise_scheduler=noise_scheduler, text_cache=text_cache, weight_dtype=weight_dtype,
                                    step=step, seed=seed))
        last_validated = step

    for batch in loader:
        batch = batch_to_device(batch, device)
        with accelerator.accumulate(controlnet):
            losses = compute_losses(batch, controlnet=controlnet, unet=unet, vae=vae, noise_scheduler=noise_scheduler,
                                    weight_dtype=weight_dtype, extra_loss=extra_loss, step=global_step)
            loss = losses.loss * float("nan") if global_step + 1 in inject_nan else losses.loss
            # One collective tells every process whether any process saw a non-finite loss, so all skip together.
            zero = torch.zeros((), device=device)
            stats = torch.stack([(~torch.isfinite(loss.detach())).float(), loss.detach().float(),
                                 losses.loss_diffusion.detach().float(),
                                 losses.loss_extra.detach().float() if losses.loss_extra is not None else zero])
            stats = accelerator.reduce(stats, reduction="sum").cpu().double()
            finite = stats[0].item() == 0
            window_finite = window_finite and finite
            window_sums += stats[1:] / (processes * accumulation)
            extra_logs = losses.extra_logs
            if finite:
                accelerator.backward(loss)
            if accelerator.sync_gradients:
                if window_finite:
                    accelerator.clip_grad_norm_(controlnet.parameters(), args.max_grad_norm)
                    optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=args.set_grads_to_none)
        if not accelerator.sync_gradients:
            continue

        global_step += 1
        progress.update(1)
        if window_finite:
            nonfinite_in_a_row = 0
        else:
            nonfinite_total += 1
            nonfinite_in_a_row += 1
            logger.warning(f"step {global_step}: loss is not finite; skipped the update ({nonfinite_in_a_row} in a row)")
        logs = {"loss": window_sums[0].item(), "loss_diffusion": window_sums[1].item()}
        if loss_name:
            logs[loss_name] = window_sums[2].item()
            logs.update(extra_logs)
        progress.set_postfix(**{k: f"{v:.4g}" for k, v in logs.items()})
        logs.update(lr=lr_scheduler.get_last_lr()[0], nonfinite_steps=nonfinite_total)
        if global_step % args.validation_steps == 0 or global_step == max_train_steps:
            logs.update(run_validation_loss(global_step))
        accelerator.log(logs, step=global_step)
        if on_step is not None:
            on_step(global_step, logs)
        window_finite, window_sums = True, torch.zeros(3, dtype=torch.float64)

        if nonfinite_in_a_row >= args.max_nonfinite_steps:
            checkpoints = list_checkpoints(output_dir)
            kept = f"the last good checkpoint is {checkpoints[-1][1]}" if checkpoints else "no checkpoint was saved yet"
            raise SkingenError(
                f"training stopped at step {global_step}: the loss was NaN/inf for {nonfinite_in_a_row} steps in a row "
                f"(--max_nonfinite_steps {args.max_nonfinite_steps}); those updates were skipped and {kept}. Try a lower "
                "--learning_rate, --mixed_precision bf16, or an fp16-safe --pretrained_vae_model_name_or_path, then "
                "--resume_from_checkpoint latest"
            )
        if global_step % args.checkpointing_steps == 0:
            save_checkpoint(accelerator, output_dir, global_step, {
                "global_step": global_step, "seed": seed, "nonfinite_steps": nonfinite_total,
                "nonfinite_in_a_row": nonfinite_in_a_row, "global_batch_size": global_batch_size,
                "num_rows": len(samples), "max_train_steps": max_train_steps,
            }, args.checkpoints_total_limit)
        if pairs and global_step % args.validation_steps == 0 and accelerator.is_main_process:
            run_validation(global_step)
    progress.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_controlnet_weights(accelerator.unwrap_model(controlnet), output_dir)
        if pairs and last_validated != global_step:
            run_validation(global_step)
        write_model_card(args, global_step=global_step, num_rows=len(samples), num_processes=processes,
                         mixed_precision=accelerator.mixed_precision, grid=grids[-1] if grids else None)
        if repo_id is not None:
            from huggingface_hub import upload_folder

            upload_folder(repo_id=repo_id, folder_path=output_dir, commit_message="End of training", token=args.hub_token,
                          ignore_patterns=["checkpoint-*", "cache/*", ".*", f"{args.logging_dir}/*"])
    accelerator.wait_for_everyone()
    return TrainingResult(
        output_dir=output_dir, global_step=global_step, nonfinite_steps=nonfinite_total,
        checkpoints=[path for _, path in list_checkpoints(output_dir)], validation_grids=grids, cache_stats=cache_stats,
        validation_losses=validation_losses, is_main_process=accelerator.is_main_process,
    )


# ---------------------------------------------------------------------------------------------------------------
# The training step


@dataclass
class StepLosses:
    loss: torch.Tensor
    loss_diffusion: torch.Tensor
    loss_extra: torch.Tensor | None = None
    extra_logs: dict[str, float] = field(default_factory=dict)


def fixed_timestep_losses(samples: TrainingSamples, *, rows: Sequence[int], timesteps: Sequence[int], seed: int,
                          batch_size: int, device, controlnet, unet, vae, noise_scheduler, weight_dtype: torch.dtype,
                          extra_loss: ExtraLoss | None, step: int) -> dict[str, float]:
    """The losses of ``rows`` at each of ``timesteps``, with each row's noise fixed by ``seed`` (the same at every
    call), no caption dropout and no gradients: ``val_loss_diffusion``, ``val_loss_<extra>`` and ``val_<log>`` for
    the extra loss's logs, each a mean over the (row, timestep) pairs that produced it."""
    pairs = [(row, timestep) for row in rows for timestep in timesteps]
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            batch = collate_samples([samples.sample(row, sample_seed(seed, -2, row), fixed_timestep=timestep)
                                     for row, timestep in chunk])
            losses = compute_losses(batch_to_device(batch, device), controlnet=controlnet, unet=unet, vae=vae,
                                    noise_scheduler=noise_scheduler, weight_dtype=weight_dtype, extra_loss=extra_loss,
                                    step=step)
            values = {"loss_diffusion": losses.loss_diffusion.item(), **losses.extra_logs}
            if losses.loss_extra is not None:
                values[f"loss_{extra_loss.name}"] = losses.loss_extra.item()
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + float(value) * len(chunk)
                counts[key] = counts.get(key, 0) + len(chunk)
    return {f"val_{key}": sums[key] / counts[key] for key in sums}


def latents_from_batch(batch: dict, vae, weight_dtype: torch.dtype) -> torch.Tensor:
    """Scaled latents: a sample of the VAE's distribution (cached, or encoded now) using the batch's noise."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    if "latent_dist" in batch:
        parameters = batch["latent_dist"]
    else:
        with torch.no_grad():
            parameters = vae.encode(batch["pixel_values"].to(vae.dtype)).latent_dist.parameters
    distribution = DiagonalGaussianDistribution(parameters.float())
    latents = distribution.mean + distribution.std * batch["latent_noise"].float()
    return (latents * vae.config.scaling_factor).to(weight_dtype)


def compute_losses(batch: dict, *, controlnet, unet, vae, noise_scheduler, weight_dtype: torch.dtype,
                   extra_loss: ExtraLoss | None, step: int) -> StepLosses:
    """One forward pass: ControlNet + frozen UNet, epsilon/v MSE, plus the extra loss if any."""
    latents = latents_from_batch(batch, vae, weight_dtype)
    noise = batch["noise"].to(weight_dtype)
    timesteps = batch["timesteps"].long()
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    prompt_embeds = batch["prompt_embeds"].to(weight_dtype)
    added = {"text_embeds": batch["pooled_prompt_embeds"].to(weight_dtype), "time_ids": batch["time_ids"].to(weight_dtype)}
    down_samples, mid_sample = controlnet(
        noisy_latents, timesteps, encoder_hidden_states=prompt_embeds, added_cond_kwargs=added,
        controlnet_cond=batch["conditioning_pixel_values"].to(weight_dtype), return_dict=False,
    )
    model_pred = unet(
        noisy_latents, timesteps, encoder_hidden_states=prompt_embeds, added_cond_kwargs=added,
        down_block_additional_residuals=[s.to(weight_dtype) for s in down_samples],
        mid_block_additional_residual=mid_sample.to(weight_dtype),
    ).sample
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise SkingenError(f"noise scheduler prediction_type {prediction_type!r} is not supported (epsilon, v_prediction)")
    loss_diffusion = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    if extra_loss is None:
        return StepLosses(loss=loss_diffusion, loss_diffusion=loss_diffusion)
    loss_extra, extra_logs = extra_loss(
        batch=batch, model_pred=model_pred, noisy_latents=noisy_latents, latents=latents, timesteps=timesteps,
        noise=noise, noise_scheduler=noise_scheduler, vae=vae, weight_dtype=weight_dtype, step=step,
    )
    return StepLosses(loss_diffusion + loss_extra, loss_diffusion, loss_extra, dict(extra_logs))


# ---------------------------------------------------------------------------------------------------------------
# Helpers of the loop


def _setup_logging(accelerator) -> None:
    import diffusers
    import transformers

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logger.setLevel(logging.INFO if accelerator.is_main_process else logging.ERROR)
    library_level = logging.WARNING if accelerator.is_local_main_process else logging.ERROR
    transformers.utils.logging.set_verbosity(library_level)
    diffusers.utils.logging.set_verbosity(library_level)


def _main_process_value(accelerator, compute: Callable[[], Any]) -> Any:
    """``compute()`` on the main process, the same value on every process."""
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([compute() if accelerator.is_main_process else None])[0]


def _cache_text_embeddings(args, accelerator, components, captions: set[str], dtype, cache_root: Path):
    encoders = components.text_encoders
    cache = TextEmbeddingCache(cache_root, model_fingerprint(
        args.pretrained_model_name_or_path, {"text_encoder": encoders[0], "text_encoder_2": encoders[1]},
        dtype=dtype, revision=args.revision, variant=args.variant,
        subfolders=("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"),
    ))
    missing = _main_process_value(accelerator, lambda: cache.missing(captions))
    if missing:
        for encoder in encoders:
            _place(encoder, accelerator.device, dtype)
        fill_sharded(accelerator, missing, lambda shard: cache.compute(
            shard, components.tokenizers, encoders, progress=accelerator.is_local_main_process))
        if cache.missing(captions):
            raise SkingenError(f"{cache.folder}: some text embeddings were not written; is the folder shared by all processes?")
    return cache, {"text_embeddings_computed": len(missing), "text_embeddings_reused": len(captions) - len(missing)}


def _cache_latents(args, accelerator, dataset, vae, dtype, cache_root: Path, load_pixels):
    import datasets

    separate_vae = args.pretrained_vae_model_name_or_path is not None
    cache = LatentCache(cache_root, model_fingerprint(
        args.pretrained_vae_model_name_or_path or args.pretrained_model_name_or_path, {"vae": vae}, dtype=dtype,
        revision=args.revision, variant=None if separate_vae else args.variant,
        subfolders=() if separate_vae else ("vae",),
    ), args.resolution)
    refs = dataset.select_columns(["image"]).cast_column("image", datasets.Image(decode=False))["image"]
    row_ids = list(dataset["row_id"])
    keys = [LatentCache.key(row_id, image_signature(ref)) for row_id, ref in zip(row_ids, refs)]
    missing = _main_process_value(accelerator, lambda: [i for i, key in enumerate(keys) if not cache.is_cached(key)])
    if missing:
        _place(vae, accelerator.device, dtype)
        fill_sharded(accelerator, missing, lambda shard: cache.compute(
            [(keys[i], row_ids[i], i) for i in shard], load_pixels, vae,
            batch_size=args.train_batch_size, progress=accelerator.is_local_main_process))
        if any(not cache.is_cached(key) for key in keys):
            raise SkingenError(f"{cache.folder}: some latents were not written; is the folder shared by all processes?")
    return cache, keys, {"latents_computed": len(missing), "latents_reused": len(keys) - len(missing)}


def _place(model, device, dtype: torch.dtype | None = None):
    """Move a model, casting only when the dtype changes (diffusers warns on every cast, even a no-op one)."""
    model.to(device)
    if dtype is not None and model.dtype != dtype:
        model.to(dtype=dtype)
    return model


def _make_optimizer(args, params, learning_rate: float):
    if args.use_8bit_adam:
        import bitsandbytes

        optimizer_class = bitsandbytes.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(params, lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                           weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
