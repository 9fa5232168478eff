"""SDXL ControlNet training on the tiny pipeline: outputs, fine-tuning, resume, 2 processes, NaN handling, caching."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from launching import launch_script
from PIL import Image, ImageDraw
from repo_scripts import REPO, load_script, tiny_training_argv
from safetensors.torch import load_file

from skingen.errors import SkingenError, run_cli
from skingen.train.batches import GlobalBatchSampler, resize_and_center_crop, transform_boxes
from skingen.train.loop import build_arg_parser, parse_training_args, train

WEIGHTS = "diffusion_pytorch_model.safetensors"
NUM_ROWS = 6


def _load_script():
    return load_script("train_controlnet_sdxl.py")


pytestmark = pytest.mark.usefixtures("one_torch_thread", "fresh_accelerate_state")


@pytest.fixture(scope="module")
def skin_dataset(tmp_path_factory) -> Path:
    """6 rows of 80x64 skins (wider than tall, so the centre crop cuts 8 px left and right), one text box each."""
    root = tmp_path_factory.mktemp("skins")
    (root / "images").mkdir()
    (root / "conditioning_images").mkdir()
    rows = []
    for i in range(NUM_ROWS):
        image = Image.new("RGB", (80, 64), (40 * i, 120, 200 - 30 * i))
        ImageDraw.Draw(image).rectangle((10, 10, 40, 30), fill=(255, 255, 255))
        image.save(root / "images" / f"{i}.png")
        control = Image.new("RGB", (80, 64))
        ImageDraw.Draw(control).rectangle((10, 10, 40, 30), outline=(255, 255, 255))
        control.save(root / "conditioning_images" / f"{i}.png")
        rows.append({
            "text": f'a keyboard skin in colour {i}, iflyskin, writing "前往"',
            "image": f"images/{i}.png",
            "conditioning_image": f"conditioning_images/{i}.png",
            "box": [[[10, 10], [40, 10], [40, 30], [10, 30]]],
        })
    (root / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    held_out = {**rows[0], "text": 'a held-out keyboard skin, writing "前往"'}
    (root / "validation.jsonl").write_text(json.dumps(held_out, ensure_ascii=False) + "\n", encoding="utf-8")
    return root


_argv = tiny_training_argv


def _args(*argv):
    return parse_training_args(build_arg_parser(), _argv(*argv))


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / WEIGHTS)


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _assert_trained_alike(a: dict, b: dict) -> None:
    """Same data and noise, arithmetic grouped differently (batch composition, gradients summed across processes).

    Float rounding then differs by ~1e-9, and Adam turns that into visible differences only where gradients are
    ~0 (it divides by their size). Different data or noise would change nearly every weight by ~lr.
    """
    assert a.keys() == b.keys()
    differences = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert (differences > 1e-6).float().mean().item() < 1e-3
    assert (differences > 1e-5).float().mean().item() < 1e-4


class RecordingLoss:
    """An extra loss that adds nothing but records what the loop hands it."""

    name = "recorder"

    def __init__(self):
        self.calls = []

    def __call__(self, *, batch, output, backbone, weight_dtype, step):
        self.calls.append({"step": step, "captions": list(batch["captions"]), "row_ids": list(batch["row_ids"]),
                           "boxes": [b.clone() for b in batch["boxes"]], "texts": list(batch["texts"]),
                           "shapes": (tuple(output.model_pred.shape), tuple(output.latents.shape),
                                      tuple(output.timesteps.shape))})
        return (output.model_pred.float() ** 2).mean() * 0.0, {"recorder_boxes": float(sum(len(b) for b in batch["boxes"]))}


def test_short_run_writes_loadable_controlnet_grid_card_and_logs(tiny_sdxl_dir, skin_dataset, tmp_path):
    from diffusers import ControlNetModel

    out = tmp_path / "run"
    result = train(_args(tiny_sdxl_dir, skin_dataset, out, "--max_train_steps", 2, "--report_to", "tensorboard",
                         "--validation_prompt", "a keyboard skin", "--validation_image",
                         skin_dataset / "conditioning_images" / "0.png", "--num_validation_images", 2,
                         "--validation_inference_steps", 2))

    assert result.global_step == 2
    controlnet = ControlNetModel.from_pretrained(out)
    # from_unet starts the zero convolutions at zero; training must have moved them.
    zero_conv = controlnet.controlnet_down_blocks[0].weight
    assert zero_conv.abs().max().item() > 0
    grid = Image.open(out / "validation" / "step-2.png")
    assert grid.size == (64 * 3, 64)  # conditioning image + 2 samples
    card = (out / "README.md").read_text(encoding="utf-8")
    assert str(tiny_sdxl_dir) in card and "validation/step-2.png" in card and str(skin_dataset) in card
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp folders left behind


def test_fixed_timestep_validation_loss_is_a_noise_free_curve(tiny_sdxl_dir, skin_dataset, tmp_path):
    flags = ["--max_train_steps", 3, "--validation_steps", 2, "--validation_loss_timesteps", 100, 600,
             "--validation_loss_rows", 3, "--proportion_empty_prompts", 0.5]
    recorder = RecordingLoss()
    logs = {}
    result = train(_args(tiny_sdxl_dir, skin_dataset, tmp_path / "lr", *flags), extra_loss=recorder,
                   on_step=lambda step, values: logs.update({step: values}))
    # Before training, every --validation_steps, and at the end; the step's logs carry the values too.
    assert sorted(result.validation_losses) == [0, 2, 3]
    assert logs[2]["val_loss_diffusion"] == result.validation_losses[2]["val_loss_diffusion"]
    assert "val_loss_diffusion" not in logs[1]
    # The extra loss saw the 3 rows at both timesteps, never with the caption dropped, and its logs are averaged.
    evaluated = recorder.calls[:3]  # 3 rows x 2 timesteps in batches of 2, before the first training step
    assert sorted(r for call in evaluated for r in call["row_ids"]) == sorted([f"images/{i}.png" for i in range(3)] * 2)
    assert all(caption for call in evaluated for caption in call["captions"])
    assert result.validation_losses[0]["val_recorder_boxes"] == 2.0  # each batch of 2 rows has 2 boxes
    assert result.validation_losses[0]["val_loss_recorder"] == 0.0
    # Training moves the curve ...
    assert result.validation_losses[3]["val_loss_diffusion"] != result.validation_losses[0]["val_loss_diffusion"]

    # ... and with learning rate 0 it stays exactly where it was: the noise and timesteps are the same every time,
    # whatever the training batches drew.
    frozen = train(_args(tiny_sdxl_dir, skin_dataset, tmp_path / "frozen", *flags, "--learning_rate", 0))
    values = [frozen.validation_losses[step]["val_loss_diffusion"] for step in (0, 2, 3)]
    assert values[0] == values[1] == values[2]
    assert values[0] == result.validation_losses[0]["val_loss_diffusion"]


def test_fixed_timestep_losses_use_the_held_out_split_when_one_is_given(tiny_sdxl_dir, skin_dataset, tmp_path):
    # A curve on training rows shows memorisation as well as learning; with --validation_split it is the held-out
    # rows' (validation.jsonl: one row with a caption of its own), which no training batch contains.
    flags = ["--max_train_steps", 2, "--validation_steps", 2, "--validation_loss_timesteps", 100, 600,
             "--validation_split", "validation", "--num_validation_images", 1, "--validation_inference_steps", 1]
    recorder = RecordingLoss()
    result = train(_args(tiny_sdxl_dir, skin_dataset, tmp_path / "held_out", *flags), extra_loss=recorder)
    before_training = recorder.calls[0]  # the held-out row at both timesteps, in one batch of 2
    assert before_training["captions"] == ['a held-out keyboard skin, writing "前往"'] * 2
    assert not any("held-out" in caption for call in recorder.calls[1:3] for caption in call["captions"])
    on_training_rows = train(_args(tiny_sdxl_dir, skin_dataset, tmp_path / "train_rows", *flags[:6],
                                   "--validation_loss_rows", 1))
    assert result.validation_losses[0]["val_loss_diffusion"] != on_training_rows.validation_losses[0]["val_loss_diffusion"]


def test_fine_tunes_an_existing_controlnet_in_bf16(tiny_sdxl_dir, skin_dataset, tmp_path):
    # With learning rate 0 the result is exactly the ControlNet training started from (kept in fp32 under bf16).
    source = tiny_sdxl_dir / "controlnet"
    out = tmp_path / "finetuned"
    result = train(_args(tiny_sdxl_dir, skin_dataset, out, "--controlnet_model_name_or_path", source,
                         "--learning_rate", 0, "--max_train_steps", 1, "--mixed_precision", "bf16",
                         "--validation_split", "validation", "--num_validation_images", 1,
                         "--validation_inference_steps", 2))
    assert _max_difference(_weights(out), _weights(source)) == 0.0
    # Validation used the held-out row of validation.jsonl: its conditioning image and one sample.
    assert Image.open(result.validation_grids[-1]).size == (64 * 2, 64)
    assert f"fine-tuned from `{source}`" in (out / "README.md").read_text(encoding="utf-8")


def test_cached_latents_train_like_encoding_every_step(tiny_sdxl_dir, skin_dataset, tmp_path):
    common = ["--max_train_steps", 2, "--proportion_empty_prompts", 0.5]
    train(_args(tiny_sdxl_dir, skin_dataset, tmp_path / "cached", *common))
    train(_args(tiny_sdxl_dir, skin_dataset, tmp_path / "encoded", *common, "--no_cache_latents"))
    assert not (tmp_path / "encoded" / "cache" / "latents").exists()
    _assert_trained_alike(_weights(tmp_path / "cached"), _weights(tmp_path / "encoded"))


def test_resume_after_stop_matches_uninterrupted_run(tiny_sdxl_dir, skin_dataset, tmp_path):
    common = ["--max_train_steps", 4, "--train_batch_size", 1, "--gradient_accumulation_steps", 2,
              "--lr_scheduler", "linear", "--lr_warmup_steps", 1, "--proportion_empty_prompts", 0.5,
              "--embeddings_cache_dir", tmp_path / "cache"]
    straight = tmp_path / "straight"
    train(_args(tiny_sdxl_dir, skin_dataset, straight, *common))

    # A NaN at step 3 with --max_nonfinite_steps 1 stops the run after checkpoint-2, mid-epoch (6 rows, 2 per step).
    stopped = tmp_path / "stopped"
    with pytest.raises(SkingenError, match=r"NaN/inf for 1 steps in a row.*checkpoint-2"):
        train(_args(tiny_sdxl_dir, skin_dataset, stopped, *common, "--checkpointing_steps", 2,
                    "--debug_inject_nan_at_step", 3, "--max_nonfinite_steps", 1))
    assert [p.name for p in sorted(stopped.glob("checkpoint-*"))] == ["checkpoint-2"]
    assert not (stopped / WEIGHTS).exists()

    result = train(_args(tiny_sdxl_dir, skin_dataset, stopped, *common, "--checkpointing_steps", 2,
                         "--resume_from_checkpoint", "latest"))
    assert result.global_step == 4
    assert _max_difference(_weights(stopped), _weights(straight)) < 1e-6
    assert _max_difference(_weights(stopped), _weights(stopped / "checkpoint-2" / "controlnet")) > 1e-4


def test_two_processes_match_one_process_with_same_global_batch(tiny_sdxl_dir, skin_dataset, tmp_path):
    steps = ["--max_train_steps", 3, "--proportion_empty_prompts", 0.3]
    one = tmp_path / "one"
    train(_args(tiny_sdxl_dir, skin_dataset, one, *steps))

    two = tmp_path / "two"
    argv = _argv(tiny_sdxl_dir, skin_dataset, two, *steps, "--train_batch_size", 1)
    finished = launch_script("train_controlnet_sdxl.py", [str(a) for a in argv])
    assert finished.returncode == 0, finished.stderr[-3000:]
    # Each of the 2 processes filled its share of the shared caches.
    assert len(list((two / "cache" / "latents").rglob("*.safetensors"))) == NUM_ROWS
    _assert_trained_alike(_weights(two), _weights(one))


def test_nonfinite_step_skips_the_update_and_is_counted(tiny_sdxl_dir, skin_dataset, tmp_path):
    out = tmp_path / "nan"
    logs = {}
    result = train(_args(tiny_sdxl_dir, skin_dataset, out, "--max_train_steps", 3, "--checkpointing_steps", 1,
                         "--debug_inject_nan_at_step", 2, "--max_nonfinite_steps", 2),
                   on_step=lambda step, values: logs.setdefault(step, dict(values)))
    assert result.nonfinite_steps == 1
    assert [logs[s]["nonfinite_steps"] for s in (1, 2, 3)] == [0, 1, 1]
    assert not torch.isfinite(torch.tensor(logs[2]["loss"]))
    after = {s: _weights(out / f"checkpoint-{s}" / "controlnet") for s in (1, 2, 3)}
    assert _max_difference(after[2], after[1]) == 0.0  # step 2 made no update
    assert _max_difference(after[3], after[2]) > 0.0
    assert all(torch.isfinite(t).all() for t in _weights(out).values())
    assert json.loads((out / "checkpoint-3" / "training_state.json").read_text())["nonfinite_steps"] == 1


def test_caches_are_reused_and_prompt_dropout_still_varies(tiny_sdxl_dir, skin_dataset, tmp_path):
    cache = tmp_path / "shared-cache"
    common = ["--max_train_steps", 6, "--proportion_empty_prompts", 0.5, "--embeddings_cache_dir", cache]
    recorder = RecordingLoss()
    logs = []
    first = train(_args(tiny_sdxl_dir, skin_dataset, tmp_path / "a", *common, "--checkpointing_steps", 2,
                        "--checkpoints_total_limit", 2),
                  extra_loss=recorder, on_step=lambda step, values: logs.append(values))
    assert [path.name for path in first.checkpoints] == ["checkpoint-4", "checkpoint-6"]
    assert first.cache_stats == {"text_embeddings_computed": NUM_ROWS + 1, "text_embeddings_reused": 0,
                                 "latents_computed": NUM_ROWS, "latents_reused": 0}
    files = {p: p.stat().st_mtime_ns for p in cache.rglob("*.safetensors")}
    assert len(files) == 2 * NUM_ROWS + 1  # captions + "" and one latent entry per image

    second = train(_args(tiny_sdxl_dir, skin_dataset, tmp_path / "b", *common))
    assert second.cache_stats == {"text_embeddings_computed": 0, "text_embeddings_reused": NUM_ROWS + 1,
                                  "latents_computed": 0, "latents_reused": NUM_ROWS}
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.safetensors")} == files

    # Dropout is decided per step: some row is trained both with its caption and with the empty prompt.
    seen: dict[str, set[str]] = {}
    for call in recorder.calls:
        for row_id, caption in zip(call["row_ids"], call["captions"]):
            seen.setdefault(row_id, set()).add("" if caption == "" else "caption")
    assert any(kinds == {"", "caption"} for kinds in seen.values())

    # The extra loss saw 64 px batches with boxes moved by the crop (80x64 -> 8 px cut on the left).
    call = recorder.calls[0]
    assert call["shapes"] == ((2, 4, 8, 8), (2, 4, 8, 8), (2,))
    assert torch.allclose(call["boxes"][0], torch.tensor([[[2.0, 10], [32, 10], [32, 30], [2, 30]]]))
    assert call["texts"][0] == ["前往"]
    assert {"loss", "loss_diffusion", "loss_recorder", "recorder_boxes"} <= logs[0].keys()
    assert logs[0]["loss_recorder"] == 0.0 and logs[0]["recorder_boxes"] == 2.0


def test_boxes_follow_the_resize_and_crop_of_the_image():
    image = Image.new("RGB", (256, 128))
    cropped, original, crop = resize_and_center_crop(image, 64)
    assert cropped.size == (64, 64) and original == (128, 256) and crop == (0, 32)
    quads = [[[100, 20], [140, 20], [140, 40], [100, 40]], [[0, 0], [20, 0], [20, 10], [0, 10]]]
    boxes, texts = transform_boxes(quads, ["kept", "outside"], original, crop, 64)
    assert texts == ["kept"]  # the second box lies left of the crop
    assert torch.allclose(boxes, torch.tensor([[[18.0, 10], [38, 10], [38, 20], [18, 20]]]))


def test_two_process_batches_partition_the_one_process_batches():
    one = list(GlobalBatchSampler(7, 2, 1, 0, seed=3, start_micro_step=0, end_micro_step=8))
    ranks = [list(GlobalBatchSampler(7, 1, 2, r, seed=3, start_micro_step=0, end_micro_step=8)) for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks)] == one
    assert sorted(row for batch in one[:4] for row, _ in batch) == sorted([*range(7), one[3][1][0]])  # epoch + top-up
    resumed = list(GlobalBatchSampler(7, 2, 1, 0, seed=3, start_micro_step=5, end_micro_step=8))
    assert resumed == one[5:]


def test_interrupted_saves_leave_the_previous_checkpoints_usable(tmp_path, monkeypatch):
    from accelerate import Accelerator

    from skingen.train.checkpoints import list_checkpoints, recover_interrupted_saves, save_checkpoint

    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(torch.nn.Linear(2, 2), torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))]))
    save_checkpoint(accelerator, tmp_path, 1, {"global_step": 1}, total_limit=None)

    def crash(output_dir, **kwargs):
        (Path(output_dir) / "partial.bin").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(accelerator, "save_state", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator, tmp_path, 2, {"global_step": 2}, total_limit=None)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [1]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    # A hard kill leaves temp folders: an unfinished save, and an old copy moved aside while being replaced.
    (tmp_path / ".checkpoint-3.x1y2").mkdir()
    (tmp_path / "checkpoint-1").rename(tmp_path / ".checkpoint-1.old")
    recover_interrupted_saves(tmp_path)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [1]
    assert (tmp_path / "checkpoint-1" / "training_state.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--dataset_name", "user/skins"], "exactly one of --train_data_dir"),
        (["--resolution", "60"], "--resolution must be a positive multiple of 8"),
        (["--resolution", "72"], "this model needs a multiple of 16"),
        (["--validation_prompt", "a skin"], "--validation_prompt and --validation_image go together"),
        (["--proportion_empty_prompts", "1.5"], "--proportion_empty_prompts must be between 0 and 1"),
        (["--use_8bit_adam"], "needs bitsandbytes"),
        (["--resume_from_checkpoint", "checkpoint-7"], "no such checkpoint folder"),
        (["--push_to_hub"], "the Hugging Face Hub is offline here"),
        (["--validation_loss_timesteps", "50", "1000"], "the scheduler has timesteps 0..999"),
    ],
)
def test_bad_flags_exit_2_with_a_clear_message(tiny_sdxl_dir, skin_dataset, tmp_path, capsys, extra, message):
    if extra == ["--use_8bit_adam"] and importlib.util.find_spec("bitsandbytes") is not None:
        extra, message = ["--enable_xformers_memory_efficient_attention"], "needs xformers"
    script = _load_script()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(script.main, _argv(tiny_sdxl_dir, skin_dataset, tmp_path / "out", *extra))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_dataset_exits_2_naming_the_row(tiny_sdxl_dir, skin_dataset, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    lines = (skin_dataset / "train.jsonl").read_text(encoding="utf-8").splitlines()
    (broken / "train.jsonl").write_text(lines[0].replace("images/0.png", "images/missing.png") + "\n", encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(_load_script().main, _argv(tiny_sdxl_dir, broken, tmp_path / "out", "--max_train_steps", 1))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "train.jsonl:1" in err and "missing.png" in err


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "configs" / "train").glob("*.yaml")))
def test_train_presets_parse(preset, tmp_path, monkeypatch):
    # Each preset is parsed by the trainer its header names (train_controlnet_sdxl.py when it names none). GPU
    # presets ask for bitsandbytes, which this machine need not have (that check has its own test).
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: object() if name == "bitsandbytes"
                        else find_spec(name, *rest))
    path = REPO / "configs" / "train" / preset
    named = re.search(r"train_controlnet_\w+\.py", path.read_text(encoding="utf-8"))
    script = load_script(named.group(0) if named else "train_controlnet_sdxl.py")
    args = script.parse_args(["--config", str(path), "--pretrained_model_name_or_path", "/models/base",
                              "--output_dir", str(tmp_path)])
    assert args.resolution in (512, 1024, 1328)  # 1328: Qwen-Image's native square size
    assert args.train_data_dir or args.dataset_name
    family = Path(script.__file__).stem.split("_")[-1]
    if family == "grpo":  # reward fine-tuning of a flow family's ControlNet, the family named in the preset
        assert args.backbone in ("sd3", "flux", "zimage", "qwenimage") and args.controlnet_model_name_or_path
    else:
        assert args.backbone == (family if family in ("sd3", "flux", "zimage", "qwenimage") else "sdxl")


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs" / "accelerate").glob("*.yaml")))
def test_accelerate_configs_load(config):
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(REPO / "configs" / "accelerate" / config))
    assert loaded.num_processes >= 1
