"""GRPO reward fine-tuning (train_controlnet_grpo.py, skingen/grpo/): the SDE sampler's log-probabilities and
marginals, its ODE limit against diffusers' Euler scheduler and the family pipelines' schedules, advantages and the
clipped-ratio/KL loss on hand-checked numbers, rewards equal to evaluate.py's metrics, and short runs on the tiny SD3
and FLUX pipelines (a ControlNet diffusers loads, exact resume, 2 processes = 1, bad inputs as one error line)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from launching import launch
from PIL import Image, ImageDraw
from repo_scripts import load_script
from safetensors.torch import load_file
from textimages import SKIN_TEXTS, skin_with_texts

from skingen.errors import SkingenError, run_cli
from skingen.train.grpo.objective import group_advantages, grpo_loss
from skingen.train.grpo.rewards import RewardInput, Rewards, parse_reward_weights
from skingen.train.grpo.sde import sample_trajectories, sde_step, trajectory_noise

FAMILIES = ("sd3", "flux", "zimage", "qwenimage")
CONTROLNET_CLASS = {"sd3": "SD3ControlNetModel", "flux": "FluxControlNetModel", "zimage": "ZImageControlNetModel",
                    "qwenimage": "QwenImageControlNetModel"}
PIPELINE_CLASS = {"sd3": "StableDiffusion3ControlNetPipeline", "flux": "FluxControlNetPipeline",
                  "zimage": "ZImageControlNetPipeline", "qwenimage": "QwenImageControlNetPipeline"}
WEIGHTS = "diffusion_pytorch_model.safetensors"


# ---------------------------------------------------------------------------------------------------------------
# The sampler


def test_sde_step_log_prob_is_the_density_of_the_gaussian_it_samples_from():
    generator = torch.Generator().manual_seed(0)
    sample, velocity, noise = (torch.randn(3, 4, 5, 5, generator=generator) for _ in range(3))
    step = sde_step(velocity, sample, 0.6, 0.45, noise_level=0.7, sigma_cap=0.9, noise=noise)
    gaussian = torch.distributions.Normal(step.mean, step.std)
    assert torch.allclose(step.log_prob, gaussian.log_prob(step.sample).mean(dim=(1, 2, 3)), atol=1e-5)
    assert torch.allclose((step.sample - step.mean) / step.std, noise, atol=1e-5)  # it drew from that Gaussian
    # Re-scoring a step already taken (the update's recomputation) gives the same log-probability.
    again = sde_step(velocity, sample, 0.6, 0.45, noise_level=0.7, sigma_cap=0.9, prev_sample=step.sample)
    assert torch.allclose(again.log_prob, step.log_prob)


def test_sde_sampler_keeps_the_flow_marginals():
    """Data at one point c: x_sigma = (1 - sigma) c + sigma * eps and the exact velocity is (x - c) / sigma. The
    SDE's states must keep those marginals (mean (1 - sigma) c, std sigma) although each step adds noise."""
    c = 2.0
    sigmas = torch.linspace(1.0, 0.0, 41)
    noise = trajectory_noise(range(4000), 40, (1,))
    trajectories = sample_trajectories(lambda x, t: (x - c) / (t[:, None] / 1000), noise, sigmas, noise_level=0.7,
                                       num_train_timesteps=1000)
    for j in (10, 20, 30):
        states = trajectories.latents[:, j, 0]
        sigma = sigmas[j].item()
        assert states.mean().item() == pytest.approx((1 - sigma) * c, abs=0.05)
        assert states.std().item() == pytest.approx(sigma, abs=0.05)
    # The ODE's trajectories are deterministic given the start; the SDE's spread around them.
    ode = sample_trajectories(lambda x, t: (x - c) / (t[:, None] / 1000), noise, sigmas, noise_level=0.0,
                              num_train_timesteps=1000)
    assert (trajectories.latents[:, 20] - ode.latents[:, 20]).abs().mean() > 0.05


