"""The trainer's optional techniques as flags: diffusers' remaining flags, EMA, loss weighting, buckets, UNet LoRA,
several conditioning images.

``add_option_args(parser)`` adds them to the trainer's parser and ``check_option_args(args)`` rejects combinations
that cannot work before anything is loaded. Flag names and meanings follow diffusers' training examples
(``train_controlnet_sdxl.py``, ``train_text_to_image.py``, ``train_text_to_image_lora_sdxl.py``) and, where
diffusers has none, kohya sd-scripts (the bucket flags).
"""

from __future__ import annotations

import argparse
import importlib.util

from PIL import Image

from ..errors import SkingenError, require

# torchvision.transforms.InterpolationMode's names (what diffusers' --image_interpolation_mode accepts), as the
# PIL filters torchvision itself uses for PIL images; no torchvision needed.
INTERPOLATION_MODES = {
    "nearest": Image.NEAREST,
    "nearest_exact": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "box": Image.BOX,
    "hamming": Image.HAMMING,
    "lanczos": Image.LANCZOS,
}


def lr_scheduler_names() -> tuple[str, ...]:
    """Every scheduler ``diffusers.optimization.get_scheduler`` knows."""
    from diffusers.optimization import SchedulerType

    return tuple(kind.value for kind in SchedulerType)


def tracker_names() -> tuple[str, ...]:
    """Every tracker accelerate knows (``all``: every installed one), plus ``none``."""
    from accelerate.utils import LoggerType

    return (*(kind.value for kind in LoggerType), "none")


def add_option_args(parser: argparse.ArgumentParser) -> None:
    """Add the option flags (each off by default, so a plain run trains as before)."""
    compat = parser.add_argument_group("diffusers compatibility")
    compat.add_argument("--tokenizer_name", type=str, default=None,
                        help="A tokenizer (folder or hub id) to use instead of the base model's first tokenizer "
                             "(as diffusers' train_controlnet.py; its SDXL script accepts and ignores the flag).")
    compat.add_argument("--enable_npu_flash_attention", action="store_true",
                        help="Flash attention on Ascend NPUs (needs torch_npu and an NPU).")
    compat.add_argument("--image_interpolation_mode", choices=tuple(INTERPOLATION_MODES), default="lanczos",
                        help="Resampling filter when resizing training and conditioning images (torchvision's "
                             "InterpolationMode names, as diffusers; default lanczos).")
    compat.add_argument("--lr_step_rules", type=str, default=None,
                        help="Rules of --lr_scheduler piecewise_constant, e.g. '1:10,0.1:20,0.01' (diffusers' "
                             "step_rules: multiplier:step pairs, then the final multiplier).")

    ema = parser.add_argument_group("EMA")
    ema.add_argument("--use_ema", action="store_true",
                     help="Keep an exponential moving average of the ControlNet weights (diffusers' EMAModel): saved "
                          "in checkpoints and as a ControlNet in OUTPUT_DIR/ema, used for the validation grids.")
    ema.add_argument("--ema_decay", type=float, default=0.9999, help="Largest EMA decay (diffusers' EMAModel decay).")
    ema.add_argument("--ema_update_after_step", type=int, default=0,
                     help="The EMA copies the weights until this many optimizer steps have passed, then averages.")
    ema.add_argument("--foreach_ema", action="store_true", help="Faster foreach implementation of the EMA update.")

    loss = parser.add_argument_group("loss")
    loss.add_argument("--snr_gamma", type=float, default=None,
                      help="Min-SNR loss weighting with this gamma (recommended 5.0; arXiv 2303.09556), for epsilon "
                           "and v-prediction, as diffusers' train_text_to_image.py.")
    loss.add_argument("--noise_offset", type=float, default=0.0,
                      help="Offset noise: add this times a per-sample, per-channel normal draw to the noise (e.g. 0.05).")
    loss.add_argument("--input_perturbation", type=float, default=0.0,
                      help="Input perturbation (arXiv 2301.11706): noise the latents with noise + this times fresh "
                           "noise while the target stays the noise (recommended 0.1).")

    buckets = parser.add_argument_group("aspect-ratio buckets (kohya sd-scripts' flags)")
    buckets.add_argument("--enable_bucket", action="store_true",
                         help="Train each image at the bucket size closest to its aspect ratio, about --resolution "
                              "squared pixels, instead of a centre-cropped square; batches hold one bucket.")
    buckets.add_argument("--min_bucket_reso", type=int, default=256, help="Smallest bucket side.")
    buckets.add_argument("--max_bucket_reso", type=int, default=1024, help="Largest bucket side.")
    buckets.add_argument("--bucket_reso_steps", type=int, default=64,
                         help="Bucket sides are multiples of this (a multiple of the model's size factor, 64 for SDXL).")

    lora = parser.add_argument_group("UNet LoRA")
    lora.add_argument("--unet_lora_rank", type=int, default=0,
                      help="Also train a LoRA of this rank on the UNet's attention projections (0: off), so the style "
                           "and the trigger word are learned; saved as OUTPUT_DIR/pytorch_lora_weights.safetensors.")

    conditioning = parser.add_argument_group("several conditioning images")
    conditioning.add_argument("--conditioning_dropout_prob", type=float, nargs="+", default=None,
                              help="Per --conditioning_image_column, the probability of replacing that image with "
                                   "black for a sample (one value for all columns, or one per column).")


