"""Does a Z-Image / Qwen-Image ControlNet trained by skingen steer generation? Tiny pipelines, 3 seeds, CPU.

    OMP_NUM_THREADS=1 python bench/new_backbones_evidence.py --families zimage --out bench/new_backbones_evidence.json
    OMP_NUM_THREADS=1 python bench/new_backbones_evidence.py --families qwenimage --vae_steps 3000 --out bench/new_backbones_evidence.json

Figures and what it took: docs/backbones.md ("Evidence on the tiny pipelines"). Z-Image, 3 seeds: held-out
flow-matching loss 1.397 +- 0.030 -> 1.191 +- 0.037, edge F1 of generated held-out layouts of family B
0.560 +- 0.030 -> 0.615 +- 0.045 (up in every seed), of held-out family A 0.298 -> 0.547. Qwen-Image (its VAE fitted
3000 steps at 1e-4): edge F1 of generated B layouts 0.173 +- 0.077 -> 0.311 +- 0.069 (up in 2 of 3 seeds), held-out
A 0.171 -> 0.454 (3 of 3); its held-out loss did not fall on average (0.700 -> 0.706, lower in 2 of 3).

Per family, once (cached in --work_dir): a corpus of layout family A (``LAYOUTS_A``: 2-4 key rectangles scattered
on a background, any contrasting colours; the control is their outlines, as a Canny control) drawn from its own seed; a tiny
VAE of the family's class fitted on its images and controls (``skingen.testing.vae_fitting``: the control goes
through the VAE in both families); and a base pre-trained on the corpus (``skingen.testing.base_pretraining``,
the family's tiny builder around that VAE). Then per seed: a ControlNet trained ``--steps`` steps through the
family's trainer script on fresh family-A rows, and held-out rows of another layout family B (``LAYOUTS_B``:
2-3 rows of 3-5 equal keys, as a keyboard: other counts and shapes), on which

- the held-out flow-matching loss at fixed noise (the trainer's ``--validation_loss_timesteps`` on the
  ``validation`` split, family B, the same noise before and after) of the trained ControlNet against the untrained;
- edge F1 (skingen.evaluate.metrics.edge_f1) between images generated for the held-out controls by diffusers' own
  ControlNet pipeline (``from_pretrained`` of the base and of the trained folder) and those controls, against the
  untrained ControlNet with the same seeds (its zero-initialised outputs leave the base as it is). Also on held-out
  family-A rows, and the VAE's own reconstructions of the family-B images (what its decoder allows at best).

Tuned on family A (and Z-Image seed 0) only; family B is read for the figures. Prints a markdown table (mean and standard deviation over
seeds) and writes the per-seed values and the per-family fits as JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from skingen.errors import run_cli  # noqa: E402

FAMILIES = ("zimage", "qwenimage")
SIZE = 64
TIMESTEPS = ("250", "500", "750")
PROMPT = "a keyboard skin"
# Qwen-Image's video VAE runs 3-D convolutions (3x the work of the 2-D ones) and its per-pixel RMS norm learned
# nothing in 300 steps at 5e-3 with the widths of assets/tiny_skin_vae: half the width (and the rate below).
VAE_WIDTHS = {"zimage": (16, 32, 32, 32), "qwenimage": (8, 16, 16, 16)}
# The RMS-normed Qwen-Image VAE collapses to one latent at rates of 1e-3 and above, and a posterior as wide as the
# images' latent spread (log-variance -6) hides that spread in noise: 1e-4 and -12 (docs/backbones.md).
VAE_LEARNING_RATE = {"zimage": 5e-3, "qwenimage": 1e-4}
VAE_INITIAL_LOGVAR = {"zimage": -6.0, "qwenimage": -12.0}
# Key outlines 3 px wide, drawn inside the key (its edge is the outer line, within edge F1's 2 px of every line
# pixel): through the tiny VAE (8x down, 4 channels) 1 px outlines came back black (L1 0.066; all-black: 0.064).
CONTROL_LINE_WIDTH = 3


@dataclass(frozen=True)
class LayoutStyle:
    """How a family of key layouts is drawn; colours are any pair whose grey levels differ by at least 80."""

    arrangement: str  # "scattered": keys anywhere, of random sizes; "rows": rows of equal keys with gaps, as a keyboard
    keys: tuple[int, int]  # scattered: key count range; rows: row count range (keys per row: KEYS_PER_ROW)


LAYOUTS_A = LayoutStyle("scattered", keys=(2, 4))
LAYOUTS_B = LayoutStyle("rows", keys=(2, 3))
KEYS_PER_ROW = (3, 5)


def colour_pair(rng: random.Random) -> tuple[tuple[int, ...], tuple[int, ...]]:
    def grey(colour):
        return sum(colour) / 3

    background = tuple(rng.randrange(256) for _ in range(3))
    while True:
        key = tuple(rng.randrange(256) for _ in range(3))
        if abs(grey(key) - grey(background)) >= 80:
            return background, key


def key_boxes(rng: random.Random, style: LayoutStyle) -> list[tuple[int, int, int, int]]:
    if style.arrangement == "scattered":
        boxes = []
        for _ in range(rng.randint(*style.keys)):
            x0, y0 = rng.randrange(2, SIZE - 20), rng.randrange(2, SIZE - 16)
            boxes.append((x0, y0, x0 + rng.randrange(10, 20), y0 + rng.randrange(8, 14)))
        return boxes
    rows, boxes = rng.randint(*style.keys), []
    height = rng.randrange(8, 13)
    top = rng.randrange(3, SIZE - rows * (height + 4))
    for row in range(rows):
        keys, gap = rng.randint(*KEYS_PER_ROW), rng.randrange(3, 6)
        width = (SIZE - 8 - gap * (keys - 1)) // keys
        y0 = top + row * (height + 4)
        boxes += [(4 + k * (width + gap), y0, 4 + k * (width + gap) + width - 1, y0 + height - 1) for k in range(keys)]
    return boxes


def write_layouts(root: Path, seed: int, splits: dict[str, tuple[LayoutStyle, int]]) -> None:
    """For each split, ``count`` layouts of ``style`` (image: filled keys; control: their outlines) drawn from
    ``seed``, written as ``<split>.jsonl`` rows of a dataset folder."""
    rng = random.Random(seed)
    for folder in ("images", "conditioning_images"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for split, (style, count) in splits.items():
        records = []
        for index in range(count):
            background, fill = colour_pair(rng)
            image, control = Image.new("RGB", (SIZE, SIZE), background), Image.new("RGB", (SIZE, SIZE))
            for box in key_boxes(rng, style):
                ImageDraw.Draw(image).rectangle(box, fill=fill)
                ImageDraw.Draw(control).rectangle(box, outline=(255, 255, 255), width=CONTROL_LINE_WIDTH)
            name = f"{split}_{index}.png"
            image.save(root / "images" / name)
            control.save(root / "conditioning_images" / name)
            records.append({"text": PROMPT, "image": f"images/{name}", "conditioning_image": f"conditioning_images/{name}"})
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def rows_of(data: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (data / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def pixels_of(data: Path, rows: Sequence[dict], column: str) -> list[torch.Tensor]:
    from skingen.train.batches import image_to_tensor

    return [image_to_tensor(Image.open(data / row[column]).convert("RGB"), normalize=True) for row in rows]


# ---------------------------------------------------------------------------------------------------------------
# Once per family: the VAE and the base


def fitted_vae(family: str, corpus: Path, out: Path, steps: int) -> dict:
    """The family's tiny VAE fitted on the corpus's images and controls (reused when its recipe.json matches)."""
    from skingen.testing.vae_fitting import RECIPE_FILE, VaeRecipe, fit_vae_from_scratch

    recipe = VaeRecipe(backbone=family, block_out_channels=VAE_WIDTHS[family], latent_channels=4, resolution=SIZE,
                       steps=steps, batch_size=8, learning_rate=VAE_LEARNING_RATE[family],
                       initial_logvar=VAE_INITIAL_LOGVAR[family])
    if (out / RECIPE_FILE).is_file():
        record = json.loads((out / RECIPE_FILE).read_text(encoding="utf-8"))
        if record.get("recipe") == json.loads(json.dumps(asdict(recipe))):  # as saved: tuples become lists
            return {**record, "reused": True}
    rows = rows_of(corpus, "train")
    images = pixels_of(corpus, rows, "image") + pixels_of(corpus, rows, "conditioning_image")
    return {**fit_vae_from_scratch(out, images, recipe, checkpoint_dir=f"{out}.partial"), "reused": False}


def pretrained_base(family: str, vae: Path, corpus: Path, out: Path, steps: int) -> dict:
    """The family's tiny base around ``vae``: pre-trained on the corpus for ``steps`` steps (cached by
    ``pretrain_tiny_base``), or left random with ``steps`` 0."""
    if steps == 0:
        from importlib import import_module

        builder = getattr(import_module(f"skingen.testing.tiny_{family}"), f"build_tiny_{family}")
        builder(out, seed=0, controlnet=True, vae=vae)
        return {"steps": 0}
    from skingen.testing.base_pretraining import PretrainSettings, pretrain_tiny_base

    settings = PretrainSettings(backbone=family, pretrained_vae=str(vae), vae_fit_steps=0, resolution=SIZE,
                                max_train_steps=steps, train_batch_size=16, learning_rate=1e-3)
    record = pretrain_tiny_base(out, corpus, settings)
    return {"steps": steps, "reused": record["reused"], "seconds": record["seconds"], "fit": record["denoiser_fit"]}


# ---------------------------------------------------------------------------------------------------------------
# Per seed: the ControlNet and its figures


def train(family: str, base: Path, data: Path, out: Path, seed: int, steps: int,
          learning_rate: float) -> dict[int, dict[str, float]]:
    from skingen.train.loop import train as run_training

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from repo_scripts import load_script

    script = load_script(f"train_controlnet_{family}.py")
    args = script.parse_args([
        "--pretrained_model_name_or_path", str(base), "--train_data_dir", str(data), "--output_dir", str(out),
        "--resolution", str(SIZE), "--train_batch_size", "8", "--learning_rate", str(learning_rate), "--lr_warmup_steps", "0",
        "--max_train_steps", str(steps), "--seed", str(seed), "--report_to", "none", "--max_sequence_length", "32",
        "--validation_split", "validation", "--validation_loss_timesteps", *TIMESTEPS, "--validation_loss_rows", "8",
        "--validation_steps", str(steps), "--checkpointing_steps", str(steps + 1),
    ])  # fmt: skip
    return run_training(args).validation_losses


def generated_edge_f1(family: str, base: Path, controlnet_dir: Path, data: Path, splits: Sequence[str],
                      seed: int, steps: int) -> dict[str, float]:
    """Mean edge F1 per split of images generated for its controls (seed ``seed * 100 + row``)."""
    import diffusers

    from skingen.backbones import pipelines
    from skingen.evaluate.metrics import edge_f1

    family_spec = pipelines.family_named(family)
    controlnet = getattr(diffusers, family_spec.controlnet_model).from_pretrained(controlnet_dir)
    pipeline = getattr(diffusers, family_spec.controlnet_pipeline).from_pretrained(base, controlnet=controlnet)
    pipeline.set_progress_bar_config(disable=True)
    scores = {}
    for split in splits:
        values = []
        for index, row in enumerate(rows_of(data, split)):
            control = Image.open(data / row["conditioning_image"]).convert("RGB")
            image = pipeline(prompt=PROMPT, control_image=control, height=SIZE, width=SIZE,
                             num_inference_steps=steps, generator=torch.Generator().manual_seed(seed * 100 + index),
                             max_sequence_length=32, **{family_spec.guidance_argument: 1.0}).images[0]
            values.append(edge_f1(image, control))
        scores[split] = statistics.fmean(values)
    return scores


def reconstruction_edge_f1(vae_dir: Path, data: Path, split: str) -> float:
    """Edge F1 of the VAE's round trips of the split's images against their controls: the decoder's ceiling."""
    import diffusers

    from skingen.evaluate.metrics import edge_f1
    from skingen.testing.vae_fitting import vae_round_trip
    from skingen.train.batches import tensor_to_image

    config = json.loads((vae_dir / "config.json").read_text(encoding="utf-8"))
    vae = getattr(diffusers, config["_class_name"]).from_pretrained(vae_dir).eval()
    rows = rows_of(data, split)
    decoded = vae_round_trip(vae, torch.stack(pixels_of(data, rows, "image")))
    return statistics.fmean(edge_f1(tensor_to_image(image), Image.open(data / row["conditioning_image"]))
                            for image, row in zip(decoded, rows))


