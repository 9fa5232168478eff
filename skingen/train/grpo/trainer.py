"""The GRPO loop around a trained ControlNet (``train_controlnet_grpo.py``).

A step: this process takes its ``--train_batch_size`` controls of the step's global batch (the seeded order of the
supervised trainer, so N processes with the same global batch train like one), samples
``--num_image_per_prompt`` trajectories per control with the SDE sampler (``--train_sampling_steps``, own seed
per trajectory), decodes them and scores them (``rewards``), normalises the rewards within each control's group,
then for ``--num_inner_epochs`` optimizer steps recomputes the log-probability of every trained denoising step
under the current ControlNet (and the starting one's mean, for the KL) and descends the clipped-ratio loss.

Setup, caches, checkpoints, resume, validation grids and the model card are the supervised trainer's
(``skingen.train.loop``); the family-specific parts (prompt entries, control latents, the velocity call, the
sampling schedule, decoding) come from the backbone. Held-out rewards (``--validation_split``, its first
``--validation_rows`` rows, ``--num_validation_images`` fixed seeds each, the ODE sampler with
``--validation_inference_steps``) are measured before training and every ``--validation_steps`` and kept in
``OUTPUT_DIR/grpo_log.json`` with the per-step statistics.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ...fileio import atomic_write_json, atomic_write_text
from ..batches import (
    GlobalBatchSampler,
    batch_to_device,
    collate_samples,
    load_training_rows,
    sample_seed,
    tensor_to_image,
)
from ..checkpoints import list_checkpoints, register_controlnet_hooks, save_checkpoint
from ..loop import Run, _make_optimizer, fill_caches, finish, set_up
from ..lora import LoraState, add_lora, average_gradients
from ..options import scaled_step_rules, trackers
from ..state import TrainingPlan, TrainingState
from .objective import group_advantages, grpo_loss
from .rewards import RewardInput, Rewards
from .sde import Trajectories, sample_trajectories, sde_step, trajectory_noise

logger = logging.getLogger(__name__)
LOG_FILE = "grpo_log.json"
EVAL_STREAM = -3  # sample_seed stream of the held-out evaluation's noise (the data order uses -1)


@dataclass
class GRPORun:
    """The supervised trainer's :class:`~skingen.train.loop.Run` plus what GRPO adds."""

    run: Run
    rewards: Rewards
    reference: Any  # the starting ControlNet, frozen (the KL's reference)
    log: dict[str, dict] = field(default_factory=lambda: {"steps": {}, "held_out": {}})


