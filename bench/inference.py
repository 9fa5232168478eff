"""Images/s of inference.py's batched recipe vs the seed's recipe, in the same run, as a Markdown table.

    python bench/inference.py                                   # CPU: tiny and small presets at their default sizes
    python bench/inference.py --device cuda --sdxl_shaped       # GPU: SDXL-base-shaped models at 1024, 20 steps

Ours: weights on the device in the run's dtype (fp16 on CUDA, fp32 on CPU), SDPA attention, ``--batch_size``
images per pipeline call, one generator per image. The seed's recipe (its README): fp16,
``enable_model_cpu_offload()``, one image per call. Offload needs an accelerator, so on CPU the seed recipe
row is one image per call in fp32. ``--sdxl_shaped`` builds randomly initialised UNet/ControlNet/VAE/text
encoders from SDXL base's configs (nothing is downloaded): the speed is SDXL's, the images are noise.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from skingen.backbones.sdxl import SDXLComponents  # noqa: E402
from skingen.generate.jobs import GenerationRow, ImageJob, SamplingSettings, load_control_image  # noqa: E402
from skingen.generate.pipeline import (  # noqa: E402
    generate_batch,
    load_controlnet_pipeline,
    make_scheduler,
    place_pipeline,
    resolve_device,
)
from skingen.testing.tiny_sdxl import PRESETS, build_clip_tokenizer, build_tiny_sdxl  # noqa: E402

# stable-diffusion-xl-base-1.0/scheduler/scheduler_config.json
SDXL_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "clip_sample": False,
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--presets",
        nargs="+",
        default=["tiny", "small"],
        choices=sorted(PRESETS),
        help="Tiny presets to time (without --sdxl_shaped).",
    )
    parser.add_argument(
        "--sdxl_shaped", action="store_true", help="SDXL-base-shaped random models instead of the presets."
    )
    parser.add_argument(
        "--resolution", type=int, default=None, help="Default: 1024 for --sdxl_shaped, else each preset's default size."
    )
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument("--num_images", type=int, default=8, help="Images timed per recipe.")
    parser.add_argument("--batch_size", type=int, default=4, help="Our recipe's images per pipeline call.")
    parser.add_argument("--torch_compile", action="store_true", help="Also time our recipe with torch.compile.")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    rows = []
    if args.sdxl_shaped:
        pipeline = assemble_pipeline(
            *sdxl_shaped_models(device), make_scheduler("unipc", SDXL_SCHEDULER_CONFIG)
        )
        rows += compare_recipes(pipeline, "SDXL-shaped", args.resolution or 1024, device, args)
    else:
        for preset in args.presets:
            with tempfile.TemporaryDirectory() as tmp:
                build_tiny_sdxl(tmp, preset=preset, controlnet=True)
                pipeline = load_controlnet_pipeline(
                    tmp, [Path(tmp) / "controlnet"], dtype="fp32", device="cpu"
                )
                rows += compare_recipes(
                    pipeline, preset, args.resolution or PRESETS[preset]["default_resolution"], device, args
                )
    print(f"\ndevice: {describe(device)}; torch {torch.__version__}; threads {torch.get_num_threads()}\n")
    print("| model | size | steps | recipe | dtype | images/call | images | seconds | images/s | vs seed recipe |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(value) for value in row) + " |")


def compare_recipes(pipeline, model: str, resolution: int, device: torch.device, args) -> list[list]:
    """Time our recipe, then the seed's, on the same weights (offload last: it moves the models to the CPU)."""
    jobs = bench_jobs(args.num_images, resolution)
    settings = SamplingSettings(num_inference_steps=args.num_inference_steps)
    dtype = "fp16" if device.type == "cuda" else "fp32"
    results = []

    place_pipeline(pipeline, dtype=dtype, device=device)
    ours = time_recipe(pipeline, jobs, settings, args.batch_size, device)
    results.append(("ours: on device, batched", dtype, args.batch_size, ours))
    if args.torch_compile:
        place_pipeline(pipeline, dtype=dtype, device=device, torch_compile=True)
        compiled = time_recipe(pipeline, jobs, settings, args.batch_size, device)
        results.append(("ours + torch.compile", dtype, args.batch_size, compiled))
        pipeline.unet, pipeline.controlnet = pipeline.unet._orig_mod, pipeline.controlnet._orig_mod

    if device.type == "cuda":
        place_pipeline(pipeline, dtype="fp16", device=device, enable_model_cpu_offload=True)
        seed = time_recipe(pipeline, jobs, settings, 1, device, seed_generators=True)
        results.append(("seed: fp16 + model CPU offload, 1/call", "fp16", 1, seed))
    else:
        seed = time_recipe(pipeline, jobs, settings, 1, device, seed_generators=True)
        results.append(("seed: 1/call (offload needs a GPU)", dtype, 1, seed))

    return [
        [
            model,
            f"{resolution}x{resolution}",
            args.num_inference_steps,
            recipe,
            dt,
            per_call,
            len(jobs),
            f"{secs:.2f}",
            f"{len(jobs) / secs:.3f}",
            f"{seed / secs:.2f}x",
        ]
        for recipe, dt, per_call, secs in results
    ]