def check_option_args(args: argparse.Namespace) -> None:
    """Reject option values and combinations that cannot work; find optional packages a flag needs."""
    if args.lr_scheduler == "piecewise_constant":
        require(args.lr_step_rules is not None,
                 "--lr_scheduler piecewise_constant needs --lr_step_rules, e.g. '1:100,0.1:200,0.01'")
    if args.lr_step_rules is not None:
        *pairs, last = args.lr_step_rules.split(",")
        try:
            [(float(m), int(n)) for m, n in (pair.split(":") for pair in pairs)]
            float(last)
        except ValueError:
            raise SkingenError(f"--lr_step_rules {args.lr_step_rules!r}: expected multiplier:step pairs and a final "
                               "multiplier, e.g. '1:100,0.1:200,0.01'") from None
    check_report_to(args.report_to)
    if args.enable_npu_flash_attention:
        from diffusers.utils import is_torch_npu_available

        require(is_torch_npu_available(),
                 "--enable_npu_flash_attention needs an Ascend NPU and torch_npu; none is available here. Drop the "
                 "flag (PyTorch's SDPA attention is the default on GPUs and CPUs)")
    require(0.0 < args.ema_decay <= 1.0, f"--ema_decay must be in (0, 1], got {args.ema_decay}")
    require(args.ema_update_after_step >= 0,
             f"--ema_update_after_step must not be negative, got {args.ema_update_after_step}")
    require(args.snr_gamma is None or args.snr_gamma > 0, f"--snr_gamma must be positive, got {args.snr_gamma}")
    require(args.noise_offset >= 0, f"--noise_offset must not be negative, got {args.noise_offset}")
    require(args.input_perturbation >= 0, f"--input_perturbation must not be negative, got {args.input_perturbation}")
    require(args.unet_lora_rank >= 0, f"--unet_lora_rank must not be negative (0: off), got {args.unet_lora_rank}")
    if args.unet_lora_rank:
        require(importlib.util.find_spec("peft") is not None, "--unet_lora_rank needs peft: pip install peft")
    if args.enable_bucket:
        require(0 < args.min_bucket_reso <= args.max_bucket_reso,
                 f"--min_bucket_reso {args.min_bucket_reso} must be positive and at most --max_bucket_reso "
                 f"{args.max_bucket_reso}")
        require(args.bucket_reso_steps > 0 and args.bucket_reso_steps % 8 == 0,
                 f"--bucket_reso_steps must be a positive multiple of 8, got {args.bucket_reso_steps}")
        require(args.min_bucket_reso <= args.resolution <= args.max_bucket_reso,
                 f"--resolution {args.resolution} must lie between --min_bucket_reso {args.min_bucket_reso} and "
                 f"--max_bucket_reso {args.max_bucket_reso}: the buckets hold about --resolution squared pixels")
        require(args.crops_coords_top_left_h is None and args.crops_coords_top_left_w is None,
                 "--crops_coords_top_left_h/_w fix one crop for every image; with --enable_bucket each image keeps "
                 "its own crop in SDXL's time ids, so drop them")
    columns = conditioning_columns(args)
    probabilities = args.conditioning_dropout_prob
    if probabilities is not None:
        if not isinstance(probabilities, list):
            probabilities = args.conditioning_dropout_prob = [probabilities]  # one value from a --config file
        require(len(probabilities) in (1, len(columns)),
                 f"got {len(probabilities)} --conditioning_dropout_prob values for {len(columns)} conditioning "
                 "column(s); give one value for all columns or one per --conditioning_image_column")
        require(all(0.0 <= p <= 1.0 for p in probabilities),
                 f"--conditioning_dropout_prob values must be between 0 and 1, got {probabilities}")
    require(len(set(columns)) == len(columns),
             f"--conditioning_image_column names a column twice: {columns}")
    for entry in getattr(args, "validation_image", None) or ():
        require(len(entry.split(",")) == len(columns),
                 f"--validation_image {entry}: give one image per --conditioning_image_column ({len(columns)}), "
                 "comma-separated in column order, e.g. template.png,canny.png")