def train_grpo(args: argparse.Namespace) -> Any:
    """Fine-tune ``--controlnet_model_name_or_path`` with GRPO as ``args`` say; returns the trainer's result."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    from ...backbones import backbone_class

    output_dir = Path(args.output_dir)
    unused = backbone_class(args.backbone).ddp_find_unused_parameters
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, log_with=trackers(args.report_to),
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)] if unused else None,
    )
    try:
        grpo = set_up_grpo(args, accelerator)
        prepare(grpo)
        grpo_loop(grpo)
        result = finish(grpo.run)
        if accelerator.is_main_process:
            append_card_section(grpo)
        return result
    finally:
        accelerator.end_training()


def set_up_grpo(args, accelerator) -> GRPORun:
    from ...prep.ocr import get_ocr

    run = set_up(args, accelerator, ())
    if args.validation_split is not None:  # the held-out controls the rewards are measured on
        with accelerator.main_process_first():
            run.held_out = load_training_rows(args, split=args.validation_split, max_samples=args.validation_rows)
    # The empty prompt is the negative one of classifier-free guidance in the rollouts.
    fill_caches(run, extra_captions=[""] if args.sample_guidance_scale > 1 else [])
    reference = copy.deepcopy(run.controlnet).requires_grad_(False).eval().to(run.device, run.weight_dtype)
    if args.denoiser_lora_rank:  # trained with the ControlNet; finish() saves it, as the supervised trainers' LoRA
        run.lora_parameters = add_lora(run.backbone.denoiser, args.denoiser_lora_rank)
    weights = args.reward_weights
    ocr = get_ocr(args.ocr_backend) if any(name.startswith("ocr") for name in weights) else None
    return GRPORun(run, Rewards(weights, ocr=ocr), reference)


def prepare(grpo: GRPORun) -> None:
    """Optimizer, LR schedule, accelerate's wrapping, the resumed state and the log so far."""
    from diffusers.optimization import get_scheduler

    run, args, accelerator = grpo.run, grpo.run.args, grpo.run.accelerator
    processes = accelerator.num_processes
    max_steps = args.max_train_steps or math.ceil(args.num_train_epochs * len(run.samples)
                                                  / (args.train_batch_size * processes))
    plan = TrainingPlan(num_rows=len(run.samples), batch_size=args.train_batch_size, processes=processes,
                        accumulation=1, max_train_steps=max_steps)
    optimizer = _make_optimizer(args, [{"params": list(run.controlnet.parameters())},
                                       *([{"params": run.lora_parameters}] if run.lora_parameters else [])],
                                args.learning_rate)
    updates = max_steps * args.num_inner_epochs
    lr_scheduler = get_scheduler(  # stepped once per optimizer update, on every process
        args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * processes,
        num_training_steps=updates * processes, num_cycles=args.lr_num_cycles, power=args.lr_power,
        step_rules=scaled_step_rules(args.lr_step_rules, processes))
    run.controlnet, run.optimizer, run.lr_scheduler = accelerator.prepare(run.controlnet, optimizer, lr_scheduler)
    register_controlnet_hooks(accelerator)
    if run.lora_parameters:
        accelerator.register_for_checkpointing(LoraState(run.backbone.denoiser))
    run.state = TrainingState(seed=run.seed, plan=plan)
    log_path = run.output_dir / LOG_FILE
    if run.resume_path is not None:
        accelerator.load_state(str(run.resume_path))
        run.state.resume(run.saved_state, run.resume_path)
        logger.info(f"resumed from {run.resume_path} at step {run.state.global_step}")
        if log_path.is_file():  # what the interrupted run logged up to its checkpoint
            import json

            saved = json.loads(log_path.read_text(encoding="utf-8"))
            grpo.log = {part: {k: v for k, v in saved.get(part, {}).items() if int(k) <= run.state.global_step}
                        for part in ("steps", "held_out")}
    if accelerator.is_main_process:
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) and k != "hub_token"}
        accelerator.init_trackers(args.tracker_project_name, config={**config, "seed": run.seed})
    logger.info(f"GRPO: {plan.num_rows} controls, {plan.global_batch_size} per step x {args.num_image_per_prompt} "
                f"images, {args.train_sampling_steps} sampling steps, {max_steps} steps, {processes} process(es), "
                f"seed {run.seed}")


# ---------------------------------------------------------------------------------------------------------------
# Rollouts


@dataclass
class Rollouts:
    """This process's trajectories of one step: ``group`` consecutive ones per control."""

    trajectories: Trajectories
    prompts: dict[str, torch.Tensor]  # prompt entries, one per trajectory
    control: torch.Tensor  # control latents, one per trajectory
    scores: dict[str, np.ndarray]
    advantages: torch.Tensor


def expand(batch: dict, times: int) -> dict[str, torch.Tensor]:
    """The batch's tensors, each row repeated ``times`` times in place (a group per control)."""
    return {key: value.repeat_interleave(times, dim=0) for key, value in batch.items() if isinstance(value, torch.Tensor)}