def run_seed(family: str, seed: int, args: argparse.Namespace, base: Path, work: Path) -> dict:
    data = work / f"{family}-{seed}-data"
    write_layouts(data, 100 + seed, {"train": (LAYOUTS_A, args.train_rows), "heldout_a": (LAYOUTS_A, 8),
                                     "validation": (LAYOUTS_B, 8)})
    start = time.perf_counter()
    losses = train(family, base, data, work / f"{family}-{seed}-run", seed, args.steps, args.learning_rate)
    minutes = (time.perf_counter() - start) / 60
    before, after = losses[0], losses[args.steps]
    key = next(k for k in before if k.startswith("val_loss"))  # the mean over the fixed timesteps
    splits = ("validation", "heldout_a")
    # <base>/controlnet: the untrained ControlNet both base paths write (zero-initialised outputs: the base as it is)
    untrained = generated_edge_f1(family, base, base / "controlnet", data, splits, seed, args.sampling_steps)
    trained = generated_edge_f1(family, base, work / f"{family}-{seed}-run", data, splits, seed, args.sampling_steps)
    return {"family": family, "seed": seed, "steps": args.steps, "train_minutes": minutes,
            "heldout_loss_untrained": before[key], "heldout_loss_trained": after[key],
            "edge_f1_untrained": untrained["validation"], "edge_f1_trained": trained["validation"],
            "edge_f1_a_untrained": untrained["heldout_a"], "edge_f1_a_trained": trained["heldout_a"],
            "edge_f1_vae_reconstruction": reconstruction_edge_f1(base / "vae", data, "validation")}


