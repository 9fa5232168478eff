"""The edge consistency loss (ControlNet++): its soft edge F1 agrees with evaluate.py's, its gradient draws the
control's edges, and the trainer adds it beside the text loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from repo_scripts import tiny_training_argv

from skingen.evaluate.metrics import edge_f1
from skingen.prep.glyphs import canny_control
from skingen.train.edge_loss import EdgeLoss, control_edges, soft_edge_f1, soft_edges
from skingen.train.loop import build_arg_parser, parse_training_args, train

pytestmark = pytest.mark.usefixtures("one_torch_thread", "fresh_accelerate_state")


def _picture(box, size=64, fill=(230, 200, 40), background=(30, 30, 90)) -> Image.Image:
    image = Image.new("RGB", (size, size), background)
    ImageDraw.Draw(image).ellipse(box, fill=fill)
    return image


def _canny(image: Image.Image) -> Image.Image:
    return canny_control(image, 50, 80)


def _pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float()[None] / 255


def test_soft_edge_f1_ranks_images_as_the_evaluated_edge_f1_does():
    control = _canny(_picture((12, 14, 44, 50)))
    same, moved, blank = _picture((12, 14, 44, 50)), _picture((26, 4, 58, 40)), _picture((0, 0, 0, 0), fill=(30, 30, 90))
    target = control_edges(_pixels(control))
    soft = {name: soft_edge_f1(soft_edges(_pixels(image) * 2 - 1), target).item()
            for name, image in (("same", same), ("moved", moved), ("blank", blank))}
    hard = {name: edge_f1(image, control) for name, image in (("same", same), ("moved", moved), ("blank", blank))}
    assert soft["same"] > 0.8 and hard["same"] > 0.8
    assert soft["same"] > soft["moved"] > soft["blank"]
    assert hard["same"] > hard["moved"] > hard["blank"]
    empty = torch.zeros(1, 1, 8, 8)
    assert soft_edge_f1(empty, empty).item() == pytest.approx(1.0)


def _as_image(pixels: torch.Tensor) -> Image.Image:
    return Image.fromarray(((pixels.detach()[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())


class _PixelBackbone:
    """Latents are the image itself (a decoder that is the identity), so the loss's gradient can be read off."""

    vae_scale_factor = 1

    @staticmethod
    def decode_latents(latents):
        return latents


class _Output:
    def __init__(self, image, timesteps):
        self.model_pred, self.timesteps, self._image = image, timesteps, image

    def x0(self, rows):
        return self._image[rows]


def test_descending_the_loss_draws_the_controls_edges_where_there_were_none():
    control = _pixels(_canny(_picture((12, 14, 44, 50))))
    # Grey with faint noise (a blurry one-step estimate): no Canny edges.
    image = (0.01 * torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))).requires_grad_()
    loss_fn = EdgeLoss(weight=1.0, max_timestep=1000)
    optimizer = torch.optim.Adam([image], lr=0.05)
    assert edge_f1(_as_image(image), _canny(_picture((12, 14, 44, 50)))) < 0.05
    for _ in range(60):
        loss, logs = loss_fn(batch={"conditioning_pixel_values": control}, output=_Output(image, torch.tensor([500])),
                             backbone=_PixelBackbone(), weight_dtype=torch.float32, step=0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    drawn = _as_image(image)
    assert edge_f1(drawn, _canny(_picture((12, 14, 44, 50)))) > 0.5
    assert edge_f1(drawn, _canny(_picture((26, 4, 58, 40)))) < 0.4  # the control's edges, not edges anywhere


def test_rows_above_the_max_timestep_add_nothing():
    control = _pixels(_canny(_picture((12, 14, 44, 50)))).repeat(2, 1, 1, 1)
    image = (0.01 * torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))).requires_grad_()
    loss, _ = EdgeLoss(weight=1.0, max_timestep=200)(
        batch={"conditioning_pixel_values": control}, output=_Output(image, torch.tensor([100, 700])),
        backbone=_PixelBackbone(), weight_dtype=torch.float32, step=0)
    loss.backward()
    assert image.grad[0].abs().sum() > 0 and image.grad[1].abs().sum() == 0
    assert loss.item() == pytest.approx((1 - EdgeLoss(weight=1.0)(
        batch={"conditioning_pixel_values": control[:1]}, output=_Output(image[:1], torch.tensor([100])),
        backbone=_PixelBackbone(), weight_dtype=torch.float32, step=0)[1]["edge_f1"]) / 2, rel=1e-4)


