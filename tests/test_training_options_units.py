"""The trainer options' building blocks: min-SNR weights, offset noise, EMA decay, buckets, bucketed data order,
widened ControlNet input, option flags."""

from __future__ import annotations

import argparse

import pytest
import torch

from skingen.errors import SkingenError
from skingen.train.batches import GlobalBatchSampler, place_boxes
from skingen.train.buckets import bucket_placement, bucket_sizes, nearest_bucket, square_placement
from skingen.train.conditioning import kaiming_conditioning_encoder, match_conditioning_channels
from skingen.train.ema import WeightsEMA
from skingen.train.loss_weighting import TimestepBias, min_snr_weights, offset_noise, perturbed_noise, weighted_mse
from skingen.train.options import INTERPOLATION_MODES, add_option_args, check_option_args, lr_scheduler_names


def test_min_snr_weights_match_the_formula_on_sdxls_schedule():
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    timesteps = torch.tensor([0, 50, 200, 500, 999])
    # SNR(t) = abar_t / (1 - abar_t), abar_t = prod(1 - beta_s) over s <= t, betas linear in sqrt space.
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)[timesteps]
    snr = alphas_cumprod / (1 - alphas_cumprod)
    assert torch.allclose(compute_snr(scheduler, timesteps).double(), snr, rtol=1e-4)

    gamma = 5.0
    epsilon = min_snr_weights(snr, gamma, "epsilon")
    velocity = min_snr_weights(snr, gamma, "v_prediction")
    assert torch.allclose(epsilon, torch.minimum(snr, torch.full_like(snr, gamma)) / snr)
    assert torch.allclose(velocity, torch.minimum(snr, torch.full_like(snr, gamma)) / (snr + 1))
    assert snr[0] > gamma > snr[-1]  # the schedule spans both regimes
    assert epsilon[0] < 0.01 and epsilon[-1] == 1.0  # low-noise steps are down-weighted, high-noise ones kept
    with pytest.raises(SkingenError, match="prediction_type"):
        min_snr_weights(snr, gamma, "sample")


def test_timestep_bias_weights_follow_diffusers_generate_timestep_weights():
    later = TimestepBias("later", multiplier=3.0, portion=0.5).weights(1000)
    # diffusers: weights = ones; weights[-int(portion * N):] *= multiplier; weights /= weights.sum()
    assert later[:500].allclose(torch.full((500,), 1 / 2000, dtype=torch.float64))
    assert later[500:].allclose(torch.full((500,), 3 / 2000, dtype=torch.float64))
    earlier = TimestepBias("earlier", multiplier=2.0, portion=0.25).weights(1000)
    assert earlier[0] == 2 * earlier[999] and earlier[249] == earlier[0] and earlier[250] == earlier[999]
    ranged = TimestepBias("range", multiplier=5.0, begin=100, end=200).weights(1000)
    assert ranged[150] == 5 * ranged[99] and ranged[200] == ranged[99] and ranged.sum().item() == pytest.approx(1.0)
    assert TimestepBias("none", multiplier=3.0).weights(1000) is None  # uniform: torch.randint as before
    assert TimestepBias("later", multiplier=1.0).weights(1000) is None
    # Drawn as the trainer draws (one generator per sample): the later half gets about 3/4 of the steps.
    draws = torch.stack([torch.multinomial(later, 1, generator=torch.Generator().manual_seed(i))[0] for i in range(2000)])
    assert 0.70 < (draws >= 500).float().mean().item() < 0.80


@pytest.mark.parametrize("bias, message", [
    (TimestepBias("later", multiplier=0.0), "--timestep_bias_multiplier must be > 0"),
    (TimestepBias("later", multiplier=2.0, portion=1.5), "--timestep_bias_portion"),
    (TimestepBias("range", multiplier=2.0, begin=300, end=200), "begin < end"),
    (TimestepBias("sideways"), "--timestep_bias_strategy must be one of"),
])
def test_bad_timestep_bias_is_refused_with_the_fix(bias, message):
    with pytest.raises(SkingenError, match=message):
        bias.check()


def test_weighted_mse_scales_each_samples_mean():
    prediction, target = torch.zeros(2, 4, 3, 3), torch.ones(2, 4, 3, 3)
    target[1] *= 2.0  # per-sample MSE 1 and 4
    assert weighted_mse(prediction, target, None).item() == pytest.approx(2.5)
    assert weighted_mse(prediction, target, torch.tensor([1.0, 0.5])).item() == pytest.approx((1 + 2) / 2)


