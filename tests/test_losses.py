"""The text loss: one-step x0, tiled VAE decode, rotated crops, and CTC/perceptual losses that go down."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler
from PIL import Image
from test_recognizer import render_line

from skingen.backbones.base import VaeLatents
from skingen.backbones.sdxl import ddpm_output, ddpm_x0
from skingen.errors import SkingenError
from skingen.train.recognizer import ctc_greedy_decode, encode_texts, load_recognizer, normalize_for_recognizer
from skingen.train.text_loss import TextLoss, crop_rotated_boxes, decode_latent_regions

# One text line, 96 x 48 px, in a 96 x 128 image (a 12 x 16 latent of the tiny VAE).
LINE_BOX = [[16.0, 24.0], [112.0, 24.0], [112.0, 72.0], [16.0, 72.0]]


@pytest.fixture(scope="module")
def recognizer():
    return load_recognizer()


@pytest.fixture(scope="module")
def vae(tiny_sdxl_dir):
    return AutoencoderKL.from_pretrained(tiny_sdxl_dir / "vae").requires_grad_(False).eval()


@pytest.fixture(scope="module")
def scheduler(tiny_sdxl_dir):
    return DDPMScheduler.from_pretrained(tiny_sdxl_dir / "scheduler")


def read_crops(recognizer, crops):
    with torch.no_grad():
        return ctc_greedy_decode(recognizer.probs(normalize_for_recognizer(crops, (-1.0, 1.0))), recognizer.charset)


def ctc_on_box(recognizer, image, text):
    crops, _ = crop_rotated_boxes(image, torch.tensor([LINE_BOX]))
    log_probs = recognizer.log_probs(normalize_for_recognizer(crops, (-1.0, 1.0)))
    targets, lengths, _ = encode_texts([text], recognizer.charset)
    loss = F.ctc_loss(log_probs.transpose(0, 1), targets, torch.tensor([log_probs.shape[1]]), lengths, zero_infinity=True)
    return loss, ctc_greedy_decode(log_probs.exp(), recognizer.charset)[0][0]


def call_loss(loss_fn, *, batch, model_pred, noisy_latents, latents, timesteps, noise, scheduler, vae):
    """The trainer's call of an extra loss, with an SDXL (DDPM) step's output; the loss reads only the VAE of the
    backbone."""
    output = ddpm_output(model_pred=model_pred, noisy_latents=noisy_latents, latents=latents, timesteps=timesteps,
                         noise=noise, noise_scheduler=scheduler)
    return loss_fn(batch=batch, output=output, backbone=SimpleNamespace(vae=vae, latent_space=VaeLatents(vae)), weight_dtype=torch.float32, step=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_x0_inverts_the_forward_process(prediction_type):
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", prediction_type=prediction_type)
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([10, 200, 900])
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    alpha_bar = scheduler.alphas_cumprod[timesteps]
    assert torch.allclose(ddpm_x0(noisy, target, alpha_bar, prediction_type), latents, atol=1e-3)


@pytest.mark.parametrize(("text", "angle"), [("搜索", 25), ("Hello 123", -35), ("前往", 90)])
def test_rotated_box_crop_is_read_correctly(recognizer, text, angle):
    line = Image.fromarray(render_line(text, size=32, fg=(30, 30, 90), bg=(230, 200, 120), pad=4))
    canvas = Image.new("RGB", (240, 240), (230, 200, 120))
    x0, y0 = 120 - line.width / 2, 120 - line.height / 2
    canvas.paste(line, (round(x0), round(y0)))
    rotated = canvas.rotate(angle, center=(120, 120), resample=Image.BICUBIC, fillcolor=(230, 200, 120))
    # PIL turns the picture counter-clockwise as seen on screen (y axis pointing down).
    a = math.radians(angle)
    rotation = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    corners = np.array([[x0, y0], [x0 + line.width, y0], [x0 + line.width, y0 + line.height], [x0, y0 + line.height]])
    quad = (corners - 120) @ rotation.T + 120
    image = torch.tensor(np.asarray(rotated), dtype=torch.float32).permute(2, 0, 1) / 127.5 - 1

    crops, widths = crop_rotated_boxes(image, torch.tensor(quad[None], dtype=torch.float32))

    assert crops.shape == (1, 3, 48, 320)
    assert widths == [round(48 * line.width / line.height)]
    assert read_crops(recognizer, crops)[0][0] == text


def test_crops_padded_to_the_batch_width_read_as_at_full_width(recognizer):
    from skingen.train.text_loss import _Crops

    words = ["前往", "删除键", "Hello 123", "中文输入法"]
    lines = [render_line(word, size=24, fg=(20, 20, 40), bg=(200, 220, 240), pad=3) for word in words]
    canvas = Image.new("RGB", (256, 160), (200, 220, 240))
    quads = []
    for k, line in enumerate(lines):
        x0, y0 = 8, 8 + 36 * k
        canvas.paste(Image.fromarray(line), (x0, y0))
        h, w = line.shape[:2]
        quads.append([[x0, y0], [x0 + w, y0], [x0 + w, y0 + h], [x0, y0 + h]])
    image = torch.tensor(np.asarray(canvas), dtype=torch.float32).permute(2, 0, 1) / 127.5 - 1
    crops, widths = crop_rotated_boxes(image, torch.tensor(quads, dtype=torch.float32))

    width = _Crops(widths=widths).recognizer_width()
    assert width % 8 == 0 and max(widths) <= width < 320
    trimmed, full = read_crops(recognizer, crops[..., :width]), read_crops(recognizer, crops)
    assert [text for text, _ in trimmed] == [text for text, _ in full] == words
    assert all(abs(a[1] - b[1]) < 0.05 for a, b in zip(trimmed, full))


def test_crop_pads_with_zeros_and_only_reads_pixels_near_the_box():
    image = torch.rand(3, 96, 128, requires_grad=True)
    crops, widths = crop_rotated_boxes(image, torch.tensor([LINE_BOX]))
    assert widths == [96]  # 96 x 48 box -> aspect 2 at height 48
    assert torch.equal(crops[0, :, :, 96:], torch.zeros(3, 48, 320 - 96))
    crops.sum().backward()
    grad = image.grad.abs().sum(dim=0)
    assert grad[24:72, 16:112].sum() > 0
    outside = grad.clone()
    outside[23:73, 15:113] = 0  # bilinear sampling touches at most one pixel beyond the box
    assert outside.sum() == 0


def test_optimising_blank_pixels_makes_the_recognizer_read_the_target(recognizer):
    image = torch.ones(3, 96, 128, requires_grad=True)  # a white page
    optimizer = torch.optim.Adam([image], lr=0.05)
    readings = []
    for _ in range(40):
        loss, reading = ctc_on_box(recognizer, image, "前往")
        readings.append(reading)
        if reading == "前往":
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            image.clamp_(-1, 1)
    print(f"blank page reads {readings[-1]!r} after {len(readings) - 1} Adam steps (readings: {readings})")
    assert readings[0] != "前往"
    assert readings[-1] == "前往", readings


def test_decode_latent_regions_matches_full_decode_and_keeps_gradients_local(vae):
    latents = torch.randn(2, 4, 12, 16, requires_grad=True)
    whole = [torch.tensor([[[0.0, 0.0], [128.0, 0.0], [128.0, 96.0], [0.0, 96.0]]]), torch.zeros(0, 4, 2)]
    (tile,) = decode_latent_regions(VaeLatents(vae), latents, whole, margin=0)
    with torch.no_grad():
        full = vae.decode(latents[:1] / vae.config.scaling_factor).sample[0]
    assert tile.row == 0 and tile.latent_window == (0, 12, 0, 16)
    assert torch.allclose(tile.image, full, atol=1e-5)

    small = [torch.zeros(0, 4, 2), torch.tensor([[[40.0, 40.0], [56.0, 40.0], [56.0, 48.0], [40.0, 48.0]]])]
    (tile,) = decode_latent_regions(VaeLatents(vae), latents, small, margin=1)
    assert tile.row == 1
    assert tile.latent_window == (4, 7, 4, 8)  # box cells 5..6 x 5..7, plus one cell of context
    assert tile.image.shape == (3, 24, 32)
    assert torch.equal(tile.boxes[0], torch.tensor([[8.0, 8.0], [24.0, 8.0], [24.0, 16.0], [8.0, 16.0]]))
    tile.image.sum().backward()
    grad = latents.grad.abs().sum(dim=1)
    assert grad[1, 4:7, 4:8].sum() > 0
    grad[1, 4:7, 4:8] = 0
    assert grad.sum() == 0  # nothing outside the tile is decoded


def test_overlapping_boxes_share_one_tile(vae):
    latents = torch.randn(1, 4, 12, 16)
    boxes = torch.tensor(
        [
            [[16.0, 16.0], [48.0, 16.0], [48.0, 32.0], [16.0, 32.0]],
            [[56.0, 16.0], [88.0, 16.0], [88.0, 32.0], [56.0, 32.0]],  # next key on the same row
            [[16.0, 80.0], [24.0, 80.0], [24.0, 88.0], [16.0, 88.0]],  # far away
        ]
    )
    tiles = decode_latent_regions(VaeLatents(vae), latents, [boxes], margin=1)
    assert sorted(tile.box_indices for tile in tiles) == [[0, 1], [2]]


def test_optimising_the_prediction_through_vae_and_recognizer_lowers_the_ctc_loss(recognizer, vae, scheduler):
    torch.manual_seed(0)
    latents = torch.randn(1, 4, 12, 16) * 0.5
    noise = torch.randn_like(latents)
    timesteps = torch.tensor([50])
    noisy = scheduler.add_noise(latents, noise, timesteps)
    model_pred = noise.clone().requires_grad_(True)
    batch = {"boxes": [torch.tensor([LINE_BOX])], "texts": [["前往"]]}
    loss_fn = TextLoss(recognizer, loss_type="ctc")
    optimizer = torch.optim.Adam([model_pred], lr=0.1)
    history = []
    for _ in range(60):
        loss, logs = call_loss(
            loss_fn, batch=batch, model_pred=model_pred, noisy_latents=noisy, latents=latents, timesteps=timesteps,
            noise=noise, scheduler=scheduler, vae=vae,
        )
        history.append(logs["text_ctc"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"text loss through the tiny VAE: start {history[0]:.3f}, end {history[-1]:.3f}")
    assert logs["boxes_used"] == 1 and logs["unknown_chars"] == 0
    assert min(history[-5:]) < 0.25 * history[0], history


def test_rows_without_boxes_or_past_the_timestep_cut_give_zero_with_graph(recognizer, vae, scheduler):
    latents, noise = torch.randn(2, 4, 12, 16), torch.randn(2, 4, 12, 16)
    timesteps = torch.tensor([20, 600])
    model_pred = torch.randn(2, 4, 12, 16, requires_grad=True)
    batch = {"boxes": [torch.zeros(0, 4, 2), torch.tensor([LINE_BOX])], "texts": [[], ["前往"]]}
    loss, logs = call_loss(
        TextLoss(recognizer, max_timestep=200), batch=batch, model_pred=model_pred,
        noisy_latents=scheduler.add_noise(latents, noise, timesteps), latents=latents, timesteps=timesteps,
        noise=noise, scheduler=scheduler, vae=vae,
    )
    assert loss.item() == 0.0 and loss.requires_grad
    assert logs == {"boxes_used": 0, "unknown_chars": 0, "boxes_skipped_outside": 0, "boxes_skipped_too_small": 0,
                    "boxes_skipped_unknown_text": 0}
    loss.backward()
    assert torch.equal(model_pred.grad, torch.zeros_like(model_pred))


def test_loss_counts_unknown_chars_and_only_uses_rows_in_range(recognizer, vae, scheduler):
    latents, noise = torch.randn(2, 4, 12, 16), torch.randn(2, 4, 12, 16)
    timesteps = torch.tensor([20, 600])
    model_pred = torch.randn(2, 4, 12, 16, requires_grad=True)
    batch = {"boxes": [torch.tensor([LINE_BOX, LINE_BOX]), torch.tensor([LINE_BOX])], "texts": [["前😀往", "🙂"], ["搜索"]]}
    loss, logs = call_loss(
        TextLoss(recognizer), batch=batch, model_pred=model_pred,
        noisy_latents=scheduler.add_noise(latents, noise, timesteps), latents=latents, timesteps=timesteps,
        noise=noise, scheduler=scheduler, vae=vae,
    )
    # Row 0: "🙂" has no known character and is dropped; "前😀往" is used with one unknown. Row 1: t > 200.
    assert logs["boxes_used"] == 1 and logs["unknown_chars"] == 1
    assert loss.item() > 0
    loss.backward()
    assert model_pred.grad[0].abs().sum() > 0
    assert model_pred.grad[1].abs().sum() == 0


def test_unusable_boxes_are_counted_per_reason_and_reported_in_a_warning(recognizer, vae, scheduler, caplog):
    latents, noise = torch.randn(1, 4, 12, 16), torch.randn(1, 4, 12, 16)
    timesteps = torch.tensor([20])
    flat = [[16.0, 24.0], [112.0, 24.0], [112.0, 24.0], [16.0, 24.0]]  # zero height
    outside = [[200.0, 24.0], [260.0, 24.0], [260.0, 72.0], [200.0, 72.0]]  # right of the 128 px wide image
    batch = {"boxes": [torch.tensor([LINE_BOX, flat, LINE_BOX, outside])], "texts": [["前往", "搜索", "🙂", "删除"]]}
    loss_fn = TextLoss(recognizer)
    inputs = {"batch": batch, "model_pred": torch.randn(1, 4, 12, 16),
              "noisy_latents": scheduler.add_noise(latents, noise, timesteps), "latents": latents,
              "timesteps": timesteps, "noise": noise, "scheduler": scheduler, "vae": vae}
    with caplog.at_level("WARNING", logger="skingen.train.text_loss"):
        _, logs = call_loss(loss_fn, **inputs)
        _, _ = call_loss(loss_fn, **inputs)
    assert logs["boxes_used"] == 1
    assert (logs["boxes_skipped_too_small"], logs["boxes_skipped_unknown_text"], logs["boxes_skipped_outside"]) == (1, 1, 1)
    assert loss_fn.skipped_boxes == {"outside": 2, "too_small": 2, "unknown_text": 2}
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2, warnings  # the first step (3 boxes) and when the total doubled (6)
    assert "6 boxes could not be used" in warnings[-1] and "2 unknown text" in warnings[-1]


def test_alpha_bar_weighting_scales_each_row(recognizer, vae, scheduler):
    latents, noise = torch.randn(1, 4, 12, 16), torch.randn(1, 4, 12, 16)
    timesteps = torch.tensor([150])
    inputs = {
        "batch": {"boxes": [torch.tensor([LINE_BOX])], "texts": [["前往"]]}, "model_pred": torch.randn(1, 4, 12, 16),
        "noisy_latents": scheduler.add_noise(latents, noise, timesteps), "latents": latents, "timesteps": timesteps,
        "noise": noise, "scheduler": scheduler, "vae": vae,
    }
    plain, _ = call_loss(TextLoss(recognizer, weight=0.5), **inputs)
    weighted, _ = call_loss(TextLoss(recognizer, weight=0.5, timestep_weighting="alpha_bar"), **inputs)
    assert torch.allclose(weighted, plain * scheduler.alphas_cumprod[150], rtol=1e-4)


def test_perceptual_loss_is_zero_for_the_exact_prediction(recognizer, vae, scheduler):
    torch.manual_seed(1)
    latents, noise = torch.randn(1, 4, 12, 16), torch.randn(1, 4, 12, 16)
    timesteps = torch.tensor([100])
    inputs = {
        "batch": {"boxes": [torch.tensor([LINE_BOX])], "texts": [["前往"]]},
        "noisy_latents": scheduler.add_noise(latents, noise, timesteps), "latents": latents, "timesteps": timesteps,
        "noise": noise, "scheduler": scheduler, "vae": vae,
    }
    loss_fn = TextLoss(recognizer, loss_type="both")
    exact, logs = call_loss(loss_fn, model_pred=noise, **inputs)  # x0 estimate == ground-truth latents
    assert logs["text_perceptual"] < 1e-8 and logs["text_ctc"] > 0
    wrong, logs = call_loss(loss_fn, model_pred=noise + torch.randn_like(noise), **inputs)
    assert logs["text_perceptual"] > 1e-3

    # With training pixels in the batch, the ground-truth crop comes from them (here: the rendered word).
    page = np.full((96, 128, 3), 255, dtype=np.uint8)
    page[24:72, 16:112] = np.asarray(Image.fromarray(render_line("前往")).resize((96, 48)))
    pixel_values = torch.tensor(page, dtype=torch.float32).permute(2, 0, 1)[None] / 127.5 - 1
    inputs["batch"] = {**inputs["batch"], "pixel_values": pixel_values}
    perceptual_only, logs = call_loss(TextLoss(recognizer, loss_type="perceptual"), model_pred=noise, **inputs)
    assert logs["text_perceptual"] > 1e-3  # the random tiny VAE does not draw the word
    # CTC is still measured (logged, not trained on): the loss is the perceptual term alone.
    assert logs["text_ctc"] > 0 and perceptual_only.item() == pytest.approx(logs["text_perceptual"], rel=1e-5)


def test_bad_options_are_user_errors(recognizer):
    with pytest.raises(SkingenError, match="text_loss_type"):
        TextLoss(recognizer, loss_type="l2")
    with pytest.raises(SkingenError, match="timestep_weighting"):
        TextLoss(recognizer, timestep_weighting="snr")