def test_a_crop_scores_one_window_drawn_from_the_rows_seed():
    control = _pixels(_canny(_picture((12, 14, 44, 50))))
    image = (0.01 * torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))).requires_grad_()

    def run(seed):
        image.grad = None
        loss, logs = EdgeLoss(weight=1.0, crop_size=24)(
            batch={"conditioning_pixel_values": control, "sample_seeds": [seed]},
            output=_Output(image, torch.tensor([300])), backbone=_PixelBackbone(), weight_dtype=torch.float32, step=0)
        loss.backward()
        rows, cols = image.grad[0].abs().sum(dim=0).nonzero(as_tuple=True)
        return (rows.min().item(), rows.max().item(), cols.min().item(), cols.max().item()), logs["edge_f1"]

    (top, bottom, left, right), f1 = run(seed=7)
    # The gradient reaches the 24 px window and the pixels the Sobel kernel and the tolerance window read around it.
    assert bottom - top <= 24 + 4 and right - left <= 24 + 4 and (bottom - top) >= 12
    assert run(seed=7) == ((top, bottom, left, right), f1)  # same seed, same window
    assert any(run(seed)[0] != (top, bottom, left, right) for seed in range(8, 12))


def test_the_trainer_adds_and_logs_the_edge_loss_beside_another_extra_loss(tiny_sdxl_dir, tmp_path):
    dataset = _edge_dataset(tmp_path / "data")
    flags = ["--max_train_steps", 2, "--validation_steps", 2, "--validation_loss_timesteps", 100,
             "--validation_loss_rows", 2, "--edge_loss_weight", 0.5]
    logs = {}
    recorder = _CountingLoss()
    result = train(parse_training_args(build_arg_parser(), tiny_training_argv(tiny_sdxl_dir, dataset, tmp_path / "run",
                                                                              *flags)),
                   extra_loss=recorder, on_step=lambda step, values: logs.update({step: values}))
    assert len(recorder.calls) > 2  # the other extra loss still runs
    assert set(logs[2]) >= {"loss_edge", "loss_recorder", "edge_f1"}
    assert 0 < logs[2]["loss_edge"] <= 0.5
    assert logs[2]["loss"] == pytest.approx(logs[2]["loss_diffusion"] + logs[2]["loss_edge"], rel=1e-4)
    assert 0 < result.validation_losses[0]["val_edge_f1"] <= 1
    assert result.validation_losses[0]["val_loss_edge"] == pytest.approx(
        0.5 * (1 - result.validation_losses[0]["val_edge_f1"]), rel=1e-4)


class _CountingLoss:
    """Another extra loss (as the text loss is): adds nothing, counts its calls."""

    name = "recorder"

    def __init__(self):
        self.calls = []

    def __call__(self, *, batch, output, backbone, weight_dtype, step):
        self.calls.append(step)
        return output.model_pred.sum() * 0.0, {}


def _edge_dataset(root):
    import json

    (root / "images").mkdir(parents=True)
    (root / "conditioning_images").mkdir()
    rows = []
    for i in range(4):
        picture = _picture((8 + 4 * i, 10, 40 + 4 * i, 50))
        picture.save(root / "images" / f"{i}.png")
        _canny(picture).save(root / "conditioning_images" / f"{i}.png")
        rows.append({"text": f"a keyboard skin {i}", "image": f"images/{i}.png",
                     "conditioning_image": f"conditioning_images/{i}.png"})
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--edge_loss_weight", "-1", "--edge_loss_weight must not be negative"),
    ("--edge_loss_max_timestep", "1200", "--edge_loss_max_timestep is on the 0..1000 noise scale"),
    ("--edge_loss_tolerance", "-2", "--edge_loss_tolerance must not be negative"),
    ("--edge_loss_crop_size", "60", "--edge_loss_crop_size must be a positive multiple of 8"),
])
def test_bad_edge_loss_flags_are_named(tiny_sdxl_dir, tmp_path, capsys, flag, value, message):
    from skingen.errors import run_cli

    dataset = _edge_dataset(tmp_path / "data")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda argv: parse_training_args(build_arg_parser(), argv),
                tiny_training_argv(tiny_sdxl_dir, dataset, tmp_path / "out", flag, value))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
