"""Batch generation with a trained SDXL, SD3/SD3.5, FLUX.1, Z-Image or Qwen-Image ControlNet, over a dataset split or
prompt/control lists.

    python inference.py --pretrained_model_name_or_path models/stable-diffusion-xl-base-1.0 \\
        --controlnet outputs/controlnet/checkpoint-16000/controlnet \\
        --dataset_dir datasets/keyboard_512 --split validation --output_dir outputs/generated --batch_size 8
    python inference.py ... --prompt "a keyboard skin of a blue sky, iflyskin" --control_image template.png \\
        --num_images_per_prompt 4 --split_elements key_elements

Writes ``images/<row>_s<seed>.png``, ``grids/<row>.png`` (control image(s), then the row's images),
``results.jsonl`` (one record per image: prompt, seed, control image, settings, output path, and the
row's ``box``/``texts`` for evaluate.py) and, with ``--split_elements``, a skin package per image under
``packages/``. The base model folder's ``model_index.json`` picks the pipeline (SDXL, SD3, FLUX, Z-Image, Qwen-Image) and its
default sampler (UniPC for SDXL, flow-matching Euler for SD3/FLUX). Several ``--controlnet`` folders make a
multi-ControlNet. A rerun skips images already listed in results.jsonl (or in the part files of a killed run),
so an interrupted run resumes; ``--overwrite`` regenerates everything. Launched on several processes
(``accelerate launch``, ``torchrun``, ``srun``; docs/cluster.md) each process generates its share of the rows on
its own GPU, and the outputs are the same files as one process writes (each image has its own seed).
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

from skingen import sharding
from skingen.backbones import pipelines
from skingen.config import parse_args_with_config
from skingen.data import dataset as data
from skingen.errors import SkingenError, run_cli
from skingen.generate.jobs import (
    GenerationRow,
    SamplingSettings,
    check_control_counts,
    plan_jobs,
    rows_from_dataset,
    rows_from_prompts,
)
from skingen.generate.pipeline import DTYPES, SCHEDULERS, controlnet_inputs_of, load_controlnet_pipeline, resolve_device
from skingen.generate.results import ResultsLog, settings_record
from skingen.generate.run import generate_all


class ControlImageGroup(argparse.Action):
    """Each ``--control_image`` adds one group of paths (one per ControlNet); a value from --config is replaced, not extended."""

    def __call__(self, parser, namespace, values, option_string=None):
        groups = getattr(namespace, self.dest)
        groups = [] if groups is None or groups is self.default else groups
        setattr(namespace, self.dest, [*groups, list(values)])


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    models = parser.add_argument_group("models")
    models.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help="Base pipeline folder: SDXL, SD3/SD3.5, FLUX.1, Z-Image or Qwen-Image, from its model_index.json (or a "
        "hub id when online).",
    )
    models.add_argument(
        "--controlnet",
        "--controlnet_model_name_or_path",
        dest="controlnet",
        type=str,
        nargs="+",
        default=None,
        help="ControlNet folder(s); several make a MultiControlNet.",
    )
    models.add_argument(
        "--vae",
        "--pretrained_vae_model_name_or_path",
        dest="vae",
        type=str,
        default=None,
        help="A separate VAE folder (e.g. sdxl-vae-fp16-fix for SDXL).",
    )
    models.add_argument("--variant", type=str, default=None, help="Weights variant of the base pipeline, e.g. fp16.")
    models.add_argument(
        "--lora",
        type=str,
        default=None,
        help="A LoRA in diffusers' format for the base model, e.g. the training output of --unet_lora_rank "
        "(the folder holding pytorch_lora_weights.safetensors).",
    )

    inputs = parser.add_argument_group("what to generate")
    inputs.add_argument(
        "--dataset_dir", type=str, default=None, help="Dataset folder: each row's caption and conditioning image."
    )
    inputs.add_argument(
        "--split",
        type=str,
        default=None,
        choices=data.SPLITS,
        help="Split to read (default: validation when the folder has one, else train).",
    )
    inputs.add_argument("--caption_column", type=str, default=None, help="Row key of the prompt (default: text).")
    inputs.add_argument(
        "--conditioning_image_column",
        type=str,
        nargs="+",
        default=None,
        help="Row key(s) of the control image: one for all ControlNets, or one per --controlnet; a ControlNet trained on "
        "several conditioning columns takes that many, in training order (default: conditioning_image).",
    )
    inputs.add_argument(
        "--image_column",
        type=str,
        default=None,
        help="Row key of the target image (optional; names the row, sizes its boxes).",
    )
    inputs.add_argument("--max_samples", type=int, default=None, help="Use only the first N rows.")
    inputs.add_argument("--prompt", type=str, nargs="+", default=None, help="Prompts (instead of --dataset_dir).")
    inputs.add_argument(
        "--control_image",
        type=str,
        nargs="+",
        action=ControlImageGroup,
        default=None,
        help="Control images paired with --prompt: one for all prompts, one per prompt, or one prompt for all images. "
        "Repeat the flag to give each --controlnet its own images.",
    )

    sampling = parser.add_argument_group("sampling")
    sampling.add_argument(
        "--scheduler",
        type=str,
        default=None,
        choices=list(SCHEDULERS),
        help="Sampler (default: unipc for SDXL; flow_euler, the only one, for the flow-matching families).",
    )
    sampling.add_argument("--num_inference_steps", type=int, default=20)
    sampling.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help="Classifier-free guidance for SDXL/SD3/Z-Image (default 5.0; Z-Image-Turbo: 0); FLUX.1-dev's distilled "
        "guidance (default 3.5); Qwen-Image's true_cfg_scale (default 4.0, against --negative_prompt, default ' ').",
    )
    sampling.add_argument("--negative_prompt", type=str, default=None)
    sampling.add_argument("--num_images_per_prompt", type=int, default=1)
    sampling.add_argument(
        "--seed",
        type=int,
        default=0,
        help="Base seed: image k of row i uses seed + i * num_images_per_prompt + k (a row's 'seed' field replaces seed + i * n).",
    )
    sampling.add_argument(
        "--controlnet_conditioning_scale",
        type=float,
        nargs="+",
        default=[1.0],
        help="One value, or one per --controlnet.",
    )
    sampling.add_argument(
        "--control_guidance_start", type=float, nargs="+", default=[0.0], help="Fraction of steps where control starts."
    )
    sampling.add_argument(
        "--control_guidance_end", type=float, nargs="+", default=[1.0], help="Fraction of steps where control stops."
    )
    sampling.add_argument(
        "--resolution", type=int, default=None, help="Square output size (default: each control image's size)."
    )
    sampling.add_argument("--height", type=int, default=None, help="Output height (overrides --resolution).")
    sampling.add_argument("--width", type=int, default=None, help="Output width (overrides --resolution).")

    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--batch_size", type=int, default=4, help="Images per pipeline call.")
    runtime.add_argument(
        "--dtype",
        type=str,
        default=None,
        choices=list(DTYPES),
        help="Default: fp32 on CPU; on CUDA fp16 for SDXL, bf16 for the flow-matching families.",
    )
    runtime.add_argument("--device", type=str, default=None, help="Default: cuda when available, else cpu.")
    runtime.add_argument(
        "--enable_xformers_memory_efficient_attention",
        action="store_true",
        help="xformers attention instead of PyTorch SDPA.",
    )
    runtime.add_argument(
        "--enable_model_cpu_offload",
        action="store_true",
        help="Keep models on the CPU, each moved to the GPU when used.",
    )
    runtime.add_argument(
        "--torch_compile",
        action="store_true",
        help="torch.compile the UNet/transformer and ControlNet (slow first batch).",
    )

    outputs = parser.add_argument_group("outputs")
    outputs.add_argument(
        "--output_dir", type=str, default=None, help="Folder for images/, grids/, packages/ and results.jsonl."
    )
    outputs.add_argument(
        "--split_elements",
        type=str,
        default=None,
        metavar="LAYOUT",
        help="Also cut every image into a skin package with this layout.",
    )
    outputs.add_argument(
        "--overwrite",
        action="store_true",
        help="Regenerate every image and start a new results.jsonl (default: keep and skip finished images).",
    )

    args = parse_args_with_config(parser, argv)
    # --config may give a single value where the flag takes a list.
    for name in (
        "controlnet",
        "conditioning_image_column",
        "prompt",
        "controlnet_conditioning_scale",
        "control_guidance_start",
        "control_guidance_end",
    ):
        value = getattr(args, name)
        if value is not None and not isinstance(value, list):
            setattr(args, name, [value])
    if isinstance(args.control_image, str):
        args.control_image = [[args.control_image]]
    elif args.control_image and not any(isinstance(item, list) for item in args.control_image):
        args.control_image = [args.control_image]  # a flat list from --config is one group
    if args.pretrained_model_name_or_path is None:
        parser.error("--pretrained_model_name_or_path is required")
    if not args.controlnet:
        parser.error("--controlnet is required (one or more ControlNet folders)")
    if args.output_dir is None:
        parser.error("--output_dir is required")
    if (args.dataset_dir is None) == (args.prompt is None):
        parser.error("give either --dataset_dir, or --prompt with --control_image")
    if args.prompt is not None and not args.control_image:
        parser.error("--prompt needs --control_image")
    if args.dataset_dir is not None and args.control_image:
        parser.error("--control_image goes with --prompt; with --dataset_dir the rows name their control images")
    for name in ("num_inference_steps", "num_images_per_prompt", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.resolution is not None:
        args.height = args.height or args.resolution
        args.width = args.width or args.resolution
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = read_generation_rows(args)
    check_control_counts(rows, controlnet_inputs_of(args.controlnet))
    family = pipelines.family_of_pipeline(args.pretrained_model_name_or_path)
    scheduler = args.scheduler or family.default_scheduler
    pipelines.check_scheduler(family, scheduler)
    group = sharding.process_group()
    launched_device = group.device if group.size > 1 and args.device is None else None  # each process its own GPU
    device = launched_device or resolve_device(args.device)
    dtype = args.dtype or (family.cuda_dtype if device.type == "cuda" else "fp32")
    sampling = SamplingSettings(
        num_inference_steps=args.num_inference_steps,
        guidance_scale=family.default_guidance_scale if args.guidance_scale is None else args.guidance_scale,
        negative_prompt=args.negative_prompt,
        controlnet_conditioning_scale=tuple(args.controlnet_conditioning_scale),
        control_guidance_start=tuple(args.control_guidance_start),
        control_guidance_end=tuple(args.control_guidance_end),
    )
    settings = settings_record(
        pretrained_model_name_or_path=args.pretrained_model_name_or_path,
        controlnet_model_name_or_path=args.controlnet,
        vae_model_name_or_path=args.vae,
        variant=args.variant,
        scheduler=scheduler,
        dtype=dtype,
        sampling=sampling,
        lora=args.lora,
    )
    jobs = plan_jobs(
        rows,
        num_images_per_prompt=args.num_images_per_prompt,
        seed=args.seed,
        height=args.height,
        width=args.width,
        size_multiple=family.size_multiple,
    )
    load_pipeline = functools.partial(
        load_controlnet_pipeline,
        args.pretrained_model_name_or_path,
        args.controlnet,
        vae_model_name_or_path=args.vae,
        variant=args.variant,
        scheduler=scheduler,
        dtype=dtype,
        device=device,
        enable_xformers_memory_efficient_attention=args.enable_xformers_memory_efficient_attention,
        enable_model_cpu_offload=args.enable_model_cpu_offload,
        torch_compile=args.torch_compile,
        lora=args.lora,
    )
    results = ResultsLog(args.output_dir, overwrite=args.overwrite)
    summary = generate_all(
        load_pipeline, jobs, sampling, settings, results, batch_size=args.batch_size, split_layout=args.split_elements
    )
    if not group.is_main:
        return
    print(
        f"{summary.generated} image(s) generated, {summary.skipped} already done, {summary.grids} grid(s)"
        + (f", {summary.packages} skin package(s)" if args.split_elements else "")
        + f"; results in {results.path}"
    )


def read_generation_rows(args) -> list[GenerationRow]:
    if args.prompt is not None:
        return rows_from_prompts(args.prompt, args.control_image)
    if Path(args.output_dir).expanduser().resolve() == Path(args.dataset_dir).expanduser().resolve():
        raise SkingenError(
            f"--output_dir {args.output_dir} is the dataset folder; choose another folder so the dataset stays untouched"
        )
    split = args.split
    if split is None:
        split = "validation" if "validation" in data.existing_splits(args.dataset_dir) else "train"
        print(f"reading the {split} split of {args.dataset_dir}")
    return rows_from_dataset(
        args.dataset_dir,
        split,
        caption_column=args.caption_column,
        conditioning_image_columns=args.conditioning_image_column,
        image_column=args.image_column,
        max_samples=args.max_samples,
    )


if __name__ == "__main__":
    run_cli(main)
