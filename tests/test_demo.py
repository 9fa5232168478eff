"""The demo: its report from small fake results (comparison.json schema, table, grid), the cached tiny base
pre-training, and scripts/demo.sh end to end at toy sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image
from repo_scripts import REPO, load_script

from skingen.fileio import write_jsonl

SUMMARY_KEYS = {"images", "text_lines", "edge_f1", "edge_precision", "edge_recall", "sentence_accuracy", "ned",
                "clip_score", "diversity"}


def fake_arm(demo_dir, arm: str, edge_f1: float, colour, seeds=(0, 1)) -> None:
    """An evaluated inference folder: two held-out rows x ``seeds``, results.jsonl and metrics.json."""
    folder = demo_dir / arm
    (folder / "images").mkdir(parents=True)
    records = []
    for row in range(2):
        for seed in seeds:
            output = f"images/skin_{row}_s{seed}.png"
            Image.new("RGB", (64, 64), colour).save(folder / output)
            records.append({"row_id": f"images/skin_{row}.png", "seed": seed, "output": output, "prompt": "a skin",
                            "conditioning_image": str(demo_dir / "control.png"),
                            "reference_image": str(demo_dir / "real.png")})
    write_jsonl(folder / "results.jsonl", records)
    summary = {"images": len(records), "text_lines": 8, "edge_f1": edge_f1, "edge_precision": edge_f1,
               "edge_recall": edge_f1, "sentence_accuracy": 0.0, "ned": 0.1, "clip_score": None, "diversity": 0.2}
    (folder / "metrics.json").write_text(json.dumps({"summary": summary, "images": []}), encoding="utf-8")


def fake_training_logs(demo_dir) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(demo_dir / "controlnet" / "logs" / "run"))
    for step, ctc, diffusion in ((0, 0.9, 0.30), (50, 0.7, 0.25), (100, 0.5, 0.21)):
        writer.add_scalar("val_text_ctc", ctc, step)
        writer.add_scalar("val_loss_diffusion", diffusion, step)
    writer.add_scalar("loss", 0.4, 10)
    writer.close()


@pytest.fixture
def fake_demo(tmp_path):
    demo = tmp_path / "demo"
    demo.mkdir()
    Image.new("RGB", (64, 64), "white").save(demo / "real.png")
    Image.new("RGB", (64, 64), "black").save(demo / "control.png")
    fake_arm(demo, "untrained", 0.30, (200, 0, 0))
    fake_arm(demo, "trained", 0.55, (0, 0, 200))
    fake_training_logs(demo)
    return demo


def test_report_puts_untrained_and_trained_side_by_side(fake_demo, capsys):
    load_script("scripts/demo_report.py").main(["--demo_dir", str(fake_demo)])

    comparison = json.loads((fake_demo / "comparison.json").read_text(encoding="utf-8"))
    assert set(comparison) == {"untrained", "trained"}
    for arm in comparison.values():
        assert set(arm) == SUMMARY_KEYS | {"val_text_ctc", "val_loss_diffusion", "val_edge_f1"}
    assert (comparison["untrained"]["edge_f1"], comparison["trained"]["edge_f1"]) == (0.30, 0.55)
    # Fixed-timestep losses: step 0 (before training) is the untrained ControlNet, the last step the trained one.
    assert comparison["untrained"]["val_text_ctc"] == pytest.approx(0.9)
    assert comparison["trained"]["val_text_ctc"] == pytest.approx(0.5)
    assert comparison["trained"]["val_loss_diffusion"] == pytest.approx(0.21)

    report = (fake_demo / "report.md").read_text(encoding="utf-8")
    assert "| edge F1 (Canny edges of the output vs the control) | 0.300 | 0.550 | trained |" in report
    assert "| val_text_ctc (recognizer CTC per character, fixed timesteps) | 0.900 | 0.500 | trained |" in report
    assert "edge F1 0.300 -> 0.550 (+0.250)" in report
    assert "cannot" in report  # says what the tiny model cannot do
    assert "report.md" in capsys.readouterr().out

    grid = Image.open(fake_demo / "demo_grid.png").convert("RGB")
    tile = 128
    assert grid.size == ((2 + 2 * 2) * tile, 18 + 2 * tile)  # real | control | 2 untrained | 2 trained, 2 rows
    row_middle = 18 + tile // 2
    assert grid.getpixel((tile // 2, row_middle)) == (255, 255, 255)  # the real atlas
    assert grid.getpixel((2 * tile + tile // 2, row_middle)) == (200, 0, 0)  # untrained
    assert grid.getpixel((4 * tile + tile // 2, row_middle)) == (0, 0, 200)  # trained, same seed order


def test_report_says_so_when_training_did_not_help(fake_demo):
    metrics_path = fake_demo / "trained" / "metrics.json"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    metrics["summary"]["edge_f1"] = 0.2
    metrics_path.write_text(json.dumps(metrics), encoding="utf-8")
    load_script("scripts/demo_report.py").main(["--demo_dir", str(fake_demo)])
    report = (fake_demo / "report.md").read_text(encoding="utf-8")
    assert "did NOT follow the held-out layouts better" in report
    assert "| 0.300 | 0.200 | untrained |" in report

    metrics["summary"]["edge_f1"] = 0.303  # +1%: better in the table, not clearly better in the verdict
    metrics_path.write_text(json.dumps(metrics), encoding="utf-8")
    load_script("scripts/demo_report.py").main(["--demo_dir", str(fake_demo)])
    report = (fake_demo / "report.md").read_text(encoding="utf-8")
    assert "NOT clearly better on the held-out layouts: edge F1 0.300 -> 0.303 (+0.003)" in report


def test_report_without_results_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "scripts/demo_report.py", "--demo_dir", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "metrics.json not found: run scripts/demo.sh" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_pretrained_base_is_cached_by_its_settings(tmp_path, cjk_font, fresh_accelerate_state):
    from diffusers import ControlNetModel, UNet2DConditionModel

    skins, corpus, base = tmp_path / "skins", tmp_path / "corpus", tmp_path / "base"
    subprocess.run([sys.executable, "scripts/make_synthetic_skins.py", "--out", str(skins), "--n", "3", "--seed", "5"],
                   cwd=REPO, check=True, capture_output=True)
    subprocess.run([sys.executable, "merge_elements.py", "--packages_dir", str(skins), "--layout", "full_keyboard",
                    "--resolution", "512", "--output_dir", str(corpus)], cwd=REPO, check=True, capture_output=True)
    subprocess.run([sys.executable, "caption.py", "--dataset_dir", str(corpus), "--captioner", "template"], cwd=REPO,
                   check=True, capture_output=True)
    script = load_script("scripts/pretrain_tiny_base.py")
    argv = ["--dataset_dir", str(corpus), "--output_dir", str(base), "--resolution", "64", "--vae_fit_steps", "2",
            "--max_train_steps", "3", "--train_batch_size", "2"]
    script.main(argv)
    record = json.loads((base / "pretrain.json").read_text(encoding="utf-8"))
    assert record["images"] == 3 and record["settings"]["max_train_steps"] == 3
    # The UNet was trained: it differs from the random one a fresh build writes.
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    from skingen.testing.tiny_sdxl import build_tiny_sdxl

    build_tiny_sdxl(tmp_path / "random", seed=0)
    random_unet = UNet2DConditionModel.from_pretrained(tmp_path / "random" / "unet")
    assert any((a - b).abs().max() > 0 for a, b in zip(unet.parameters(), random_unet.parameters()))
    # The untrained ControlNet starts from the trained UNet (its encoder copies the UNet's).
    controlnet = ControlNetModel.from_pretrained(base / "controlnet")
    assert (controlnet.conv_in.weight == unet.conv_in.weight).all()

    weights = (base / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    proc = subprocess.run([sys.executable, "scripts/pretrain_tiny_base.py", *argv], cwd=REPO, capture_output=True,
                          text=True)
    assert proc.returncode == 0 and "reusing the pre-trained base" in proc.stdout
    assert (base / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == weights

    script.main([*argv[:-1], "3"])  # another batch size: trained again
    assert json.loads((base / "pretrain.json").read_text(encoding="utf-8"))["settings"]["train_batch_size"] == 3


def test_demo_runs_every_stage_and_compares_untrained_with_trained(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, OUT=str(out), NUM_SKINS="4", VAL_FRACTION="0.25", BASE_SKINS="2", PRETRAIN_STEPS="2", VAE_FIT_STEPS="2",
               TRAIN_STEPS="2", INFERENCE_STEPS="2", RESOLUTION="64", IMAGES_PER_LAYOUT="2")
    proc = subprocess.run(["bash", "scripts/demo.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in range(1, 10):
        assert f"== {stage}/9" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr

    comparison = json.loads((out / "comparison.json").read_text(encoding="utf-8"))
    validation_rows = (out / "dataset" / "validation.jsonl").read_text().splitlines()
    for arm in ("untrained", "trained"):
        metrics = json.loads((out / arm / "metrics.json").read_text(encoding="utf-8"))
        # Control specificity needs another held-out layout's control to score against.
        extra = ("val_text_ctc", "val_loss_diffusion", "val_edge_f1")
        extra += ("edge_f1_other_layouts", "edge_f1_own_minus_other") if len(validation_rows) > 1 else ()
        assert comparison[arm] == {**metrics["summary"], **{key: comparison[arm][key] for key in extra}}
        assert 0 < comparison[arm]["val_edge_f1"] <= 1  # the demo trains with the edge loss, which logs it
        assert metrics["summary"]["images"] == 2 * len(validation_rows) > 0
        assert metrics["diversity"]["controls"] == len(validation_rows)
        assert comparison[arm]["val_loss_diffusion"] is not None
    # Same held-out rows and seeds in both arms.
    seeds = {arm: sorted((r["row_id"], r["seed"]) for r in map(json.loads, (out / arm / "results.jsonl").open()))
             for arm in ("untrained", "trained")}
    assert seeds["untrained"] == seeds["trained"]
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "| edge F1" in report
    # The base saw whole keyboards, never the atlas layout the ControlNet is trained on, and the report says so.
    base_rows = [json.loads(line) for line in (out / "base_corpus" / "train.jsonl").read_text().splitlines()]
    assert {row["layout"] for row in base_rows} == {"full_keyboard"}
    assert "full_keyboard images" in report and "whole keyboards" in report
    assert Image.open(out / "demo_grid.png").width == (2 + 2 * 2) * 128
    # Each skin's own Canny edges are its control (binary), and the glyph pass left the boxes for the text loss.
    rows = [json.loads(line) for line in validation_rows]
    control = Image.open(out / "dataset" / rows[0]["conditioning_image"]).convert("L")
    assert set(control.getdata()) <= {0, 255} and "box" in rows[0]

    # A rerun on another base (more pre-training steps) must not resume the ControlNet trained on the first one:
    # that folder is moved aside, kept whole, and a new ControlNet is trained.
    first_key = (out / "controlnet" / "base_key").read_text(encoding="utf-8").strip()
    assert first_key == json.loads((out / "base" / "pretrain.json").read_text(encoding="utf-8"))["key"]
    proc = subprocess.run(["bash", "scripts/demo.sh"], cwd=REPO, env={**env, "PRETRAIN_STEPS": "3"},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "trained on another base" in proc.stdout
    [stale] = out.glob("controlnet.other-base.*")
    assert (stale / "base_key").read_text(encoding="utf-8").strip() == first_key
    assert (stale / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "controlnet" / "base_key").read_text(encoding="utf-8").strip() != first_key


@pytest.mark.parametrize("flag", ["--learning_rate", "--vae_learning_rate"])
def test_pretraining_refuses_a_rate_that_is_not_positive(flag):
    from skingen.errors import SkingenError

    script = load_script("scripts/pretrain_tiny_base.py")
    with pytest.raises(SkingenError, match=f"{flag} must be > 0, got 0.0"):
        script.parse_args(["--dataset_dir", "d", "--output_dir", "o", flag, "0"])


def test_edge_f1_room_separates_a_skins_own_edges_from_another_skins(tmp_path):
    from PIL import ImageDraw

    from skingen.prep.glyphs import canny_control

    report = load_script("scripts/demo_report.py")
    rows = []
    for i, box in enumerate([(8, 8, 40, 30), (30, 34, 60, 60), (4, 40, 24, 60)]):
        real = Image.new("RGB", (64, 64), (30, 30, 30))
        ImageDraw.Draw(real).rectangle(box, fill=(230, 230, 230))  # each skin's own shape
        real.save(tmp_path / f"real_{i}.png")
        canny_control(real).save(tmp_path / f"control_{i}.png")
        rows.append({"reference_image": str(tmp_path / f"real_{i}.png"),
                     "conditioning_image": str(tmp_path / f"control_{i}.png")})
    # A perfect VAE gives each control back exactly; the other skins' shapes are elsewhere.
    room = report.edge_f1_room(rows, reconstruct=lambda path: Image.open(path).convert("RGB"))
    assert room["layouts"] == 3 and room["vae_ceiling"] == pytest.approx(1.0)
    assert room["other_skin"] < 0.3
    line = report.room_lines(room)[0]
    assert "scores 1.000" in line and f"{1.0 - room['other_skin']:+.3f}" in line

    # Through a real (random tiny) VAE the same numbers come out, in [0, 1].
    from skingen.testing.tiny_sdxl import build_tiny_sdxl

    build_tiny_sdxl(tmp_path / "base", seed=0)
    room = report.edge_f1_room(rows, report.vae_reconstructor(tmp_path / "base" / "vae", (64, 64)))
    assert 0.0 <= room["other_skin"] <= 1.0 and 0.0 <= room["vae_ceiling"] <= 1.0


def test_control_specificity_tells_an_output_that_follows_its_control_from_one_that_ignores_it(tmp_path):
    from PIL import ImageDraw

    from skingen.prep.glyphs import canny_control

    report = load_script("scripts/demo_report.py")
    boxes = [(8, 8, 40, 30), (30, 34, 60, 60), (4, 40, 24, 60)]
    for arm in ("follows", "ignores"):
        (tmp_path / arm / "images").mkdir(parents=True)
    records = {"follows": [], "ignores": []}
    for i, box in enumerate(boxes):
        real = Image.new("RGB", (64, 64), (30, 30, 30))
        ImageDraw.Draw(real).rectangle(box, fill=(230, 230, 230))
        canny_control(real).save(tmp_path / f"control_{i}.png")
        real.save(tmp_path / "follows" / "images" / f"{i}.png")  # draws its own layout's shape
        fixed = Image.new("RGB", (64, 64), (30, 30, 30))
        ImageDraw.Draw(fixed).rectangle((20, 20, 44, 44), fill=(230, 230, 230))  # the same shape whatever the control
        fixed.save(tmp_path / "ignores" / "images" / f"{i}.png")
        for arm in records:
            records[arm].append({"row_id": f"row_{i}", "seed": 0, "output": f"images/{i}.png",
                                 "conditioning_image": str(tmp_path / f"control_{i}.png")})
    for arm, rows in records.items():
        write_jsonl(tmp_path / arm / "results.jsonl", rows)
    follows, ignores = (report.control_specificity(tmp_path / arm) for arm in ("follows", "ignores"))
    assert follows["edge_f1_own_minus_other"] > 0.5
    assert abs(ignores["edge_f1_own_minus_other"]) < 0.1


@pytest.mark.parametrize("layout, says", [("full_keyboard", "other skins' whole keyboards"),
                                          ("key_elements", "other skins' atlases")])
def test_report_says_what_the_base_was_pretrained_on(fake_demo, layout, says):
    corpus = fake_demo / "corpus"
    corpus.mkdir()
    (corpus / "train.jsonl").write_text(json.dumps({"image": "images/a.png", "layout": layout}) + "\n", encoding="utf-8")
    (fake_demo / "base").mkdir(exist_ok=True)
    record = {"key": "k", "settings": {"preset": "tiny", "pretrained_vae": None, "resolution": 64, "max_train_steps": 2},
              "datasets": [str(corpus)], "images": 1, "vae_fit": {"initial_l1": 0.5, "final_l1": 0.2},
              "denoiser_fit": {"first_loss": 0.4, "last_loss": 0.1}, "seconds": 1.0}
    (fake_demo / "base" / "pretrain.json").write_text(json.dumps(record), encoding="utf-8")
    load_script("scripts/demo_report.py").main(["--demo_dir", str(fake_demo)])
    report = (fake_demo / "report.md").read_text(encoding="utf-8")
    assert f"other skins' {layout} images at 64 px" in report and says in report


def test_report_says_when_the_room_was_not_measured(fake_demo):
    load_script("scripts/demo_report.py").main(["--demo_dir", str(fake_demo)])  # no base/vae in the fake demo
    assert "room for edge F1: not measured" in (fake_demo / "report.md").read_text(encoding="utf-8")