def velocity_of(grpo: GRPORun, controlnet, prompts: dict, control: torch.Tensor):
    """The sampler's velocity field: ControlNet + denoiser (the backbone's own call), with classifier-free guidance
    ``u + g (c - u)`` under ``--sample_guidance_scale`` g > 1 (the unconditional half without gradients, as
    Flow-GRPO)."""
    run = grpo.run
    backbone, dtype = run.backbone, run.weight_dtype
    scale = run.args.sample_guidance_scale
    if scale <= 1:
        return lambda latents, timesteps: backbone.velocity(latents.to(dtype), timesteps, prompts, control, controlnet,
                                                            dtype).float()
    empty = run.text_cache.load("")
    batch_size = control.shape[0]
    both = {key: torch.cat([value, empty[key][None].to(value).expand_as(value)])
            for key, value in prompts.items() if key in empty}

    def guided(latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        velocity = backbone.velocity(torch.cat([latents, latents]).to(dtype), torch.cat([timesteps, timesteps]), both,
                                     torch.cat([control, control]), controlnet, dtype).float()
        conditional, unconditional = velocity[:batch_size], velocity[batch_size:].detach()
        return unconditional + scale * (conditional - unconditional)
    return guided


def sample_images(grpo: GRPORun, batch: dict, seeds: list[int], *, group: int, steps: int, noise_level: float,
                  controlnet) -> tuple[Trajectories, dict, torch.Tensor, list]:
    """``group`` trajectories per row of ``batch`` (trajectory ``i`` from ``seeds[i]``) and their images."""
    run = grpo.run
    backbone = run.backbone
    prompts = expand(batch, group)
    control = backbone.control_latents(batch, run.weight_dtype).repeat_interleave(group, dim=0)
    height, width = control.shape[-2:]
    channels = backbone.latent_channels
    sigmas = backbone.sampling_sigmas(steps, height, width)
    noise = trajectory_noise(seeds, steps, (channels, height, width)).to(run.device)
    trajectories = sample_trajectories(velocity_of(grpo, controlnet, prompts, control), noise, sigmas,
                                       noise_level=noise_level, num_train_timesteps=backbone.num_train_timesteps)
    with torch.no_grad():
        pixels = backbone.decode_latents(trajectories.final.to(run.vae_dtype))
    images = [tensor_to_image(image) for image in pixels.cpu()]
    return trajectories, prompts, control, images


def reward_inputs(batch: dict, group: int) -> list[RewardInput]:
    """What each of a batch's ``group`` images per row is scored against."""
    inputs = []
    for index, control in enumerate(batch["conditioning_pixel_values"].cpu()):
        boxes = batch["boxes"][index]
        given = RewardInput(tensor_to_image(control[:3] * 2 - 1), [box.cpu().numpy() for box in boxes], batch["texts"][index])
        inputs.extend([given] * group)
    return inputs


def collect_rollouts(grpo: GRPORun, batch: dict, seeds: list[int]) -> Rollouts:
    args = grpo.run.args
    group = args.num_image_per_prompt
    unwrapped = grpo.run.accelerator.unwrap_model(grpo.run.controlnet)
    trajectories, prompts, control, images = sample_images(
        grpo, batch, seeds, group=group, steps=args.train_sampling_steps, noise_level=args.noise_level,
        controlnet=unwrapped)
    scores = grpo.rewards.score(images, reward_inputs(batch, group))
    total = torch.tensor(grpo.rewards.total(scores), dtype=torch.float32)
    advantages = group_advantages(total, group, global_std=args.global_std)
    return Rollouts(trajectories, prompts, control, scores, advantages.to(grpo.run.device))


# ---------------------------------------------------------------------------------------------------------------
# The update


def update(grpo: GRPORun, rollouts: Rollouts) -> dict[str, float]:
    """One optimizer step on the rollouts: the loss of every trained denoising step, averaged."""
    run, args = grpo.run, grpo.run.args
    accelerator, controlnet = run.accelerator, run.controlnet
    trajectories = rollouts.trajectories
    sigmas = trajectories.sigmas.tolist()
    trained = range(int(args.train_sampling_steps * args.timestep_fraction))
    totals = {"loss": 0.0, "policy_loss": 0.0, "kl": 0.0, "clip_fraction": 0.0, "approx_kl": 0.0}
    for j in trained:
        latents = trajectories.latents[:, j]
        timesteps = torch.full((latents.shape[0],), sigmas[j] * run.backbone.num_train_timesteps, device=run.device)
        last = j == trained[-1]
        with accelerator.no_sync(controlnet) if not last else contextlib.nullcontext():
            velocity = velocity_of(grpo, controlnet, rollouts.prompts, rollouts.control)(latents, timesteps)
            step = sde_step(velocity, latents, sigmas[j], sigmas[j + 1], noise_level=args.noise_level,
                            sigma_cap=sigmas[1], prev_sample=trajectories.latents[:, j + 1])
            ref_mean = None
            if args.beta > 0:
                with torch.no_grad(), starting_denoiser(run):
                    ref_velocity = velocity_of(grpo, grpo.reference, rollouts.prompts, rollouts.control)(latents, timesteps)
                    ref_mean = sde_step(ref_velocity, latents, sigmas[j], sigmas[j + 1], noise_level=args.noise_level,
                                        sigma_cap=sigmas[1], prev_sample=trajectories.latents[:, j + 1]).mean
            loss = grpo_loss(step.log_prob, trajectories.log_probs[:, j], rollouts.advantages,
                             clip_range=args.clip_range, adv_clip_max=args.adv_clip_max, beta=args.beta,
                             mean=step.mean, ref_mean=ref_mean, std=step.std)
            accelerator.backward(loss.loss / len(trained))
        for name, value in (("loss", loss.loss), ("policy_loss", loss.policy), ("kl", loss.kl),
                            ("clip_fraction", loss.clip_fraction), ("approx_kl", loss.approx_kl)):
            totals[name] += value.detach().float().item() / len(trained)
    average_gradients(accelerator, run.lora_parameters)  # the ControlNet's are averaged by DDP
    accelerator.clip_grad_norm_([*controlnet.parameters(), *run.lora_parameters], args.max_grad_norm)
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=args.set_grads_to_none)
    reduced = accelerator.reduce(torch.tensor(list(totals.values()), device=run.device), reduction="mean")
    return dict(zip(totals, reduced.cpu().tolist()))