def bench_jobs(count: int, resolution: int) -> list[ImageJob]:
    """``count`` prompts, each with a keyboard-template-like control image at ``resolution``."""
    folder = Path(tempfile.mkdtemp(prefix="bench_inference_"))
    jobs = []
    for index in range(count):
        path = folder / f"control_{index}.png"
        template_control(index, resolution).save(path)
        row = GenerationRow(
            row_id=f"{index:04d}",
            prompt=f"a keyboard skin of style {index}, iflyskin",
            control_images=(str(path),),
            where=f"bench {index}",
        )
        jobs.append(ImageJob(row=row, seed=index, height=resolution, width=resolution))
    return jobs


def template_control(index: int, resolution: int) -> Image.Image:
    image = Image.new("RGB", (resolution, resolution), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    step = resolution // 10
    draw.rectangle((0, 0, resolution - 1, step), outline=(255, 255, 255), width=2)
    for row in range(4):
        for col in range(10):
            x0, y0 = col * step + 2 + index % 3, resolution // 3 + row * step + 2
            draw.rectangle((x0, y0, x0 + step - 4, y0 + step - 4), outline=(255, 255, 255), width=2)
    return image


def time_recipe(
    pipeline, jobs, settings, batch_size: int, device: torch.device, seed_generators: bool = False
) -> float:
    """Seconds to generate all ``jobs`` (after one untimed warm-up call of the same batch size)."""
    run = seed_recipe_call if seed_generators else generate_batch
    run(pipeline, jobs[:batch_size], settings)
    synchronize(device)
    start = time.perf_counter()
    for first in range(0, len(jobs), batch_size):
        run(pipeline, jobs[first : first + batch_size], settings)
    synchronize(device)
    return time.perf_counter() - start


def seed_recipe_call(pipeline, jobs, settings) -> list[Image.Image]:
    """The seed README's call: one prompt, a PIL control image, ``torch.manual_seed`` as the generator."""
    (job,) = jobs
    image = load_control_image(job.row.control_images[0])
    return pipeline(
        prompt=job.row.prompt,
        image=image,
        num_inference_steps=settings.num_inference_steps,
        generator=torch.manual_seed(job.seed),
        height=job.height,
        width=job.width,
    ).images


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def assemble_pipeline(components: SDXLComponents, controlnets: Sequence, scheduler):
    """SDXL components + ControlNet(s) -> ``StableDiffusionXLControlNetPipeline`` (models stay where they are): the
    SDXL-shaped random-weight models exist only in memory, so they skip inference's ``from_pretrained``."""
    from diffusers import StableDiffusionXLControlNetPipeline

    return StableDiffusionXLControlNetPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder_one,
        text_encoder_2=components.text_encoder_two,
        tokenizer=components.tokenizer_one,
        tokenizer_2=components.tokenizer_two,
        unet=components.unet,
        controlnet=controlnets[0] if len(controlnets) == 1 else list(controlnets),
        scheduler=scheduler,
        add_watermarker=False,  # the invisible watermark changes pixels; outputs are research data
    )


def sdxl_shaped_models(device: torch.device) -> tuple[SDXLComponents, list]:
    """SDXL base's UNet, VAE and text encoders (and a ControlNet from the UNet), random weights, built on ``device``."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = build_clip_tokenizer()
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    with torch.device(device):
        text_encoder_one = CLIPTextModel(
            CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu", **ids)
        )  # fmt: skip
        text_encoder_two = CLIPTextModelWithProjection(
            CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                           max_position_embeddings=77, projection_dim=1280, hidden_act="gelu", **ids)
        )  # fmt: skip
        unet = UNet2DConditionModel(
            sample_size=128,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            attention_head_dim=(5, 10, 20),
            transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        controlnet = ControlNetModel.from_unet(unet)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            sample_size=1024,
            scaling_factor=0.13025,
            force_upcast=True,
        )
    components = SDXLComponents(
        tokenizer_one=tokenizer,
        tokenizer_two=build_clip_tokenizer(),
        text_encoder_one=text_encoder_one,
        text_encoder_two=text_encoder_two,
        vae=vae,
        unet=unet,
        noise_scheduler=None,
    )
    return components, [controlnet]


if __name__ == "__main__":
    main()
