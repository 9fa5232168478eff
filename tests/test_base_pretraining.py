"""Pre-training a tiny base of any family with the one training loop (skingen.testing.base_pretraining; SDXL's cached
run through scripts/pretrain_tiny_base.py: test_demo.py)."""

from __future__ import annotations

import json

import pytest
from box_skins import write_box_skins
from safetensors.torch import load_file

from skingen.errors import SkingenError
from skingen.testing.base_pretraining import PretrainSettings, pretrain_tiny_base

WEIGHTS = "diffusion_pytorch_model.safetensors"
CONTROLNET_CLASS = {"zimage": "ZImageControlNetModel", "qwenimage": "QwenImageControlNetModel"}

pytestmark = pytest.mark.usefixtures("one_torch_thread", "fresh_accelerate_state")


@pytest.mark.parametrize("family", tuple(CONTROLNET_CLASS))
def test_a_flow_base_is_pretrained_around_the_given_vae(request, family, tmp_path):
    import diffusers

    from skingen.testing.tiny_models import build_tiny_pipeline

    dataset = tmp_path / "skins"
    dataset.mkdir()
    write_box_skins(dataset, 2)
    build_tiny_pipeline(family, tmp_path / "other", seed=5)  # its VAE stands in for a fitted one
    settings = PretrainSettings(backbone=family, pretrained_vae=str(tmp_path / "other" / "vae"), resolution=64,
                                vae_fit_steps=0, max_train_steps=2, train_batch_size=2, seed=0)
    record = pretrain_tiny_base(tmp_path / "base", dataset, settings)

    base, random = tmp_path / "base", request.getfixturevalue(f"tiny_{family}_dir")  # the same builder, seed 0
    assert not record["reused"] and record["denoiser_fit"]["first_loss"] > 0
    given, used = load_file(tmp_path / "other" / "vae" / WEIGHTS), load_file(base / "vae" / WEIGHTS)
    assert given.keys() == used.keys() and all((given[k] == used[k]).all() for k in given)
    trained, untouched = load_file(base / "transformer" / WEIGHTS), load_file(random / "transformer" / WEIGHTS)
    assert any((trained[k] - untouched[k]).abs().max() > 0 for k in trained)
    assert getattr(diffusers, CONTROLNET_CLASS[family]).from_pretrained(base / "controlnet") is not None
    assert json.loads((base / "pretrain.json").read_text(encoding="utf-8"))["settings"]["backbone"] == family
    assert not (base / "denoiser-training").exists()  # the loop's run folder is gone; the pipeline is all that stays
    assert pretrain_tiny_base(tmp_path / "base", dataset, settings)["reused"]


def test_uncaptioned_rows_are_named_before_training(tmp_path):
    dataset = tmp_path / "skins"
    dataset.mkdir()
    write_box_skins(dataset, 2)
    rows = [json.loads(line) for line in (dataset / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    (dataset / "train.jsonl").write_text("".join(json.dumps({"image": r["image"], "text": ""}) + "\n" for r in rows),
                                         encoding="utf-8")
    settings = PretrainSettings(resolution=64, vae_fit_steps=1, max_train_steps=1, train_batch_size=2)
    with pytest.raises(SkingenError, match=r"train\.jsonl:1.*empty caption"):
        pretrain_tiny_base(tmp_path / "base", dataset, settings)
    assert not (tmp_path / "base").exists()