def test_offset_noise_is_per_channel_and_perturbation_leaves_the_target():
    noise = torch.zeros(2, 4, 8, 8)
    draw = torch.arange(8.0).reshape(2, 4, 1, 1)
    shifted = offset_noise(noise, draw, 0.1)
    assert torch.allclose(shifted[1, 3], torch.full((8, 8), 0.7))
    assert offset_noise(noise, draw, 0.0) is noise
    perturbation = torch.ones(2, 4, 8, 8)
    assert torch.allclose(perturbed_noise(noise, perturbation, 0.1), noise + 0.1)
    assert perturbed_noise(noise, None, 0.1) is noise


def test_ema_follows_diffusers_decay_formula():
    model = torch.nn.Linear(3, 2)
    model.config = {}
    ema = WeightsEMA(model, decay=0.5, update_after_step=1, device="cpu")
    expected = [p.detach().clone() for p in model.parameters()]
    for step in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.step(model)
        k = step - 1 - 1  # optimization step - update_after_step - 1
        decay = 0.0 if k <= 0 else min(0.5, (1 + k) / (10 + k))
        expected = [e - (1 - decay) * (e - p.detach()) for e, p in zip(expected, model.parameters())]
    raw = [p.detach().clone() for p in model.parameters()]
    with ema.swapped_in(model):
        for e, p in zip(expected, model.parameters()):
            assert torch.allclose(p, e, atol=1e-6)
        assert not torch.allclose(p, raw[-1])
    assert all(torch.equal(p, r) for p, r in zip(model.parameters(), raw))  # restored after the block

    restored = WeightsEMA(model, decay=0.5, update_after_step=1, device="cpu")
    restored.load_state_dict(ema.state_dict())
    assert restored.optimization_step == 5
    with restored.swapped_in(model):
        assert all(torch.allclose(p, e, atol=1e-6) for e, p in zip(expected, model.parameters()))


def test_buckets_hold_about_the_training_area_and_keep_the_aspect_ratio():
    buckets = bucket_sizes(512, 256, 1024, 64)
    assert (512, 512) in buckets and (640, 384) in buckets and (384, 640) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in buckets)
    assert nearest_bucket(1600, 1000, buckets) == (640, 384)  # a whole keyboard, wider than tall
    assert nearest_bucket(1000, 1600, buckets) == (384, 640)
    placement = bucket_placement(1600, 1000, (640, 384))
    assert placement.target == (384, 640)  # (height, width)
    assert placement.resized == (400, 640) and placement.crop == (8, 0)  # scaled to cover, 8 px cut top and bottom
    assert square_placement(80, 64, 64).crop == (0, 8)

    quads = [[[800, 500], [900, 500], [900, 550], [800, 550]]]
    boxes, texts = place_boxes(quads, ["mid"], placement)
    assert texts == ["mid"]
    assert torch.allclose(boxes[0, 0], torch.tensor([320.0, 200.0 - 8]))


def test_bucketed_batches_hold_one_bucket_and_stay_deterministic():
    buckets = [0, 1, 0, 1, 1, 0, 2, 1, 0]
    one = list(GlobalBatchSampler(9, 2, 1, 0, seed=3, start_micro_step=0, end_micro_step=12, buckets=buckets))
    assert all(len({buckets[row] for row, _ in batch}) == 1 for batch in one)
    sampler = GlobalBatchSampler(9, 2, 1, 0, seed=3, start_micro_step=0, end_micro_step=12, buckets=buckets)
    assert sampler.batches_per_epoch == 2 + 2 + 1
    first_epoch = {row for batch in one[:5] for row, _ in batch}
    assert first_epoch == set(range(9))  # every row once per epoch (plus top-ups)
    ranks = [list(GlobalBatchSampler(9, 1, 2, r, seed=3, start_micro_step=0, end_micro_step=12, buckets=buckets))
             for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks)] == one  # two processes split each global batch
    resumed = list(GlobalBatchSampler(9, 2, 1, 0, seed=3, start_micro_step=7, end_micro_step=12, buckets=buckets))
    assert resumed == one[7:]
    plain = list(GlobalBatchSampler(9, 2, 1, 0, seed=3, start_micro_step=0, end_micro_step=5))
    same_bucket = list(GlobalBatchSampler(9, 2, 1, 0, seed=3, start_micro_step=0, end_micro_step=5, buckets=[0] * 9))
    assert same_bucket == plain  # one bucket: the data order of an unbucketed run


def test_a_pretrained_controlnet_widened_for_a_second_condition_starts_out_unchanged(tiny_sdxl_dir):
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_pretrained(tiny_sdxl_dir / "controlnet")
    condition = torch.rand(1, 3, 64, 64)
    before = controlnet.controlnet_cond_embedding(condition)
    widened = match_conditioning_channels(controlnet, 2)
    assert widened.config.conditioning_channels == 6
    after = widened.controlnet_cond_embedding(torch.cat([condition, torch.rand(1, 3, 64, 64)], dim=1))
    assert torch.allclose(before, after, atol=1e-6)
    with pytest.raises(SkingenError, match="conditioning channels"):
        match_conditioning_channels(widened, 1)