def check_report_to(report_to: str) -> None:
    """``--report_to``: a tracker accelerate knows (or several, comma-separated), installed; ``all`` or ``none``."""
    from accelerate.tracking import get_available_trackers

    known = tracker_names()
    names = [name.strip() for name in report_to.split(",")]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SkingenError(f"--report_to {report_to}: unknown tracker {unknown[0]!r}; choose from {', '.join(known)}")
    available = {str(getattr(kind, "value", kind)) for kind in get_available_trackers()}
    missing = [name for name in names if name not in ("all", "none") and name not in available]
    if missing:
        raise SkingenError(f"--report_to {missing[0]} needs that tracker's package: pip install {missing[0]} "
                           "(or --report_to none)")


def trackers(report_to: str) -> str | list[str] | None:
    """What ``Accelerator(log_with=...)`` takes for ``--report_to``."""
    names = [name.strip() for name in report_to.split(",")]
    if names == ["none"]:
        return None
    return names[0] if len(names) == 1 else names


def conditioning_columns(args: argparse.Namespace) -> list[str | None]:
    """The conditioning image columns, in channel order (``[None]``: the dataset form's default column)."""
    columns = args.conditioning_image_column
    if columns is None:
        return [None]
    return [columns] if isinstance(columns, str) else list(columns)


def conditioning_dropout(args: argparse.Namespace) -> list[float]:
    """The dropout probability of each conditioning column."""
    columns = conditioning_columns(args)
    probabilities = args.conditioning_dropout_prob or [0.0]
    return list(probabilities) * len(columns) if len(probabilities) == 1 else list(probabilities)


def scaled_step_rules(rules: str | None, processes: int) -> str | None:
    """``--lr_step_rules`` in scheduler steps: accelerate steps a prepared scheduler once per process per optimizer
    step, so every step boundary is multiplied by the number of processes."""
    if rules is None or processes == 1:
        return rules
    *pairs, last = rules.split(",")
    scaled = []
    for pair in pairs:
        multiplier, step = pair.split(":")
        scaled.append(f"{multiplier}:{int(step) * processes}")
    return ",".join([*scaled, last])


def interpolation_filter(mode: str) -> int:
    """The PIL resampling filter of ``--image_interpolation_mode``."""
    if mode not in INTERPOLATION_MODES:
        raise SkingenError(f"--image_interpolation_mode {mode}: choose one of {', '.join(INTERPOLATION_MODES)}")
    return INTERPOLATION_MODES[mode]