@contextlib.contextmanager
def starting_denoiser(run: Run):
    """The denoiser as GRPO started from: its LoRA (``--denoiser_lora_rank``) switched off meanwhile."""
    if not run.lora_parameters:
        yield
        return
    run.backbone.denoiser.disable_adapters()
    try:
        yield
    finally:
        run.backbone.denoiser.enable_adapters()


# ---------------------------------------------------------------------------------------------------------------
# The loop


def grpo_loop(grpo: GRPORun) -> None:
    run, args, accelerator, state = grpo.run, grpo.run.args, grpo.run.accelerator, grpo.run.state
    plan = state.plan
    sampler = GlobalBatchSampler(plan.num_rows, plan.batch_size, plan.processes, accelerator.process_index, run.seed,
                                 state.global_step, plan.max_train_steps)
    progress = tqdm(total=plan.max_train_steps, initial=state.global_step, desc="GRPO steps",
                    disable=not accelerator.is_local_main_process)
    if state.global_step == 0:
        held_out = evaluate_held_out(grpo, 0)
        if held_out:
            accelerator.log(held_out, step=0)
    for items in sampler:
        batch = batch_to_device(collate_samples([run.samples.sample(row, seed) for row, seed in items]), run.device)
        seeds = [sample_seed(seed, 0, k) for _, seed in items for k in range(args.num_image_per_prompt)]
        rollouts = collect_rollouts(grpo, batch, seeds)
        logs = reward_statistics(accelerator, rollouts)
        for _ in range(args.num_inner_epochs):
            logs.update(update(grpo, rollouts))
        state.record_step(True)
        progress.update(1)
        after_step(grpo, logs, progress)
    progress.close()


def reward_statistics(accelerator, rollouts: Rollouts) -> dict[str, float]:
    """Mean and std of each reward over the step's images on every process (NaN scores left out)."""
    logs = {}
    for name, values in rollouts.scores.items():
        gathered = accelerator.gather(torch.tensor(values, dtype=torch.float64, device=accelerator.device)).cpu()
        gathered = gathered[~torch.isnan(gathered)]
        if len(gathered):
            logs[f"reward_{name}_mean"] = gathered.mean().item()
            logs[f"reward_{name}_std"] = gathered.std(unbiased=False).item()
    return logs


