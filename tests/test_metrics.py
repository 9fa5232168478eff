"""skingen.evaluate.metrics: Canny-edge F1, OCR sentence accuracy / NED on known boxes, CLIP score (tiny CLIP built offline),
diversity (1 - SSIM, perceptual) per control and its wiring into evaluate.py."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image
from textimages import SKIN_TEXTS, skin_with_texts

from skingen.errors import SkingenError
from skingen.evaluate.metrics import (
    ClipScorer,
    PerceptualDistance,
    SSIMDistance,
    clip_score,
    diversity,
    edge_f1,
    edge_map_scores,
    edge_scores,
    levenshtein,
    normalized_edit_distance,
    sentence_accuracy,
    ssim,
    text_metrics,
)
from skingen.prep.glyphs import canny_control
from skingen.prep.ocr import get_ocr


def keyboard_like(size: int = 128, shift: int = 0) -> np.ndarray:
    """Coloured blocks on a background, like merged skin elements; ``shift`` moves everything right."""
    image = np.full((size, size, 3), (235, 225, 240), np.uint8)
    blocks = [
        ((8, 8), (120, 30), (200, 60, 90)),
        ((8, 40), (60, 118), (40, 90, 200)),
        ((70, 40), (120, 118), (30, 160, 70)),
    ]
    for (x0, y0), (x1, y1), colour in blocks:
        cv2.rectangle(image, (x0 + shift, y0), (x1 + shift, y1), colour, -1)
    cv2.circle(image, (34 + shift, 79), 14, (250, 250, 250), -1)
    return image


@pytest.fixture(scope="module")
def ocr():
    return get_ocr("rapidocr")


def test_edge_f1_is_one_for_the_image_against_its_own_canny_control():
    image = keyboard_like()
    control = canny_control(image)
    assert edge_f1(image, control) == 1.0
    assert edge_f1(Image.fromarray(image), control, tolerance=0) == 1.0


def test_edge_f1_drops_when_the_layout_moves_and_tolerance_absorbs_small_shifts():
    image = keyboard_like()
    control = canny_control(image)
    far = edge_f1(keyboard_like(shift=6), control)
    near = edge_f1(keyboard_like(shift=1), control)
    assert far < 0.6
    assert near > 0.95
    assert edge_f1(keyboard_like(shift=1), control, tolerance=0) < 0.6
    assert edge_f1(keyboard_like(shift=6), control, tolerance=8) > 0.95


def test_edge_f1_resizes_the_generated_image_to_the_control():
    image = keyboard_like(size=128)
    control = canny_control(image)
    big = cv2.resize(image, (256, 256), interpolation=cv2.INTER_NEAREST)
    assert edge_f1(big, control) > 0.9
    assert edge_f1(cv2.resize(keyboard_like(shift=6), (256, 256), interpolation=cv2.INTER_NEAREST), control) < 0.6


def test_edge_precision_and_recall_are_directional():
    target = np.zeros((64, 64), bool)
    target[10, 5:60] = True
    extra = target.copy()
    extra[40, 5:60] = True  # an extra line the control does not have
    scores = edge_map_scores(extra, target, tolerance=1)
    assert scores.recall == 1.0
    assert scores.precision == pytest.approx(0.5)
    assert scores.f1 == pytest.approx(2 / 3)
    assert edge_map_scores(target, extra, tolerance=1).recall == pytest.approx(0.5)
    assert edge_map_scores(np.zeros_like(target), target).f1 == 0.0
    assert edge_map_scores(np.zeros_like(target), np.zeros_like(target)).f1 == 1.0


def test_blank_generation_scores_zero_against_a_real_control():
    control = canny_control(keyboard_like())
    scores = edge_scores(np.full((128, 128, 3), 128, np.uint8), control)
    assert (scores.precision, scores.recall, scores.f1) == (0.0, 0.0, 0.0)


def test_normalized_edit_distance_on_known_pairs():
    assert levenshtein("kitten", "sitting") == levenshtein("sitting", "kitten") == 3
    assert normalized_edit_distance("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert normalized_edit_distance("前往", "前往") == 1.0
    assert normalized_edit_distance("前往", "前住") == pytest.approx(0.5)
    assert normalized_edit_distance("搜索", "") == 0.0
    assert normalized_edit_distance("", "") == 1.0
    assert normalized_edit_distance("设置", "设置中心") == pytest.approx(0.5)


def test_sentence_accuracy_counts_exact_lines():
    assert sentence_accuracy(["前往", "搜素", "设置"], ["前往", "搜索", "设置"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        sentence_accuracy(["a"], ["a", "b"])


def test_text_metrics_read_rendered_ground_truth_perfectly(ocr):
    image, quads = skin_with_texts()
    result = text_metrics(image, quads, SKIN_TEXTS, ocr)
    assert [line.predicted for line in result.lines] == SKIN_TEXTS
    assert result.sentence_accuracy == 1.0 and result.ned == 1.0


def test_text_metrics_drop_when_the_image_shows_other_text(ocr):
    image, quads = skin_with_texts(["前进", "搜索", "设定"])
    result = text_metrics(image, quads, SKIN_TEXTS, ocr)
    assert [line.correct for line in result.lines] == [False, True, False]
    assert result.sentence_accuracy == pytest.approx(1 / 3)
    assert result.ned == pytest.approx((0.5 + 1.0 + 0.5) / 3)


def test_text_metrics_scale_boxes_to_a_smaller_generated_image(ocr):
    image, quads = skin_with_texts(font_size=60, size=(560, 200))
    half = image.resize((image.width // 2, image.height // 2), Image.Resampling.LANCZOS)
    assert text_metrics(half, quads, SKIN_TEXTS, ocr, box_scale=(0.5, 0.5)).sentence_accuracy == 1.0
    # Unscaled boxes fall off the text.
    assert text_metrics(half, quads, SKIN_TEXTS, ocr).sentence_accuracy < 1.0
    with pytest.raises(SkingenError, match="2 boxes but 3 texts"):
        text_metrics(image, quads[:2], SKIN_TEXTS, ocr)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A CLIP model with random weights, a byte-level tokenizer and an image processor, saved like a hub download."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from skingen.testing.tiny_sdxl import build_clip_tokenizer

    out = tmp_path_factory.mktemp("tiny_clip")
    tokenizer = build_clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(out)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


def test_clip_score_matches_the_model_cosine(tiny_clip):
    import torch
    from transformers import CLIPModel, CLIPProcessor

    images = [keyboard_like(), keyboard_like(shift=30), np.full((64, 64, 3), 200, np.uint8)]
    prompts = ["a pink keyboard skin, iflyskin", "a blue keyboard skin", 'a skin, writing "前往"']
    scorer = ClipScorer(tiny_clip)
    scores = scorer(images, prompts, batch_size=2)

    model, processor = CLIPModel.from_pretrained(tiny_clip), CLIPProcessor.from_pretrained(tiny_clip)
    expected = []
    for image, prompt in zip(images, prompts):
        with torch.no_grad():
            pixel = processor(images=Image.fromarray(image), return_tensors="pt")["pixel_values"]
            ids = processor(text=[prompt], return_tensors="pt")["input_ids"]
            image_vec = model.visual_projection(model.vision_model(pixel_values=pixel).pooler_output)[0]
            text_vec = model.text_projection(model.text_model(input_ids=ids).pooler_output)[0]
        expected.append(100 * max(torch.nn.functional.cosine_similarity(image_vec, text_vec, dim=0).item(), 0.0))
    assert scores == pytest.approx(expected, abs=1e-3)
    assert all(0.0 <= s <= 100.0 for s in scores)
    assert clip_score(images[:1], prompts[:1], tiny_clip) == pytest.approx(scores[:1], abs=1e-4)


def test_clip_model_missing_is_a_clear_error(tmp_path):
    with pytest.raises(SkingenError, match="--clip_model .*local folder"):
        ClipScorer(tmp_path / "no_clip")


# ---------------------------------------------------------------------------------------------------------------
# Diversity


def noisy_keyboard(seed: int, size: int = 96) -> np.ndarray:
    """The keyboard-like image with seed-dependent noise and a seed-dependent shift: another "seed" of one control."""
    rng = np.random.default_rng(seed)
    base = keyboard_like(size, shift=int(rng.integers(0, 20))).astype(np.int16)
    return np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)


def test_ssim_is_one_for_identical_images_and_matches_the_closed_form_on_flat_ones():
    image = noisy_keyboard(0).mean(axis=-1)
    assert ssim(image, image) == pytest.approx(1.0)
    # Flat images have no variance: SSIM reduces to the luminance term (2ab + C1) / (a^2 + b^2 + C1).
    a, b, c1 = 100.0, 140.0, (0.01 * 255) ** 2
    flat_a, flat_b = np.full((32, 32), a), np.full((32, 32), b)
    assert ssim(flat_a, flat_b) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1))
    other = noisy_keyboard(1).mean(axis=-1)
    assert ssim(image, other) == pytest.approx(ssim(other, image))
    assert ssim(image, other) < 0.9


def test_ssim_distance_is_zero_for_identical_images_and_grows_with_difference():
    measure = SSIMDistance()
    same, near, far = measure.features([keyboard_like(), keyboard_like(shift=2), noisy_keyboard(3)])
    assert measure.distance(same, same) == pytest.approx(0.0, abs=1e-9)
    assert 0.0 < measure.distance(same, near) < measure.distance(same, far)
    with pytest.raises(SkingenError, match="--diversity_size"):
        SSIMDistance(8)


def write_images(folder, images) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        paths.append(str(folder / f"{index}.png"))
        Image.fromarray(image).save(paths[-1])
    return paths


def test_diversity_is_measured_per_control_over_its_seeds(tmp_path):
    identical = write_images(tmp_path / "same", [keyboard_like()] * 3)
    varied = write_images(tmp_path / "varied", [noisy_keyboard(seed) for seed in range(3)])
    single = write_images(tmp_path / "single", [noisy_keyboard(9)])
    records = [{"id": p, "output": p, "control": "controls/a.png", "prompt": "a skin"} for p in identical]
    records += [{"id": p, "output": p, "control": "controls/b.png", "prompt": "a skin"} for p in varied]
    # Same control, another prompt: its own group (one image, so no diversity for it).
    records += [{"id": p, "output": p, "control": "controls/b.png", "prompt": "another skin"} for p in single]

    result = diversity(records, SSIMDistance())
    by_control = {(group["control"], group["prompt"]): group for group in result["per_control"]}
    assert set(by_control) == {("controls/a.png", "a skin"), ("controls/b.png", "a skin")}
    assert by_control[("controls/a.png", "a skin")]["diversity"] == pytest.approx(0.0, abs=1e-9)
    assert by_control[("controls/b.png", "a skin")]["diversity"] > 0.1
    assert by_control[("controls/b.png", "a skin")]["images"] == 3
    assert result["controls"] == 2
    assert result["overall"] == pytest.approx(by_control[("controls/b.png", "a skin")]["diversity"] / 2)
    assert diversity(records[:1], SSIMDistance())["overall"] is None


def test_perceptual_diversity_uses_a_local_vision_model(tiny_clip, tmp_path):
    measure = PerceptualDistance(tiny_clip)
    same, other = measure.features([keyboard_like(), noisy_keyboard(5)])
    assert measure.distance(same, same) == pytest.approx(0.0, abs=1e-5)
    assert measure.distance(same, other) > 0.0
    with pytest.raises(SkingenError, match="--diversity_model .*local folder"):
        PerceptualDistance(tmp_path / "no_model")


def test_evaluate_reports_diversity_in_metrics_and_compare(tmp_path):
    import json

    import evaluate
    from skingen.fileio import write_jsonl

    control = tmp_path / "control.png"
    canny_control(keyboard_like()).save(control)
    folders = {}
    for name, images in (("varied", [noisy_keyboard(s) for s in range(3)]), ("collapsed", [keyboard_like()] * 3)):
        folder = tmp_path / name
        write_images(folder / "images", images)
        write_jsonl(folder / "results.jsonl", [
            {"row_id": "images/0.png", "prompt": "a skin", "seed": seed, "conditioning_image": str(control),
             "output": f"images/{seed}.png"}
            for seed in range(3)
        ])
        evaluate.main(["--results_dir", str(folder), "--ocr_backend", "none"])
        folders[name] = folder

    varied = json.loads((folders["varied"] / "metrics.json").read_text(encoding="utf-8"))
    collapsed = json.loads((folders["collapsed"] / "metrics.json").read_text(encoding="utf-8"))
    assert varied["summary"]["diversity"] > 0.1
    assert collapsed["summary"]["diversity"] == pytest.approx(0.0, abs=1e-9)
    assert varied["diversity"]["measure"] == "1 - SSIM (64 px grey)"
    assert [group["images"] for group in varied["diversity"]["per_control"]] == [3]
    assert "## Diversity per control" in (folders["varied"] / "metrics.md").read_text(encoding="utf-8")

    evaluate.main(["--compare", str(folders["varied"]), str(folders["collapsed"]), "--output_dir", str(tmp_path / "cmp")])
    comparison = json.loads((tmp_path / "cmp" / "comparison.json").read_text(encoding="utf-8"))
    row = next(row for row in comparison["summary"] if row["key"] == "diversity")
    assert row["delta"] == pytest.approx(-varied["summary"]["diversity"])
    assert [r["control"] for r in comparison["diversity_per_control"]] == ["control.png"]
    assert "## Diversity per control (in both)" in (tmp_path / "cmp" / "comparison.md").read_text(encoding="utf-8")