def test_noise_level_zero_is_diffusers_flow_match_euler_sampler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(6)
    weight = torch.randn(4, 4, generator=torch.Generator().manual_seed(1)) * 0.3

    def velocity(x, t):  # a state- and time-dependent field
        return torch.einsum("oc,bchw->bohw", weight, x) * (t[:, None, None, None] / 1000) - x

    noise = trajectory_noise([3, 4], 6, (4, 3, 3))
    ours = sample_trajectories(velocity, noise, scheduler.sigmas, noise_level=0.0, num_train_timesteps=1000)
    x = noise[:, 0]
    for t in scheduler.timesteps:
        x = scheduler.step(velocity(x, t.expand(2)), t, x).prev_sample
    assert torch.allclose(ours.final, x, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_sigmas_are_the_family_pipelines_own(request, family):
    base = request.getfixturevalue(f"tiny_{family}_dir")
    args = load_script("train_controlnet_grpo.py").parse_args(
        ["--pretrained_model_name_or_path", str(base), "--controlnet_model_name_or_path", str(base / "controlnet"),
         "--train_data_dir", "unused", "--output_dir", "unused", "--max_sequence_length", "64"])
    from skingen.backbones import backbone_class

    backbone = backbone_class(family)(args)
    pipeline = backbone.validation_pipeline(backbone.create_controlnet(base / "controlnet"))
    pipeline.set_progress_bar_config(disable=True)
    entry = {key: value[0] for key, value in backbone.encode_prompts(["skin"]).items()}
    no_guidance = 0.0 if family == "zimage" else 1.0  # Z-Image's pipeline guides at any scale above 0
    pipeline(**backbone.prompt_kwargs(entry, "cpu", torch.float32), control_image=Image.new("RGB", (64, 64)),
             height=64, width=64, num_inference_steps=3, guidance_scale=no_guidance, output_type="latent",
             generator=torch.Generator().manual_seed(0))
    assert torch.allclose(backbone.sampling_sigmas(3, 8, 8), pipeline.scheduler.sigmas.float(), atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Advantages and the loss


def test_advantages_are_normalised_within_each_group():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    advantages = group_advantages(rewards, 4)
    std = math.sqrt(1.25)  # population std of 1, 2, 3, 4
    expected = [(-1.5) / (std + 1e-4), (-0.5) / (std + 1e-4), 0.5 / (std + 1e-4), 1.5 / (std + 1e-4), 0, 0, 0, 0]
    assert advantages.tolist() == pytest.approx(expected)
    # With the std of the whole step, the equal group still gets zeros, the other a smaller scale.
    whole = rewards.std(unbiased=False).item()
    assert group_advantages(rewards, 4, global_std=True)[:4].tolist() == pytest.approx(
        [v / (whole + 1e-4) for v in (-1.5, -0.5, 0.5, 1.5)])
    with pytest.raises(ValueError):
        group_advantages(rewards, 3)


def test_clipped_ratio_and_kl_loss_on_hand_checked_numbers():
    old = torch.zeros(3)
    log_prob = torch.log(torch.tensor([1.2, 0.5, 1.0]))
    advantages = torch.tensor([1.0, -1.0, 10.0])  # the last is clipped to 5 (ratio 1: no policy gradient change)
    mean = torch.zeros(3, 2, 2)
    ref_mean = torch.full((3, 2, 2), 0.3)
    result = grpo_loss(log_prob, old, advantages, clip_range=0.1, adv_clip_max=5.0, beta=0.1, mean=mean,
                       ref_mean=ref_mean, std=torch.tensor(0.5))
    # Row 0: max(-1.2, -1.1) = -1.1; row 1: max(0.5, 0.9) = 0.9; row 2: -5 * 1 = -5.
    assert result.policy.item() == pytest.approx((-1.1 + 0.9 - 5.0) / 3)
    assert result.kl.item() == pytest.approx(0.09 / (2 * 0.25))
    assert result.loss.item() == pytest.approx((-1.1 + 0.9 - 5.0) / 3 + 0.1 * 0.18)
    assert result.clip_fraction.item() == pytest.approx(2 / 3)
    assert result.approx_kl.item() == pytest.approx(0.5 * (math.log(1.2) ** 2 + math.log(0.5) ** 2) / 3)
    # The gradient flows only where the ratio is not clipped against the advantage (row 2 here).
    log_prob.requires_grad_(True)
    grpo_loss(log_prob, old, advantages, clip_range=0.1, adv_clip_max=5.0).loss.backward()
    assert log_prob.grad.tolist() == pytest.approx([0.0, 0.0, -5.0 / 3])


def _toy_grpo(trained_steps: int, iterations: int = 40) -> tuple[float, float]:
    """GRPO on a flow whose data is one point (exact velocity) plus a learnt bias; reward: closeness of the final
    sample to a target. Returns the mean reward of the first and the last 5 iterations."""
    target = torch.tensor([1.0, -1.0, 0.5, 0.0]).view(1, 4, 1, 1)
    bias = torch.zeros(1, 4, 1, 1, requires_grad=True)
    optimizer = torch.optim.Adam([bias], lr=0.05)
    sigmas = torch.linspace(1, 0, 5)

    def velocity(x, t):
        return x / (t.view(-1, 1, 1, 1) / 1000) - bias

    rewards = []
    for iteration in range(iterations):
        noise = trajectory_noise(range(iteration * 8, iteration * 8 + 8), 4, (4, 1, 1))
        trajectories = sample_trajectories(velocity, noise, sigmas, noise_level=0.7, num_train_timesteps=1000)
        reward = -((trajectories.final - target) ** 2).mean(dim=(1, 2, 3))
        advantages = group_advantages(reward, 8)
        for j in range(trained_steps):
            x, t = trajectories.latents[:, j], torch.full((8,), sigmas[j].item() * 1000)
            step = sde_step(velocity(x, t), x, sigmas[j].item(), sigmas[j + 1].item(), noise_level=0.7,
                            sigma_cap=sigmas[1].item(), prev_sample=trajectories.latents[:, j + 1])
            (grpo_loss(step.log_prob, trajectories.log_probs[:, j], advantages, clip_range=1e-4,
                       adv_clip_max=5.0).loss / trained_steps).backward()
        optimizer.step()
        optimizer.zero_grad()
        rewards.append(reward.mean().item())
    return sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5


def test_grpo_steps_raise_the_reward_of_a_toy_flow_when_every_step_is_trained():
    first, last = _toy_grpo(trained_steps=4)
    assert last > first + 0.1
    # Leaving out the last of 4 coarse steps (timestep_fraction 0.75) turns the estimate's sign here: the SDE's last
    # step contracts what earlier noise did, so their score terms alone point the other way.
    first, last = _toy_grpo(trained_steps=3)
    assert last < first


# ---------------------------------------------------------------------------------------------------------------
# Rewards


def test_rewards_equal_evaluate_py_metrics_on_the_same_images(tmp_path):
    import evaluate
    from skingen.fileio import write_jsonl
    from skingen.prep.glyphs import canny_control
    from skingen.prep.ocr import get_ocr

    (tmp_path / "run" / "images").mkdir(parents=True)
    truth, quads = skin_with_texts(SKIN_TEXTS, size=(480, 160))
    control = canny_control(truth)
    control.save(tmp_path / "control.png")
    images = [truth, skin_with_texts(["前往", "搜素", "设"], size=(480, 160))[0],
              Image.new("RGB", (480, 160), (200, 200, 200))]
    records = []
    for index, image in enumerate(images):
        image.save(tmp_path / "run" / "images" / f"{index}.png")
        records.append({"row_id": f"{index}", "prompt": "skin", "seed": 0, "conditioning_image": str(tmp_path / "control.png"),
                        "output": f"images/{index}.png", "box": quads, "box_size": [480, 160], "texts": SKIN_TEXTS})
    write_jsonl(tmp_path / "run" / "results.jsonl", records)
    evaluate.main(["--results_dir", str(tmp_path / "run")])
    report = json.loads((tmp_path / "run" / "metrics.json").read_text(encoding="utf-8"))["images"]

    rewards = Rewards(parse_reward_weights("edge_f1,ocr_ned=0.5,ocr_accuracy"), ocr=get_ocr("rapidocr"))
    scores = rewards.score([Image.open(tmp_path / "run" / "images" / f"{i}.png") for i in range(3)],
                           [RewardInput(Image.open(tmp_path / "control.png"), quads, SKIN_TEXTS)] * 3)
    assert scores["edge_f1"].tolist() == pytest.approx([r["edge_f1"] for r in report])
    assert scores["ocr_ned"].tolist() == pytest.approx([r["ned"] for r in report])
    assert scores["ocr_accuracy"].tolist() == pytest.approx([r["sentence_accuracy"] for r in report])
    assert scores["ocr_ned"][0] == 1.0 and scores["ocr_ned"][1] < 1.0  # the images differ in what they show
    total = rewards.total(scores)
    assert total[1] == pytest.approx(scores["edge_f1"][1] + 0.5 * scores["ocr_ned"][1] + scores["ocr_accuracy"][1])
    # A row without boxes has no text reward: NaN, and 0 in the sum.
    no_text = rewards.score([images[0]], [RewardInput(control)])
    assert math.isnan(no_text["ocr_ned"][0]) and rewards.total(no_text)[0] == pytest.approx(no_text["edge_f1"][0])


def test_reward_flag_names_known_rewards_with_weights():
    assert parse_reward_weights("edge_f1=1,ocr_ned=0.5") == {"edge_f1": 1.0, "ocr_ned": 0.5}
    assert parse_reward_weights("ocr_ned") == {"ocr_ned": 1.0}
    with pytest.raises(SkingenError, match="unknown reward 'clip'"):
        parse_reward_weights("clip=1")
    with pytest.raises(SkingenError, match="not a number"):
        parse_reward_weights("edge_f1=high")


# ---------------------------------------------------------------------------------------------------------------
# Runs on the tiny pipelines


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """4 training and 2 held-out rows: 64 px skins with one text box each, their edges as the control."""
    root = tmp_path_factory.mktemp("skins")
    (root / "images").mkdir()
    (root / "conditioning_images").mkdir()
    rows = []
    for i in range(6):
        image = Image.new("RGB", (64, 64), (40 * i, 120, 200 - 30 * i))
        ImageDraw.Draw(image).rectangle((8 + i, 12, 44, 30), fill=(255, 255, 255))
        image.save(root / "images" / f"{i}.png")
        control = Image.new("RGB", (64, 64))
        ImageDraw.Draw(control).rectangle((8 + i, 12, 44, 30), outline=(255, 255, 255))
        control.save(root / "conditioning_images" / f"{i}.png")
        rows.append({"text": f'skin {i} writing "前往"', "image": f"images/{i}.png",
                     "conditioning_image": f"conditioning_images/{i}.png",
                     "box": [[[8 + i, 12], [44, 12], [44, 30], [8 + i, 30]]]})
    write = lambda name, part: (root / name).write_text(  # noqa: E731
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
    write("train.jsonl", rows[:4])
    write("validation.jsonl", rows[4:])
    return root


def _argv(base: Path, dataset: Path, out: Path, *extra) -> list[str]:
    return ["--pretrained_model_name_or_path", str(base), "--controlnet_model_name_or_path", str(base / "controlnet"),
            "--train_data_dir", str(dataset), "--output_dir", str(out), "--resolution", "64", "--train_batch_size", "2",
            "--max_sequence_length", "64", "--train_sampling_steps", "3", "--num_image_per_prompt", "2",
            "--learning_rate", "1e-4", "--seed", "0", "--report_to", "none", "--reward", "edge_f1",
            *map(str, extra)]


def _train(argv):
    from skingen.train.grpo.trainer import train_grpo

    return train_grpo(load_script("train_controlnet_grpo.py").parse_args(argv))


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.parametrize("family", FAMILIES)
def test_short_run_saves_a_controlnet_diffusers_loads_with_logs_grid_and_card(
        request, family, dataset, tmp_path, one_torch_thread, fresh_accelerate_state):
    import diffusers

    base = request.getfixturevalue(f"tiny_{family}_dir")
    out = tmp_path / "run"
    result = _train(_argv(base, dataset, out, "--max_train_steps", 2, "--num_inner_epochs", 2,
                          "--reward", "edge_f1=1,ocr_ned=1", "--report_to", "tensorboard",
                          "--validation_split", "validation", "--validation_inference_steps", 3,
                          "--num_validation_images", 1, "--validation_steps", 2,
                          # SD3 samples with classifier-free guidance (the empty prompt as the negative), as Flow-GRPO.
                          *(["--sample_guidance_scale", 4.5] if family == "sd3" else [])))
    assert result.global_step == 2
    trained = getattr(diffusers, CONTROLNET_CLASS[family]).from_pretrained(out)
    start = getattr(diffusers, CONTROLNET_CLASS[family]).from_pretrained(base / "controlnet")
    moved = max((a - b).abs().max().item() for a, b in zip(trained.state_dict().values(), start.state_dict().values()))
    assert moved > 1e-6
    log = json.loads((out / "grpo_log.json").read_text(encoding="utf-8"))
    step = log["steps"]["2"]
    for name in ("reward_edge_f1_mean", "reward_edge_f1_std", "reward_ocr_ned_mean", "kl", "clip_fraction", "loss"):
        assert math.isfinite(step[name]), name
    assert 0 <= step["reward_edge_f1_mean"] <= 1 and step["kl"] > 0  # the second inner epoch left the start
    assert set(log["held_out"]) == {"0", "2"} and "val_edge_f1" in log["held_out"]["2"]
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    assert Image.open(out / "validation" / "step-2.png").size == (64 * 2, 64 * 2)  # 2 held-out rows
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "## GRPO fine-tuning" in card and "by skingen's `train_controlnet_grpo.py`" in card


@pytest.mark.parametrize("family", FAMILIES)
def test_denoiser_lora_is_trained_and_saved_for_the_family_pipeline(request, family, dataset, tmp_path, one_torch_thread,
                                                                    fresh_accelerate_state):
    import diffusers

    base = request.getfixturevalue(f"tiny_{family}_dir")
    out = tmp_path / "run"
    _train(_argv(base, dataset, out, "--max_train_steps", 2, "--denoiser_lora_rank", 4))
    pipeline_class = getattr(diffusers, PIPELINE_CLASS[family])
    controlnet = getattr(diffusers, CONTROLNET_CLASS[family]).from_pretrained(out)
    pipeline = pipeline_class.from_pretrained(base, controlnet=controlnet)
    pipeline.load_lora_weights(out)
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert pipeline.get_list_adapters() and len(lora) > 0
    # Gaussian init leaves the down projection random and the up one zero; two updates moved the up projection.
    assert max(value.abs().max().item() for key, value in lora.items() if "lora.up" in key) > 0


def test_resume_matches_uninterrupted_run(tiny_sd3_dir, dataset, tmp_path, one_torch_thread, fresh_accelerate_state):
    from accelerate.state import AcceleratorState, GradientState

    def fresh():
        AcceleratorState._reset_state(True)
        GradientState._reset_state()

    # With a transformer LoRA too: its weights are part of the checkpoint and of the resumed result.
    common = ["--num_inner_epochs", 2, "--checkpointing_steps", 2, "--denoiser_lora_rank", 2]
    _train(_argv(tiny_sd3_dir, dataset, tmp_path / "straight", "--max_train_steps", 3, *common))
    fresh()
    _train(_argv(tiny_sd3_dir, dataset, tmp_path / "stopped", "--max_train_steps", 2, *common))
    fresh()
    result = _train(_argv(tiny_sd3_dir, dataset, tmp_path / "stopped", "--max_train_steps", 3, *common,
                          "--resume_from_checkpoint", "latest"))
    assert result.global_step == 3
    straight, stopped = load_file(tmp_path / "straight" / WEIGHTS), load_file(tmp_path / "stopped" / WEIGHTS)
    assert _max_difference(stopped, straight) < 1e-6
    lora = "pytorch_lora_weights.safetensors"
    assert _max_difference(load_file(tmp_path / "stopped" / lora), load_file(tmp_path / "straight" / lora)) < 1e-6
    at_two = load_file(tmp_path / "stopped" / "checkpoint-2" / "controlnet" / WEIGHTS)
    assert _max_difference(stopped, at_two) > 1e-7  # step 3 did move the weights
    logs = [json.loads((tmp_path / name / "grpo_log.json").read_text(encoding="utf-8"))["steps"]
            for name in ("straight", "stopped")]
    assert logs[0]["3"]["reward_edge_f1_mean"] == pytest.approx(logs[1]["3"]["reward_edge_f1_mean"], abs=1e-9)
    assert set(logs[1]) == {"1", "2", "3"}


@pytest.mark.slow
def test_two_processes_match_one_process(request, dataset, tmp_path, one_torch_thread, fresh_accelerate_state):
    from accelerate.state import AcceleratorState, GradientState

    runs = []
    for family in FAMILIES:
        base = request.getfixturevalue(f"tiny_{family}_dir")
        # With a transformer LoRA (not wrapped by DDP: its gradients are averaged by hand).
        steps = ["--max_train_steps", 2, "--denoiser_lora_rank", 2]
        _train(_argv(base, dataset, tmp_path / f"{family}-one", *steps))
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        runs.append(["train_controlnet_grpo.py",
                     _argv(base, dataset, tmp_path / f"{family}-two", *steps, "--train_batch_size", 1)])
    finished = launch(runs, tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]
    for family in FAMILIES:
        for name in (WEIGHTS, "pytorch_lora_weights.safetensors"):
            a, b = load_file(tmp_path / f"{family}-two" / name), load_file(tmp_path / f"{family}-one" / name)
            differences = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
            # Same controls, noise and rewards, gradients summed in another order: only float rounding.
            assert (differences > 1e-6).float().mean().item() < 1e-3, (family, name)
        one = json.loads((tmp_path / f"{family}-one" / "grpo_log.json").read_text(encoding="utf-8"))["steps"]
        two = json.loads((tmp_path / f"{family}-two" / "grpo_log.json").read_text(encoding="utf-8"))["steps"]
        assert two["2"]["reward_edge_f1_mean"] == pytest.approx(one["2"]["reward_edge_f1_mean"], abs=1e-6)
        # One inner epoch is on-policy: the update recomputes the sampler's own log-probabilities (ratio 1).
        assert one["1"]["clip_fraction"] == 0 and one["1"]["approx_kl"] < 1e-10, family


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_invocations_are_one_error_line(tiny_sdxl_dir, tiny_sd3_dir, dataset, tmp_path, capsys):
    script = load_script("train_controlnet_grpo.py")
    cases = [
        (["--pretrained_model_name_or_path", str(tiny_sdxl_dir), "--train_data_dir", str(dataset),
          "--output_dir", str(tmp_path)], "needs a flow-matching family"),
        ([a for a in _argv(tiny_sd3_dir, dataset, tmp_path) if a not in ("--controlnet_model_name_or_path",
                                                                        str(tiny_sd3_dir / "controlnet"))],
         "--controlnet_model_name_or_path is required"),
        (_argv(tiny_sd3_dir, dataset, tmp_path, "--num_image_per_prompt", 1), "at least 2"),
        (_argv(tiny_sd3_dir, dataset, tmp_path, "--reward", "aesthetic"), "unknown reward 'aesthetic'"),
        (_argv(tiny_sd3_dir, dataset, tmp_path, "--reward", "ocr_ned", "--ocr_backend", "none"), "text reward"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as stopped:
            run_cli(script.main, argv)
        assert stopped.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, err