def summary(rows: Sequence[dict]) -> str:
    lines = ["| family | seeds | held-out (B) FM loss untrained -> trained | lower in | edge F1 on B untrained -> "
             "trained | change per seed | edge F1 on held-out A | VAE round trip (B) |", "|---|---|---|---|---|---|---|---|"]
    for family in FAMILIES:
        runs = [r for r in rows if r["family"] == family]
        if not runs:
            continue

        def ms(key, runs=runs):
            values = [r[key] for r in runs]
            return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0:.3f}"

        lower = sum(r["heldout_loss_trained"] < r["heldout_loss_untrained"] for r in runs)
        changes = ", ".join(f"{r['edge_f1_trained'] - r['edge_f1_untrained']:+.3f}" for r in runs)
        lines.append(f"| {family} | {len(runs)} | {ms('heldout_loss_untrained')} -> {ms('heldout_loss_trained')} | "
                     f"{lower}/{len(runs)} | {ms('edge_f1_untrained')} -> {ms('edge_f1_trained')} | {changes} | "
                     f"{ms('edge_f1_a_untrained')} -> {ms('edge_f1_a_trained')} | {ms('edge_f1_vae_reconstruction')} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--work_dir", default="work/new_backbones_evidence",
                        help="where the corpus, the fitted VAEs and the bases are cached, and the runs written")
    parser.add_argument("--corpus_rows", type=int, default=256, help="family-A layouts the VAE and the base fit on")
    parser.add_argument("--vae_steps", type=int, default=800)
    parser.add_argument("--base_steps", type=int, default=400, help="base pre-training steps (0: a random base)")
    parser.add_argument("--train_rows", type=int, default=64, help="family-A rows each ControlNet trains on")
    parser.add_argument("--steps", type=int, default=600, help="ControlNet training steps per seed")
    parser.add_argument("--learning_rate", type=float, default=2e-3, help="ControlNet learning rate")
    parser.add_argument("--sampling_steps", type=int, default=8)
    parser.add_argument("--out", default=None, help="write the per-seed values and the fits as JSON here (the "
                        "entries of families not run this time are kept)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    args = parse_args(argv)
    work = Path(args.work_dir)
    corpus = work / "corpus_a"
    if not (corpus / "train.jsonl").is_file():
        write_layouts(corpus, 7, {"train": (LAYOUTS_A, args.corpus_rows)})
    rows, fits = [], {}
    for family in args.families:
        started = time.perf_counter()
        vae = fitted_vae(family, corpus, work / f"{family}-vae", args.vae_steps)
        base_dir = work / f"{family}-base-{args.base_steps}"
        base = pretrained_base(family, work / f"{family}-vae", corpus, base_dir, args.base_steps)
        fits[family] = {"vae": {k: vae[k] for k in ("initial_l1", "final_l1", "seconds", "reused", "latent_normalisation")},
                        "base": base, "minutes": (time.perf_counter() - started) / 60}
        print(json.dumps({family: fits[family]}), flush=True)
        for seed in args.seeds:
            rows.append(run_seed(family, seed, args, base_dir, work))
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        rows = save_results(Path(args.out), args, fits, rows)
    print(summary(rows))
    return rows


def save_results(path: Path, args: argparse.Namespace, fits: dict, rows: list[dict]) -> list[dict]:
    """Write this run's families to ``path``, keeping the other families an earlier run wrote there (so the
    families can run as separate processes); returns every family's rows."""
    from skingen.fileio import atomic_write_json

    saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    kept = {family: entry for family, entry in saved.get("families", {}).items() if family not in args.families}
    for family in args.families:
        kept[family] = {"settings": vars(args), "fit": fits[family], "runs": [r for r in rows if r["family"] == family]}
    atomic_write_json(path, {"families": kept})
    return [run for entry in kept.values() for run in entry["runs"]]


if __name__ == "__main__":
    run_cli(main)