def after_step(grpo: GRPORun, logs: dict[str, float], progress) -> None:
    run, args, accelerator, state = grpo.run, grpo.run.args, grpo.run.accelerator, grpo.run.state
    step = state.global_step
    progress.set_postfix(**{k: f"{v:.4g}" for k, v in logs.items() if k.endswith("_mean") or k == "kl"})
    logs["lr"] = run.lr_scheduler.get_last_lr()[0]
    if step % args.validation_steps == 0 or state.finished:
        logs.update(evaluate_held_out(grpo, step))
    accelerator.log(logs, step=step)
    grpo.log["steps"][str(step)] = logs
    if accelerator.is_main_process:
        atomic_write_json(run.output_dir / LOG_FILE, grpo.log)
    if step % args.checkpointing_steps == 0:
        save_checkpoint(accelerator, run.output_dir, step, state.checkpoint(), args.checkpoints_total_limit)
    if run.pairs and step % args.validation_steps == 0 and accelerator.is_main_process:
        run.validate(step)


@torch.no_grad()
def evaluate_held_out(grpo: GRPORun, step: int) -> dict[str, float]:
    """Mean rewards of the held-out controls' images, sampled with the ODE sampler at fixed seeds (main process;
    {} without --validation_split)."""
    run, args = grpo.run, grpo.run.args
    if run.held_out is None or not run.accelerator.is_main_process:
        return {}
    controlnet = run.accelerator.unwrap_model(run.controlnet)
    images_per_control = args.num_validation_images
    scores: dict[str, list] = {name: [] for name in grpo.rewards.names}
    for row in range(len(run.loss_samples)):
        batch = batch_to_device(collate_samples([run.loss_samples.sample(row, 0, fixed_timestep=0)]), run.device)
        seeds = [sample_seed(run.seed, EVAL_STREAM, row * images_per_control + k) for k in range(images_per_control)]
        _, _, _, images = sample_images(grpo, batch, seeds, group=images_per_control,
                                        steps=args.validation_inference_steps, noise_level=0.0, controlnet=controlnet)
        for name, values in grpo.rewards.score(images, reward_inputs(batch, images_per_control)).items():
            scores[name].extend(values.tolist())
    values = {f"val_{name}": float(np.nanmean(v)) for name, v in scores.items() if not np.all(np.isnan(v))}
    grpo.log["held_out"][str(step)] = values
    logger.info(f"step {step}: held-out rewards " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
    return values


def append_card_section(grpo: GRPORun) -> None:
    """The model card says how the ControlNet was fine-tuned and what the held-out rewards did."""
    run, args = grpo.run, grpo.run.args
    card = run.output_dir / "README.md"
    held = grpo.log["held_out"]
    lines = ["", "## GRPO fine-tuning", "",
             f"Fine-tuned from `{args.controlnet_model_name_or_path}` by `train_controlnet_grpo.py` (Flow-GRPO) with "
             f"rewards `{args.reward}`, {args.num_image_per_prompt} images per control, "
             f"{args.train_sampling_steps} SDE sampling steps (noise level {args.noise_level}), clip range "
             f"{args.clip_range}, KL weight {args.beta}"
             + (f", with a rank-{args.denoiser_lora_rank} transformer LoRA (`pytorch_lora_weights.safetensors`)."
                if args.denoiser_lora_rank else "."), ""]
    if held:
        first, last = min(held, key=int), max(held, key=int)
        lines += ["| held-out reward | step " + first + " | step " + last + " |", "|---|---|---|"]
        lines += [f"| {name} | {held[first].get(name, float('nan')):.4f} | {held[last].get(name, float('nan')):.4f} |"
                  for name in held[last]]
    checkpoints = list_checkpoints(run.output_dir)
    if checkpoints:
        lines += ["", f"Checkpoints: {', '.join(path.name for _, path in checkpoints)}."]
    # The supervised trainers' card names their script; this ControlNet came out of this one.
    text = card.read_text(encoding="utf-8").replace(f"trained by skingen's `train_controlnet_{args.backbone}.py`",
                                                    "fine-tuned with GRPO by skingen's `train_controlnet_grpo.py`")
    atomic_write_text(card, text + "\n".join(lines) + "\n")