def _encoder_features(controlnet, condition: torch.Tensor) -> torch.Tensor:
    """What the conditioning encoder hands its zero-initialised output conv."""
    encoder = controlnet.controlnet_cond_embedding
    hidden = torch.nn.functional.silu(encoder.conv_in(condition))
    for block in encoder.blocks:
        hidden = torch.nn.functional.silu(block(hidden))
    return hidden


def test_kaiming_conditioning_encoder_keeps_the_controls_scale_and_the_no_op_start(tiny_sdxl_dir):
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(0)  # a new ControlNet as the trainer makes it (diffusers' encoder widths 16, 32, 96, 256)
    controlnet = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(tiny_sdxl_dir / "unet"))
    condition = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        default_scale = _encoder_features(controlnet, condition).std().item()
        kaiming_conditioning_encoder(controlnet, seed=0)
        kaiming_scale = _encoder_features(controlnet, condition).std().item()
        output = controlnet.controlnet_cond_embedding(condition)
    assert condition.std().item() > 0.2
    assert default_scale < 0.05  # diffusers' init: a few percent of the control's scale reaches the zero conv
    assert kaiming_scale > 4 * default_scale
    assert output.abs().max().item() == 0.0  # the output conv is still zero: the ControlNet starts as a no-op


def _option_args(*argv):
    parser = argparse.ArgumentParser()
    for name, default in (("--report_to", "tensorboard"), ("--lr_scheduler", "constant"), ("--resolution", 512),
                          ("--conditioning_image_column", None), ("--crops_coords_top_left_h", None),
                          ("--crops_coords_top_left_w", None)):
        parser.add_argument(name, default=default, nargs="+" if name == "--conditioning_image_column" else None,
                            type=int if name in ("--resolution",) else None)
    add_option_args(parser)
    args = parser.parse_args(list(argv))
    check_option_args(args)
    return args


@pytest.mark.parametrize("argv, message", [
    (["--report_to", "nosuchtracker"], "unknown tracker"),
    (["--enable_npu_flash_attention"], "needs an Ascend NPU"),
    (["--lr_scheduler", "piecewise_constant"], "--lr_step_rules"),
    (["--enable_bucket", "--resolution", "2048"], "between --min_bucket_reso"),
    (["--conditioning_image_column", "a", "b", "--conditioning_dropout_prob", "0.1", "0.2", "0.3"], "one per"),
    (["--snr_gamma", "0"], "--snr_gamma must be positive"),
])
def test_bad_option_values_are_refused_with_the_fix(argv, message):
    with pytest.raises(SkingenError, match=message):
        _option_args(*argv)


def test_option_names_cover_diffusers_choices():
    assert set(lr_scheduler_names()) >= {"linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                         "constant_with_warmup", "piecewise_constant"}
    assert set(INTERPOLATION_MODES) == {"nearest", "nearest_exact", "bilinear", "bicubic", "box", "hamming", "lanczos"}
    args = _option_args("--conditioning_image_column", "a", "b", "--conditioning_dropout_prob", "0.25")
    from skingen.train.options import conditioning_dropout

    assert conditioning_dropout(args) == [0.25, 0.25]


def test_render_glyphs_writes_a_second_conditioning_kind_beside_the_first(tmp_path, capsys):
    from PIL import Image, ImageDraw
    from repo_scripts import load_script

    from skingen.data import dataset as data

    render_glyphs = load_script("render_glyphs.py")
    (tmp_path / "images").mkdir()
    for i in range(2):
        image = Image.new("RGB", (64, 48), (30, 60, 90))
        ImageDraw.Draw(image).rectangle((10 + i, 10, 40, 30), fill=(250, 250, 250))
        image.save(tmp_path / "images" / f"{i}.png")
    data.write_rows(tmp_path, [{"image": f"images/{i}.png", "text": f"skin {i}"} for i in range(2)])

    render_glyphs.main(["--dataset_dir", str(tmp_path), "--mode", "canny"])
    first = {row["image"]: (tmp_path / row["conditioning_image"]).read_bytes() for row in data.read_rows(tmp_path)}
    render_glyphs.main(["--dataset_dir", str(tmp_path), "--mode", "canny", "--output_column", "conditioning_image_canny",
                        "--low_threshold", "10", "--high_threshold", "30"])
    rows = data.read_rows(tmp_path)
    assert [row["conditioning_image_canny"] for row in rows] == ["conditioning_image_canny/0.png",
                                                                 "conditioning_image_canny/1.png"]
    assert all((tmp_path / row["conditioning_image"]).read_bytes() == first[row["image"]] for row in rows)
    capsys.readouterr()
    render_glyphs.main(["--dataset_dir", str(tmp_path), "--mode", "canny"])  # the first kind is still done
    assert "2 already done, 0 to render" in capsys.readouterr().out
