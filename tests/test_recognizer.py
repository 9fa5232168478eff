"""The torch PP-OCRv4 recognizer: same numbers as onnxruntime, reads rendered text, frozen, differentiable."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from skingen.errors import SkingenError
from skingen.train.recognizer import (
    BLANK_TOKEN,
    REC_HEIGHT,
    REC_MAX_WIDTH,
    ctc_greedy_decode,
    default_model_path,
    encode_texts,
    load_recognizer,
    preprocess_crops,
)

FONT_PATH = "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"


def render_line(text: str, size: int = 40, fg=(20, 20, 20), bg=(255, 255, 255), pad: int = 10) -> np.ndarray:
    """``text`` drawn in the CJK font on a plain background, tightly framed: an (h, w, 3) RGB uint8 crop."""
    font = ImageFont.truetype(FONT_PATH, size)
    left, top, right, bottom = font.getbbox(text)
    image = Image.new("RGB", (right - left + 2 * pad, bottom - top + 2 * pad), bg)
    ImageDraw.Draw(image).text((pad - left, pad - top), text, font=font, fill=fg)
    return np.asarray(image)


@pytest.fixture(scope="module")
def recognizer():
    return load_recognizer()


@pytest.fixture(scope="module")
def onnx_session():
    return ort.InferenceSession(str(default_model_path()), providers=["CPUExecutionProvider"])


def test_charset_comes_from_the_model_metadata(recognizer, onnx_session):
    characters = onnx_session.get_modelmeta().custom_metadata_map["character"].splitlines()
    assert len(characters) == 6623
    assert recognizer.charset == [BLANK_TOKEN, *characters, " "]
    assert recognizer.head.out_features == len(recognizer.charset) == 6625


@pytest.mark.parametrize("width", [8, 37, 100, 320])
def test_matches_onnxruntime_on_random_inputs(recognizer, onnx_session, width):
    x = np.random.default_rng(width).uniform(-1, 1, size=(2, 3, REC_HEIGHT, width)).astype(np.float32)
    expected = onnx_session.run(None, {"x": x})[0]
    with torch.no_grad():
        got = recognizer.probs(torch.from_numpy(x)).numpy()
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-4


def test_matches_onnxruntime_and_reads_rendered_crops(recognizer, onnx_session):
    words = ["前往", "搜索", "Hello 123", "删除"]
    crops = [render_line(words[0]), render_line(words[1], fg=(250, 250, 250), bg=(40, 90, 160)), *map(render_line, words[2:])]
    x = preprocess_crops(crops)
    assert x.shape == (4, 3, REC_HEIGHT, REC_MAX_WIDTH)
    expected = onnx_session.run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        got = recognizer.probs(x)
    assert np.abs(got.numpy() - expected).max() < 1e-4
    readings = recognizer.read(x)
    assert [text for text, _ in readings] == words
    assert all(score > 0.9 for _, score in readings)


def test_stays_frozen_and_in_eval_mode(recognizer):
    recognizer.train()
    assert not recognizer.training
    assert not any(module.training for module in recognizer.modules())
    assert not any(p.requires_grad for p in recognizer.parameters())
    running_mean = recognizer.backbone.stem_bn.running_mean.clone()
    recognizer(torch.randn(3, 3, REC_HEIGHT, 64) * 5)
    assert torch.equal(recognizer.backbone.stem_bn.running_mean, running_mean)


def test_gradients_reach_input_pixels(recognizer):
    crop = torch.tensor(render_line("前往"), dtype=torch.float32).permute(2, 0, 1).requires_grad_(True)
    log_probs = recognizer.log_probs(preprocess_crops([crop]))
    targets, lengths, unknown = encode_texts(["搜索"], recognizer.charset)
    loss = F.ctc_loss(log_probs.transpose(0, 1), targets, torch.tensor([log_probs.shape[1]]), lengths, blank=0)
    loss.backward()
    assert unknown == 0
    assert crop.grad is not None and torch.isfinite(crop.grad).all()
    assert crop.grad.abs().sum() > 0


def test_features_are_the_neck_sequence(recognizer):
    x = preprocess_crops([render_line("搜索")])
    with torch.no_grad():
        features = recognizer.features(x)
        assert features.shape == (1, REC_MAX_WIDTH // 8, 120)
        assert torch.allclose(recognizer.head(features), recognizer(x))


def test_encode_texts_maps_width_variants_and_counts_unknown(recognizer):
    charset = recognizer.charset
    # The dictionary lacks full-width Ｑ and ｗ: they map to Q and w; " " is the last class.
    targets, lengths, unknown = encode_texts(["前往", "Ｑｗ １", "a😀b"], charset)
    assert lengths.tolist() == [2, 4, 2]
    assert unknown == 1  # the emoji
    assert [charset[i] for i in targets.tolist()] == ["前", "往", "Q", "w", " ", "１", "a", "b"]
    assert targets[4] == len(charset) - 1
    assert 0 not in targets.tolist()  # the blank is never a target


def test_ctc_greedy_decode_merges_repeats_and_drops_blanks(recognizer):
    charset = recognizer.charset
    ids = [0, charset.index("前"), charset.index("前"), 0, charset.index("前"), charset.index("往"), 0]
    probs = F.one_hot(torch.tensor([ids]), len(charset)).float() * 0.8
    assert ctc_greedy_decode(probs, charset) == [("前前往", pytest.approx(0.8))]
    assert ctc_greedy_decode(np.zeros((1, 3, len(charset)), dtype=np.float32), charset) == [("", 0.0)]


def test_preprocess_keeps_aspect_caps_width_and_pads():
    square = np.full((24, 24, 3), 255, dtype=np.uint8)
    long_line = np.full((10, 400, 3), 0, dtype=np.uint8)
    x = preprocess_crops([square, long_line])
    assert x.shape == (2, 3, REC_HEIGHT, REC_MAX_WIDTH)
    assert torch.allclose(x[0, :, :, :48], torch.ones(3, REC_HEIGHT, 48))  # white -> +1, resized to 48 wide
    assert torch.equal(x[0, :, :, 48:], torch.zeros(3, REC_HEIGHT, REC_MAX_WIDTH - 48))  # zero padding
    assert torch.allclose(x[1], -torch.ones(3, REC_HEIGHT, REC_MAX_WIDTH))  # capped at 320, no padding
    red = np.zeros((48, 48, 3), dtype=np.uint8)
    red[..., 0] = 255
    assert torch.allclose(preprocess_crops([red])[0, :, 0, 0], torch.tensor([-1.0, -1.0, 1.0]))  # BGR order


def test_custom_dictionary_and_bad_paths(tmp_path, recognizer):
    dictionary = tmp_path / "dict.txt"
    dictionary.write_text("\n".join(recognizer.charset[1:-1]) + "\n", encoding="utf-8")
    assert load_recognizer(character_dict_path=dictionary).charset == recognizer.charset

    short = tmp_path / "short.txt"
    short.write_text("a\nb\n", encoding="utf-8")
    with pytest.raises(SkingenError, match="6625 classes"):
        load_recognizer(character_dict_path=short)
    with pytest.raises(SkingenError, match="missing.onnx: recognizer model not found"):
        load_recognizer(tmp_path / "missing.onnx")
    not_onnx = tmp_path / "model.onnx"
    not_onnx.write_bytes(b"not a model")
    with pytest.raises(SkingenError, match="not a readable ONNX model"):
        load_recognizer(not_onnx)
