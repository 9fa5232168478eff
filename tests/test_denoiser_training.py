"""Training the denoiser itself with the one loop (train_text_to_image.py, skingen.train.denoiser_training).

Per family: a short run saves OUT/unet or OUT/transformer that the diffusers class loads and that moved from the
base's weights; on SDXL: resume is bit-exact, 2 processes train like 1, the EMA is saved as a denoiser, rows without
conditioning images load, ControlNet flags and ControlNet checkpoints are refused with one error line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from box_skins import write_box_skins
from launching import launch
from repo_scripts import load_script
from safetensors.torch import load_file

from skingen.errors import SkingenError, run_cli

WEIGHTS = "diffusion_pytorch_model.safetensors"
NUM_ROWS = 4
DENOISER = {"sdxl": ("unet", "UNet2DConditionModel"), "sd3": ("transformer", "SD3Transformer2DModel"),
            "flux": ("transformer", "FluxTransformer2DModel"), "zimage": ("transformer", "ZImageTransformer2DModel"),
            "qwenimage": ("transformer", "QwenImageTransformer2DModel")}

pytestmark = pytest.mark.usefixtures("one_torch_thread", "fresh_accelerate_state")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_box_skins(tmp_path_factory.mktemp("skins"), NUM_ROWS)


def _argv(family, base, dataset, out, *extra) -> list[str]:
    sequence = [] if family == "sdxl" else ["--max_sequence_length", "32"]
    return ["--backbone", family, "--pretrained_model_name_or_path", str(base), "--train_data_dir", str(dataset),
            "--output_dir", str(out), "--resolution", "64", "--train_batch_size", "2", "--learning_rate", "1e-3",
            "--lr_warmup_steps", "0", "--seed", "0", "--report_to", "none", *sequence, *map(str, extra)]


def _train(argv, **kwargs):
    from skingen.train.loop import train

    return train(load_script("train_text_to_image.py").parse_args(argv), **kwargs)


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.parametrize("family", tuple(DENOISER))
def test_short_run_saves_the_trained_denoiser_in_the_pipeline_layout(request, family, dataset, tmp_path):
    import diffusers

    base = request.getfixturevalue(f"tiny_{family}_dir")
    subfolder, class_name = DENOISER[family]
    out = tmp_path / "run"
    logs = {}
    result = _train(_argv(family, base, dataset, out, "--max_train_steps", 2, "--proportion_empty_prompts", 0.5),
                    on_step=lambda step, values: logs.update({step: values}))
    assert result.global_step == 2 and logs[2]["loss_diffusion"] > 0
    model_class = getattr(diffusers, class_name)
    trained, original = (dict(model_class.load_config(folder)) for folder in (out / subfolder, base / subfolder))
    assert model_class.from_pretrained(out / subfolder) is not None
    assert {k: v for k, v in trained.items() if not k.startswith("_")} == \
        {k: v for k, v in original.items() if not k.startswith("_")}
    assert _max_difference(load_file(out / subfolder / WEIGHTS), load_file(base / subfolder / WEIGHTS)) > 1e-4
    assert not (out / WEIGHTS).exists()  # no ControlNet was trained or saved


def test_resume_after_stop_matches_uninterrupted_run(tiny_sdxl_dir, dataset, tmp_path):
    common = ["--max_train_steps", 3, "--proportion_empty_prompts", 0.5, "--use_ema", "--ema_decay", 0.9,
              "--embeddings_cache_dir", tmp_path / "cache"]
    straight = tmp_path / "straight"
    _train(_argv("sdxl", tiny_sdxl_dir, dataset, straight, *common))

    stopped = tmp_path / "stopped"
    with pytest.raises(SkingenError, match=r"NaN/inf for 1 steps in a row.*checkpoint-2"):
        _train(_argv("sdxl", tiny_sdxl_dir, dataset, stopped, *common, "--checkpointing_steps", 2,
                     "--debug_inject_nan_at_step", 3, "--max_nonfinite_steps", 1))
    assert (stopped / "checkpoint-2" / "unet" / WEIGHTS).is_file()
    result = _train(_argv("sdxl", tiny_sdxl_dir, dataset, stopped, *common, "--checkpointing_steps", 2,
                          "--resume_from_checkpoint", "latest"))
    assert result.global_step == 3
    for folder in ("unet", "ema/unet"):
        assert _max_difference(load_file(stopped / folder / WEIGHTS), load_file(straight / folder / WEIGHTS)) < 1e-6
    # The resumed run went on training (step 3 changed the weights) and the average differs from the last weights.
    assert _max_difference(load_file(stopped / "unet" / WEIGHTS),
                           load_file(stopped / "checkpoint-2" / "unet" / WEIGHTS)) > 1e-5
    assert _max_difference(load_file(stopped / "unet" / WEIGHTS), load_file(stopped / "ema/unet" / WEIGHTS)) > 1e-6


def test_two_processes_match_one_process_with_same_global_batch(request, dataset, tmp_path):
    steps = ["--max_train_steps", 2, "--proportion_empty_prompts", 0.3]
    families = ("sdxl", "zimage")  # a UNet, and a transformer with parameters not every step uses (pad tokens)
    runs = []
    for family in families:
        base = request.getfixturevalue(f"tiny_{family}_dir")
        _train(_argv(family, base, dataset, tmp_path / f"{family}-one", *steps))
        runs.append(["train_text_to_image.py", _argv(family, base, dataset, tmp_path / f"{family}-two", *steps,
                                                     "--train_batch_size", 1)])
    finished = launch(runs, tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]
    for family in families:
        subfolder = DENOISER[family][0]
        one, two = (load_file(tmp_path / f"{family}-{n}" / subfolder / WEIGHTS) for n in ("one", "two"))
        base = load_file(request.getfixturevalue(f"tiny_{family}_dir") / subfolder / WEIGHTS)
        # Same data and noise, gradients averaged across the processes by DDP: only float rounding differs.
        assert _max_difference(two, one) < 1e-4 < _max_difference(one, base)


def test_rows_without_conditioning_images_train(tiny_sdxl_dir, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    write_box_skins(plain, 2)
    rows = [json.loads(line) for line in (plain / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    (plain / "train.jsonl").write_text("".join(json.dumps({"image": r["image"], "text": r["text"]}) + "\n" for r in rows),
                                       encoding="utf-8")
    result = _train(_argv("sdxl", tiny_sdxl_dir, plain, tmp_path / "out", "--max_train_steps", 1))
    assert result.global_step == 1 and (tmp_path / "out" / "unet" / WEIGHTS).is_file()


def test_controlnet_flags_and_checkpoints_are_refused_with_one_line(tiny_sdxl_dir, dataset, tmp_path, capsys):
    script = load_script("train_text_to_image.py")
    argv = _argv("sdxl", tiny_sdxl_dir, dataset, tmp_path / "out", "--max_train_steps", 1)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(script.main, [*argv, "--controlnet_model_name_or_path", str(tiny_sdxl_dir / "controlnet")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: --controlnet_model_name_or_path: this run trains the denoiser")

    # A ControlNet run's checkpoint in the output folder is not resumed as a denoiser.
    (tmp_path / "out" / "checkpoint-1" / "controlnet").mkdir(parents=True)
    with pytest.raises(SystemExit):
        run_cli(script.main, [*argv, "--resume_from_checkpoint", "latest"])
    assert "checkpoint-1 holds no unet/" in capsys.readouterr().err
