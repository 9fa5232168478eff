"""Write ``<demo_dir>/report.md``, ``comparison.json`` and ``demo_grid.png`` from what scripts/demo.sh produced:
the untrained and the trained ControlNet side by side on the same held-out layouts and seeds.

    python scripts/demo_report.py --demo_dir outputs/demo

``comparison.json`` is ``{"untrained": {...}, "trained": {...}}`` with the summary metrics of each arm's
``metrics.json`` (edge_f1, sentence_accuracy, ned, diversity, ...), ``edge_f1_other_layouts`` (each output's edge
F1 against the *other* held-out layouts' controls: what an output that ignores its control scores) and
``edge_f1_own_minus_other`` (how much of edge_f1 its own control earned), plus ``val_text_ctc``,
``val_loss_diffusion`` and ``val_edge_f1``: the trainer's values at fixed timesteps and noise on the held-out rows,
before training (the untrained ControlNet) and after the last step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from skingen.data.images import open_rgb  # noqa: E402
from skingen.errors import SkingenError, run_cli  # noqa: E402
from skingen.fileio import atomic_save_image, atomic_write_json, atomic_write_text, read_jsonl  # noqa: E402

ARMS = ("untrained", "trained")
VALIDATION_LOSSES = ("val_text_ctc", "val_loss_diffusion", "val_edge_f1")
# Rows of the side-by-side table: (key in comparison.json, label, which way is better).
TABLE = (
    ("edge_f1", "edge F1 (Canny edges of the output vs the control)", "higher"),
    ("edge_precision", "edge precision", "higher"),
    ("edge_recall", "edge recall", "higher"),
    ("edge_f1_other_layouts", "edge F1 against the other held-out layouts' controls", None),
    ("edge_f1_own_minus_other", "edge F1 earned by its own control (own - other layouts')", "higher"),
    ("sentence_accuracy", "OCR sentence accuracy", "higher"),
    ("ned", "OCR normalised edit distance (1 = exact)", "higher"),
    ("diversity", "diversity (mean 1 - SSIM between seeds of a layout)", "higher"),
    ("val_text_ctc", "val_text_ctc (recognizer CTC per character, fixed timesteps)", "lower"),
    ("val_loss_diffusion", "val_loss_diffusion (fixed timesteps and noise)", "lower"),
    ("val_edge_f1", "val_edge_f1 (soft edge F1 of the one-step estimate, fixed timesteps)", "higher"),
)
TILE = 128
# A relative edge-F1 gain under this is within what another seed moves it (the demo's change over 3 seeds: sd 0.004).
CLEAR_GAIN = 0.02
ATLAS_LAYOUT = "key_elements"  # the layout the demo trains the ControlNet on


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo_dir", default="outputs/demo", help="the OUT folder of scripts/demo.sh")
    parser.add_argument("--grid_rows", type=int, default=6, help="held-out layouts shown in demo_grid.png")
    return parser.parse_args(argv)


def read_metrics(arm_dir: Path) -> dict:
    path = arm_dir / "metrics.json"
    if not path.is_file():
        raise SkingenError(f"{path} not found: run scripts/demo.sh (this script only writes its report)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise SkingenError(f"{path}:{err.lineno}: invalid JSON ({err.msg}); run evaluate.py on {arm_dir} again") from None


def read_scalars(logs_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """All scalar series the trainer logged to TensorBoard under ``logs_dir``, by tag, sorted by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(logs_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags().get("scalars", []):
            series.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return {tag: sorted(dict(values).items()) for tag, values in series.items()}


def validation_losses(scalars: dict[str, list[tuple[int, float]]]) -> dict[str, dict[str, float | None]]:
    """Each arm's fixed-timestep losses: step 0 is the untrained ControlNet, the last step the trained one."""
    losses: dict[str, dict[str, float | None]] = {arm: {} for arm in ARMS}
    for tag in VALIDATION_LOSSES:
        values = scalars.get(tag, [])
        first = values[0][1] if values and values[0][0] == 0 else None
        last = values[-1][1] if values and values[-1][0] > 0 else None
        losses["untrained"][tag], losses["trained"][tag] = first, last
    return losses


def control_specificity(arm_dir: Path) -> dict[str, float]:
    """Edge F1 of each output against the controls of the other held-out layouts, and how much higher it is against
    its own: an output that ignores its control scores alike on both."""
    from skingen.evaluate.metrics import edge_f1

    results = [result for items in results_by_layout(arm_dir).values() for result in items]
    controls = {path: open_rgb(path) for path in sorted({result["conditioning_image"] for result in results})}
    if len(controls) < 2:
        return {}
    own, other = [], []
    for result in results:
        output = open_rgb(arm_dir / result["output"])
        own.append(edge_f1(output, controls[result["conditioning_image"]]))
        other.append(sum(edge_f1(output, control) for path, control in controls.items()
                         if path != result["conditioning_image"]) / (len(controls) - 1))
    mean_other = sum(other) / len(other)
    return {"edge_f1_other_layouts": mean_other, "edge_f1_own_minus_other": sum(own) / len(own) - mean_other}


def build_comparison(metrics: dict[str, dict], losses: dict[str, dict], specificity: dict[str, dict]) -> dict:
    return {arm: {**metrics[arm]["summary"], **specificity[arm], **losses[arm]} for arm in ARMS}


def better(key: str, comparison: dict) -> str:
    a, b = comparison["untrained"].get(key), comparison["trained"].get(key)
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return "-"
    way = dict((k, way) for k, _, way in TABLE)[key]
    if way is None:  # a reference value, neither way is better
        return "-"
    higher = way == "higher"
    if a == b:
        return "same"
    return "trained" if (b > a) == higher else "untrained"


def fmt(value) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{value:.3f}"


def comparison_table(comparison: dict) -> list[str]:
    lines = ["| metric | untrained | trained | better |", "|---|---|---|---|"]
    for key, label, _ in TABLE:
        lines.append(
            f"| {label} | {fmt(comparison['untrained'].get(key))} | {fmt(comparison['trained'].get(key))} | "
            f"{better(key, comparison)} |"
        )
    return lines


def results_by_layout(arm_dir: Path) -> dict[str, list[dict]]:
    """Each held-out row's generated images in seed order."""
    by_row: dict[str, list[dict]] = {}
    for _, result in read_jsonl(arm_dir / "results.jsonl"):
        by_row.setdefault(result["row_id"], []).append(result)
    return {row: sorted(items, key=lambda r: r["seed"]) for row, items in by_row.items()}


def build_grid(demo_dir: Path, rows: int) -> Path | None:
    """One line per held-out layout: real atlas | control | untrained (each seed) | trained (same seeds)."""
    arms = {arm: results_by_layout(demo_dir / arm) for arm in ARMS}
    layouts = [row for row in arms["trained"] if row in arms["untrained"]][:rows]
    if not layouts:
        return None
    seeds = len(arms["trained"][layouts[0]])
    titles = ["real", "control"] + [f"untrained s{r['seed']}" for r in arms["untrained"][layouts[0]]]
    titles += [f"trained s{r['seed']}" for r in arms["trained"][layouts[0]]]
    header = 18
    grid = Image.new("RGB", (len(titles) * TILE, header + len(layouts) * TILE), "white")
    draw = ImageDraw.Draw(grid)
    for x, title in enumerate(titles):
        draw.text((x * TILE + 4, 3), title, fill="black")
    for y, row in enumerate(layouts):
        first = arms["trained"][row][0]
        tiles = [open_rgb(first["reference_image"]) if first.get("reference_image") else None]
        tiles.append(open_rgb(first["conditioning_image"]))
        for arm in ARMS:
            tiles += [open_rgb(demo_dir / arm / item["output"]) for item in arms[arm][row][:seeds]]
        for x, tile in enumerate(tiles):
            if tile is not None:
                grid.paste(tile.resize((TILE, TILE), Image.Resampling.BICUBIC), (x * TILE, header + y * TILE))
    return atomic_save_image(grid, demo_dir / "demo_grid.png")


def base_layouts(demo_dir: Path) -> list[str]:
    """The merge layouts of the images the base was pre-trained on (from its datasets' rows), [] when unknown."""
    path = demo_dir / "base" / "pretrain.json"
    if not path.is_file():
        return []
    layouts = set()
    for dataset in json.loads(path.read_text(encoding="utf-8")).get("datasets", []):
        try:
            with open(Path(dataset) / "train.jsonl", encoding="utf-8") as rows:
                layouts |= {json.loads(line).get("layout") for line in rows if line.strip()}
        except (OSError, ValueError):
            continue
    return sorted(layout for layout in layouts if layout)


def base_summary(demo_dir: Path, layouts: list[str]) -> list[str]:
    """One line on the base: what it was pre-trained on (``layouts``: :func:`base_layouts`), how long, its losses."""
    path = demo_dir / "base" / "pretrain.json"
    if not path.is_file():
        return ["- base model: no pretrain.json found (not pre-trained by scripts/pretrain_tiny_base.py)"]
    record = json.loads(path.read_text(encoding="utf-8"))
    seen = " / ".join(layouts) or "unknown layout"
    vae, unet, settings = record["vae_fit"], record["denoiser_fit"], record["settings"]
    if settings.get("pretrained_vae"):
        vae_note = f"VAE {settings['pretrained_vae']} (fitted beforehand)"
        if vae is not None:
            vae_note += f", fine-tuned here: L1 {vae['initial_l1']:.3f} -> {vae['final_l1']:.3f}"
    else:
        vae_note = f"VAE fitted here: reconstruction L1 {vae['initial_l1']:.3f} -> {vae['final_l1']:.3f}"
    return [
        f"- base model: tiny SDXL ({settings['preset']} preset) pre-trained on {record['images']} other "
        f"skins' {seen} images at {settings['resolution']} px in {record['seconds']:.0f} s: {vae_note}; UNet diffusion loss "
        f"{unet['first_loss']:.3f} -> {unet['last_loss']:.3f} over {settings['max_train_steps']} steps",
    ]


def vae_reconstructor(vae_dir: Path, size: tuple[int, int]):
    """image path -> the image at ``size`` encoded and decoded by the VAE in ``vae_dir`` (posterior mode)."""
    from diffusers import AutoencoderKL

    from skingen.testing.vae_fitting import vae_round_trip
    from skingen.train.batches import image_to_tensor, tensor_to_image

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()

    def reconstruct(path: str) -> Image.Image:
        pixels = image_to_tensor(open_rgb(path).resize(size, Image.Resampling.BICUBIC), normalize=True)
        return tensor_to_image(vae_round_trip(vae, pixels[None])[0])

    return reconstruct


def edge_f1_room(rows: list[dict], reconstruct) -> dict:
    """How much edge F1 there is to gain on the held-out layouts (``rows``: results with ``reference_image`` and
    ``conditioning_image``): ``vae_ceiling`` scores each real atlas's reconstruction against its own control (about
    the most an output decoded by this VAE scores), ``other_skin`` the reconstructions of the *other* skins against
    it (knowing the atlas layout but not this skin: about where a base that ignores the control lands)."""
    from skingen.evaluate.metrics import edge_f1

    reconstructions = [reconstruct(row["reference_image"]) for row in rows]
    controls = [open_rgb(row["conditioning_image"]) for row in rows]
    own = [edge_f1(image, control) for image, control in zip(reconstructions, controls)]
    other = [edge_f1(image, control) for i, control in enumerate(controls)
             for j, image in enumerate(reconstructions) if i != j]
    return {"vae_ceiling": sum(own) / len(own), "other_skin": sum(other) / len(other), "layouts": len(rows)}


def measure_room(demo_dir: Path) -> dict | None:
    """``edge_f1_room`` through the base's VAE at the generated size; None without a base VAE or two layouts."""
    vae_dir = demo_dir / "base" / "vae"
    rows = [items[0] for items in results_by_layout(demo_dir / "trained").values() if items[0].get("reference_image")]
    if not (vae_dir / "config.json").is_file() or len(rows) < 2:
        return None
    size = open_rgb(demo_dir / "trained" / rows[0]["output"]).size
    return edge_f1_room(rows, vae_reconstructor(vae_dir, size))


def room_lines(room: dict | None) -> list[str]:
    if room is None:
        return ["- room for edge F1: not measured (no base VAE or fewer than two held-out layouts)"]
    return [
        f"- room for edge F1 on these {room['layouts']} layouts, through the base's VAE: its reconstruction of each "
        f"real atlas scores {room['vae_ceiling']:.3f} (about the most an output decoded by it scores); another held-out "
        f"skin's scores {room['other_skin']:.3f} against the same control (what knowing the layout but not the "
        f"skin gives). Over an output that has the layout, following each skin's own edges adds about the difference at "
        f"most: {room['vae_ceiling'] - room['other_skin']:+.3f}.",
    ]


def verdict(comparison: dict) -> str:
    a, b = comparison["untrained"].get("edge_f1"), comparison["trained"].get("edge_f1")
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return "Edge F1 is missing for one arm; see the metrics files."
    change = f"edge F1 {a:.3f} -> {b:.3f} ({b - a:+.3f})"
    if b >= a * (1 + CLEAR_GAIN):
        return f"The trained ControlNet follows the held-out layouts better: {change}."
    if b > a:
        return (f"The trained ControlNet is NOT clearly better on the held-out layouts: {change}, under "
                f"{CLEAR_GAIN:.0%} (seeds move it by about that much).")
    return f"The trained ControlNet did NOT follow the held-out layouts better: {change}."


def base_lines(base_saw_atlases: bool) -> list[str]:
    """What the untrained column is and what the ControlNet has to add, by what the base was pre-trained on."""
    if base_saw_atlases:
        first = ["- The base has seen a few dozen other skins' atlases for about a minute: it draws the atlas grid, panels,",
                 "  key outlines and some labels, blurred (look at the grid), so the untrained column already scores on edges.",
                 "  What the control adds is each skin's own edges (the shapes of its picture background, key outlines,",
                 "  labels); the room line above bounds that gain."]
    else:
        first = ["- The base has seen a few dozen other skins' whole keyboards for about a minute (as SDXL has seen",
                 "  keyboards but never skingen's atlases): it draws keyboard-like colours, keys and labels, not the atlas",
                 "  layout. Most of the trained column's gain is that layout, drawn from the control (it is the same for",
                 "  every skin); beyond it a control carries each skin's own edges (the shapes of its picture background,",
                 "  key outlines, labels), a part the room line above bounds."]
    return [
        *first,
        "  The 'earned by its own control' row says how much of the score is this control's (an output that ignores",
        "  its control scores alike against every layout's). The edge loss teaches where edges go: sharper outlines",
        "  and strokes where the control has them; at this size it does not redraw a held-out skin's picture shapes,",
        "  and a control that pins more of the image leaves less to vary between seeds (diversity).",
    ]


def main(argv=None) -> None:
    args = parse_args(argv)
    demo_dir = Path(args.demo_dir)
    metrics = {arm: read_metrics(demo_dir / arm) for arm in ARMS}
    losses = validation_losses(read_scalars(demo_dir / "controlnet"))
    comparison = build_comparison(metrics, losses, {arm: control_specificity(demo_dir / arm) for arm in ARMS})
    atomic_write_json(demo_dir / "comparison.json", comparison)
    grid = build_grid(demo_dir, args.grid_rows)
    summary = metrics["trained"]["summary"]
    layouts = base_layouts(demo_dir)
    report = [
        "# skingen demo: untrained vs trained ControlNet",
        "",
        "Every stage ran offline on CPU with a tiny SDXL (about 1M UNet parameters) and synthetic skins.",
        "",
        *base_summary(demo_dir, layouts),
        f"- ControlNet: trained on key-element atlases with Canny controls, the OCR text loss and the edge consistency loss; "
        f"{summary['images']} images generated for the held-out layouts per arm, same seeds for both arms",
        "",
        "## Held-out layouts, same seeds",
        "",
        *comparison_table(comparison),
        "",
        verdict(comparison),
        "",
        *room_lines(measure_room(demo_dir)),
        "",
        "The untrained ControlNet is initialised from the base UNet with zero output convolutions, as the trained",
        "one is at step 0, so the untrained column is what the base model draws by itself. The fixed-timestep",
        "losses are measured on the held-out rows with the same noise before and after training.",
        "",
        "## What the tiny model can and cannot do",
        "",
        *base_lines(ATLAS_LAYOUT in layouts),
        "- It writes few readable labels: at 128 px with a 1M-parameter UNet, OCR reads a handful of short ones",
        "  (ABC, 123) and sentence accuracy stays near 0; the text loss here shows that it runs inside training",
        "  (docs/text_loss.md has the evidence about what it teaches). Nor does it show image quality: real skins",
        "  need SDXL weights and the same commands (README.md).",
        "",
        f"Grid (real | control | untrained seeds | trained seeds): {grid or 'no images'}",
        f"Numbers: {demo_dir / 'comparison.json'}; per image: {demo_dir / 'untrained' / 'metrics.md'}, "
        f"{demo_dir / 'trained' / 'metrics.md'}",
        "",
    ]
    path = atomic_write_text(demo_dir / "report.md", "\n".join(report))
    print("\n".join(report))
    print(f"wrote {path}")


if __name__ == "__main__":
    run_cli(main)
