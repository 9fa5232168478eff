"""The one training loop of every backbone (``train_controlnet_sdxl.py``, ``_sd3.py``, ``_flux.py``, ``_zimage.py``,
``_qwenimage.py``, the text-loss trainer, and ``train_text_to_image.py``, which trains the denoiser itself:
``skingen.train.denoiser_training``); what is particular to a family lives in ``skingen.backbones``.

Flags follow diffusers' ``examples/controlnet/train_controlnet_{sdxl,sd3,flux}.py``; what differs:

- Text embeddings (per distinct caption) and VAE latent distributions are cached on disk and reused by
  later runs (``skingen.data.caches``); prompt dropout is still decided per step.
- The data order and every sample's randomness follow from the seed (``skingen.train.batches``), so a resumed
  run ends with the same weights as an uninterrupted one, and N processes with the same global batch train
  like one process.
- Checkpoints are written atomically (``skingen.train.checkpoints``); a non-finite loss skips the optimizer
  update and ``--max_nonfinite_steps`` in a row stop training with the last good checkpoint kept.
- An optional extra loss (``ExtraLoss``, e.g. the OCR text loss) is added to the diffusion loss.

A run is five stages around a :class:`Run` (what setup loaded) and a :class:`TrainingState` (the counters and
what a checkpoint stores): :func:`set_up`, :func:`fill_caches`, :func:`prepare_optimization`, :func:`train_loop`,
then :func:`finish`. Flags: ``skingen.train.args``. Validation grids and the model card: ``skingen.train.validation``.

Testing hook: ``--debug_inject_nan_at_step N [N ...]`` (hidden from ``--help``) turns the loss of those
optimizer steps (1-based, as in ``checkpoint-N``) into NaN, to exercise the non-finite handling.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..backbones import backbone_class
from ..backbones.base import Backbone
from ..errors import SkingenError
from .args import build_arg_parser, parse_training_args, validate_training_args  # noqa: F401 (the trainers' API)
from .batches import (
    GlobalBatchSampler,
    TrainingSamples,
    batch_to_device,
    collate_samples,
    load_training_rows,
    row_placements,
    training_pixels,
)
from .caching import cache_latents, cache_text_embeddings, main_process_value, place_model, report_truncated_captions
from .checkpoints import (
    list_checkpoints,
    read_training_state,
    recover_interrupted_saves,
    register_controlnet_hooks,
    resolve_resume_checkpoint,
    save_checkpoint,
    save_controlnet_weights,
)
from .conditioning import kaiming_conditioning_encoder, match_conditioning_channels
from .denoiser_training import (
    check_denoiser_args,
    trainable_denoiser,
    trained_subfolder,
    trains_denoiser,
    weights_folder,
    without_controls,
)
from .ema import WeightsEMA
from .extra_losses import ExtraLoss, build_extra_losses
from .lora import LoraState, add_lora, average_gradients
from .loss_weighting import LossOptions
from .options import conditioning_columns, conditioning_dropout, interpolation_filter, scaled_step_rules, trackers
from .state import LossWindow, TrainingPlan, TrainingState
from .step import compute_losses, fixed_timestep_losses
from .validation import load_validation_pairs, log_validation, write_model_card

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainingResult:
    output_dir: Path
    global_step: int
    nonfinite_steps: int
    checkpoints: list[Path]
    validation_grids: list[Path]
    cache_stats: dict[str, int]
    validation_losses: dict[int, dict[str, float]]  # step (0: before training) -> val_* values
    is_main_process: bool


def resolve_seed(args, saved: dict[str, Any], accelerator) -> int:
    """``--seed``, else the resumed checkpoint's seed, else a random one (the same on every process)."""
    if args.seed is not None and saved.get("seed") not in (None, args.seed):
        logger.warning(f"--seed {args.seed} differs from the checkpoint's seed {saved['seed']}: the rest of the run "
                       "will see other noise and data order than the interrupted one would have")
    seed = args.seed if args.seed is not None else saved.get("seed")
    if seed is None:
        seed = main_process_value(accelerator, lambda: secrets.randbelow(2**31))
    return int(seed)


def train(args: argparse.Namespace, extra_loss: ExtraLoss | None = None, *,
          on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainingResult:
    """Train a ControlNet as ``args`` (from :func:`build_arg_parser`) say, with the extra losses the flags turn on
    (:func:`~skingen.train.extra_losses.build_extra_losses`: text loss, edge loss) added to the diffusion loss, after
    ``extra_loss`` when a caller measures one of its own (benchmarks, tests); ``on_step(step, logs)`` runs after
    each optimizer step on every process."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    output_dir = Path(args.output_dir)
    # SD3's ControlNet has parameters a step does not use (its last block's text stream), which DDP must be told; so
    # may a trained denoiser (Z-Image's pad tokens serve only captions and images that need padding).
    unused = backbone_class(getattr(args, "backbone", "sdxl")).ddp_find_unused_parameters or trains_denoiser(args)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=trackers(args.report_to),
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)] if unused else None,
    )
    try:
        extra_losses = (*([extra_loss] if extra_loss is not None else []), *build_extra_losses(args))
        run = set_up(args, accelerator, extra_losses)
        fill_caches(run)
        prepare_optimization(run)
        train_loop(run, on_step)
        return finish(run)
    finally:
        accelerator.end_training()


@dataclass
class Run:
    """Everything a training run holds after setup; the loop, validation and finishing read it."""

    args: argparse.Namespace
    accelerator: Any
    output_dir: Path
    seed: int
    resume_path: Path | None
    saved_state: dict[str, Any]
    dataset: Any
    pairs: list
    backbone: Backbone
    model: Any  # the trained model: the ControlNet, or the backbone's denoiser (accelerate's wrapper after prepare)
    weight_dtype: torch.dtype
    vae_dtype: torch.dtype
    extra_losses: tuple[ExtraLoss, ...]
    repo_id: str | None = None
    ema: WeightsEMA | None = None
    lora_parameters: list = field(default_factory=list)
    text_cache: Any = None
    samples: TrainingSamples | None = None
    held_out: Any = None  # the --validation_split rows the fixed-timestep losses use (None: the first training rows)
    loss_samples: TrainingSamples | None = None  # the rows --validation_loss_timesteps evaluates
    cache_stats: dict[str, int] = field(default_factory=dict)
    state: TrainingState | None = None
    optimizer: Any = None
    lr_scheduler: Any = None
    grids: list[Path] = field(default_factory=list)
    last_validated: int | None = None
    validation_losses: dict[int, dict[str, float]] = field(default_factory=dict)

    @property
    def device(self):
        return self.accelerator.device

    @property
    def trains_denoiser(self) -> bool:
        return trains_denoiser(self.args)

    @property
    def controlnet(self):
        """The trained ControlNet; None when the denoiser itself is trained."""
        return None if self.trains_denoiser else self.model

    @controlnet.setter
    def controlnet(self, controlnet) -> None:  # the GRPO trainer prepares its own
        self.model = controlnet

    def validate(self, step: int) -> None:
        """Sample the validation grid (main process only), with the EMA weights under ``--use_ema``."""
        controlnet = self.accelerator.unwrap_model(self.controlnet)
        with self.ema.swapped_in(controlnet) if self.ema is not None else contextlib.nullcontext():
            self._log_validation(step)
        self.last_validated = step

    def _log_validation(self, step: int) -> None:
        self.grids.append(log_validation(
            self.pairs, args=self.args, accelerator=self.accelerator, backbone=self.backbone, controlnet=self.controlnet,
            text_cache=self.text_cache, weight_dtype=self.weight_dtype, step=step, seed=self.seed))

    def validation_loss(self, step: int) -> dict[str, float]:
        """The fixed-timestep losses (``--validation_loss_timesteps``), on the main process; {} when off."""
        args = self.args
        if not args.validation_loss_timesteps or not self.accelerator.is_main_process:
            return {}
        values = fixed_timestep_losses(
            self.loss_samples, rows=range(min(args.validation_loss_rows, len(self.loss_samples))),
            timesteps=args.validation_loss_timesteps, seed=self.seed, batch_size=args.train_batch_size,
            device=self.device, controlnet=self.controlnet and self.accelerator.unwrap_model(self.controlnet),
            backbone=self.backbone, weight_dtype=self.weight_dtype, extra_losses=self.extra_losses, step=step)
        self.validation_losses[step] = values
        logger.info(f"step {step}: losses at fixed timesteps {args.validation_loss_timesteps}: "
                    + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
        return values


def set_up(args, accelerator, extra_losses: tuple[ExtraLoss, ...]) -> Run:
    """Output folder, resume point, seed, rows, validation pairs and models (the trained one on CPU, fp32)."""
    from accelerate.utils import set_seed

    _setup_logging(accelerator)
    if trains_denoiser(args):
        check_denoiser_args(args)
    output_dir = Path(args.output_dir)
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise SkingenError("--mixed_precision fp16 needs a CUDA GPU; on CPU use --mixed_precision bf16 or no")
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        recover_interrupted_saves(output_dir)
    accelerator.wait_for_everyone()
    resume_path = resolve_resume_checkpoint(output_dir, args.resume_from_checkpoint, trained_subfolder(args))
    if args.resume_from_checkpoint and resume_path is None:
        logger.info(f"no checkpoint in {output_dir} yet; starting a new run")
    saved_state = read_training_state(resume_path) if resume_path else {}
    seed = resolve_seed(args, saved_state, accelerator)
    set_seed(seed)
    repo_id = None
    if args.push_to_hub and accelerator.is_main_process:
        from huggingface_hub import create_repo

        repo_id = create_repo(repo_id=args.hub_model_id or output_dir.name, exist_ok=True, token=args.hub_token).repo_id

    with accelerator.main_process_first():
        dataset = load_training_rows(args)
        # Fixed-timestep losses on held-out rows when there is a split to hold out (as kohya's validation loss).
        held_out = (load_training_rows(args, split=args.validation_split, max_samples=args.validation_loss_rows)
                    if args.validation_loss_timesteps and args.validation_split else None)
    pairs = [] if trains_denoiser(args) else load_validation_pairs(args)  # grids of ControlNets only

    # Models. Only the ControlNet (or the denoiser itself) trains; the rest are frozen and kept in the mixed-precision dtype, except the
    # VAE, which stays fp32 unless an fp16-safe VAE was given (SDXL's own VAE overflows in fp16). The ControlNet
    # given to fine-tune is checked against the base model before anything is cached.
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    backbone = backbone_class(getattr(args, "backbone", "sdxl"))(args, frozen_dtype=weight_dtype)
    if args.controlnet_model_name_or_path is not None:
        backbone.check_controlnet(args.controlnet_model_name_or_path)
    denoiser = backbone.denoiser
    size_factor, size_reason = backbone.resolution_multiple()
    if args.resolution % size_factor:
        raise SkingenError(f"--resolution {args.resolution}: this model needs a multiple of {size_factor} ({size_reason})")
    if args.enable_bucket and any(v % size_factor for v in (args.bucket_reso_steps, args.min_bucket_reso)):
        raise SkingenError(f"--bucket_reso_steps {args.bucket_reso_steps} and --min_bucket_reso {args.min_bucket_reso}: "
                           f"this model needs multiples of {size_factor}")
    if args.tokenizer_name is not None:
        from transformers import AutoTokenizer

        backbone.tokenizers[0] = AutoTokenizer.from_pretrained(args.tokenizer_name, revision=args.revision,
                                                               use_fast=False)
    num_train_timesteps = backbone.num_train_timesteps
    if any(t >= num_train_timesteps for t in args.validation_loss_timesteps or ()):
        raise SkingenError(f"--validation_loss_timesteps {args.validation_loss_timesteps}: the scheduler has timesteps "
                           f"0..{num_train_timesteps - 1}")
    for frozen in backbone.frozen_models():
        frozen.requires_grad_(False)
    # Trainable weights stay fp32 even under mixed precision (an fp16 ControlNet is upcast).
    model = trainable_denoiser(backbone) if trains_denoiser(args) else _new_controlnet(args, backbone, seed)
    model.train()
    controlnet = None if model is denoiser else model
    for module in (denoiser, *([controlnet] if controlnet is not None else [])):
        if args.enable_xformers_memory_efficient_attention:
            module.enable_xformers_memory_efficient_attention()
        if args.enable_npu_flash_attention:  # check_option_args made sure an NPU is there
            module.enable_npu_flash_attention()
    if args.gradient_checkpointing:
        backbone.enable_gradient_checkpointing(controlnet)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    vae_dtype = weight_dtype if args.pretrained_vae_model_name_or_path else torch.float32
    return Run(args=args, accelerator=accelerator, output_dir=output_dir, seed=seed, resume_path=resume_path,
               saved_state=saved_state, dataset=dataset, held_out=held_out, pairs=pairs, backbone=backbone,
               model=model, weight_dtype=weight_dtype, vae_dtype=vae_dtype, extra_losses=extra_losses,
               repo_id=repo_id)


def _new_controlnet(args, backbone: Backbone, seed: int):
    """The ControlNet to train, fp32 on the CPU: loaded, or initialised from the denoiser."""
    controlnet = place_model(backbone.create_controlnet(args.controlnet_model_name_or_path), "cpu", torch.float32)
    if not backbone.encodes_conditioning:  # SD3/FLUX ControlNets read one image through the VAE
        new = args.controlnet_model_name_or_path is None
        controlnet = match_conditioning_channels(controlnet, len(conditioning_columns(args)), new=new)
        if new and args.controlnet_conditioning_init == "kaiming":
            controlnet = kaiming_conditioning_encoder(controlnet, seed=seed)
    return controlnet


def fill_caches(run: Run, extra_captions: Sequence[str] = ()) -> None:
    """Cache every caption the run can use (dropout's "" and validation prompts included, and ``extra_captions``),
    then latents; build the training samples (and the held-out ones of the fixed-timestep losses); move the frozen
    models where the loop needs them."""
    args, accelerator, backbone = run.args, run.accelerator, run.backbone
    cache_root = Path(args.embeddings_cache_dir) if args.embeddings_cache_dir else run.output_dir / "cache"
    captions = set(run.dataset.captions) | (set(run.held_out.captions) if run.held_out is not None else set())
    # "" also serves validation as the negative prompt.
    captions |= {pair.prompt for pair in run.pairs} | ({""} if args.proportion_empty_prompts > 0 or run.pairs else set())
    captions |= set(extra_captions)
    report_truncated_captions(backbone, sorted(set(run.dataset.captions)), accelerator)
    run.text_cache, run.cache_stats = cache_text_embeddings(args, accelerator, backbone, captions, run.weight_dtype,
                                                             cache_root)
    backbone.drop_text_encoders()  # no longer needed anywhere
    run.samples = _training_samples(run, run.dataset, cache_root)
    run.loss_samples = _training_samples(run, run.held_out, cache_root) if run.held_out is not None else run.samples
    vae_on_device = not args.cache_latents or bool(run.extra_losses) or backbone.encodes_conditioning
    place_model(backbone.vae, run.device if vae_on_device else "cpu", run.vae_dtype)
    if not backbone.denoiser_quantized:  # a quantized denoiser is already on its device, in its own dtypes
        place_model(backbone.denoiser, run.device, torch.float32 if run.trains_denoiser else run.weight_dtype)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _training_samples(run: Run, rows, cache_root: Path) -> TrainingSamples:
    """``rows`` as training samples: where each image goes at training size, its latents cached (counted in
    ``run.cache_stats``) under ``--cache_latents``."""
    args = run.args
    if run.trains_denoiser:
        rows = without_controls(rows)
    placements = row_placements(args, rows)
    resample = interpolation_filter(args.image_interpolation_mode)
    latent_cache = latent_keys = None
    if args.cache_latents:
        latent_cache, latent_keys, latent_stats = cache_latents(
            args, run.accelerator, rows, run.backbone, run.vae_dtype, cache_root, [p.target for p in placements],
            load_pixels=lambda row: training_pixels(rows.image(row), args.resolution, placements[row], resample))
        for key, value in latent_stats.items():
            run.cache_stats[key] = run.cache_stats.get(key, 0) + value
    vae_scale = run.backbone.vae_scale_factor
    return TrainingSamples(
        rows, resolution=args.resolution, text_cache=run.text_cache, latent_cache=latent_cache,
        latent_keys=latent_keys,
        latent_shape=(run.backbone.latent_channels, args.resolution // vae_scale, args.resolution // vae_scale),
        backbone=run.backbone, proportion_empty_prompts=args.proportion_empty_prompts,
        load_pixel_values=any(getattr(loss, "needs_pixel_values", False) for loss in run.extra_losses),
        placements=placements, bucketed=args.enable_bucket, resample=resample,
        conditioning_dropout=conditioning_dropout(args), loss_options=LossOptions.from_args(args),
    )


def prepare_optimization(run: Run) -> None:
    """The step plan, optimizer and LR schedule, accelerate's wrapping, and the resumed state."""
    from diffusers.optimization import get_scheduler

    args, accelerator = run.args, run.accelerator
    # The data is a stream of global batches; an optimizer step takes gradient_accumulation_steps of them.
    processes, accumulation = accelerator.num_processes, args.gradient_accumulation_steps
    batches_per_epoch = math.ceil(len(run.samples) / (args.train_batch_size * processes))
    plan = TrainingPlan(
        num_rows=len(run.samples), batch_size=args.train_batch_size, processes=processes, accumulation=accumulation,
        max_train_steps=args.max_train_steps or math.ceil(args.num_train_epochs * batches_per_epoch / accumulation),
    )
    learning_rate = args.learning_rate * (accumulation * plan.global_batch_size if args.scale_lr else 1)
    if args.unet_lora_rank:  # trained with the ControlNet; the UNet's own weights stay frozen
        run.lora_parameters = add_lora(run.backbone.denoiser, args.unet_lora_rank)
    optimizer = _make_optimizer(args, [{"params": list(run.model.parameters())},
                                       *([{"params": run.lora_parameters}] if run.lora_parameters else [])], learning_rate)
    lr_scheduler = get_scheduler(  # accelerate steps a prepared scheduler once per process
        args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * processes,
        num_training_steps=plan.max_train_steps * processes, num_cycles=args.lr_num_cycles, power=args.lr_power,
        step_rules=scaled_step_rules(args.lr_step_rules, processes),
    )
    if args.torch_compile:
        run.backbone.denoiser.compile()
        if run.controlnet is not None:
            run.controlnet.compile()
    if accelerator.state.deepspeed_plugin is not None:  # no dataloader goes through prepare to tell it
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = args.train_batch_size
    run.model, run.optimizer, run.lr_scheduler = accelerator.prepare(run.model, optimizer, lr_scheduler)
    register_controlnet_hooks(accelerator, trained_subfolder(args))
    # Checkpoints hold these as accelerate custom states, in this order.
    if args.use_ema:
        run.ema = WeightsEMA(accelerator.unwrap_model(run.model), decay=args.ema_decay,
                             update_after_step=args.ema_update_after_step, device=run.device, foreach=args.foreach_ema)
        accelerator.register_for_checkpointing(run.ema)
    if run.lora_parameters:
        accelerator.register_for_checkpointing(LoraState(run.backbone.denoiser))

    run.state = TrainingState(seed=run.seed, plan=plan)
    if run.resume_path is not None:
        _check_option_states(run.resume_path, ["--use_ema"] * bool(run.ema) + ["--unet_lora_rank"] * bool(run.lora_parameters))
        accelerator.load_state(str(run.resume_path))
        run.state.resume(run.saved_state, run.resume_path)
        logger.info(f"resumed from {run.resume_path} at step {run.state.global_step}")

    if accelerator.is_main_process:
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) and k != "hub_token"}
        accelerator.init_trackers(args.tracker_project_name, config={**config, "seed": run.seed})
    logger.info(f"{plan.num_rows} rows, {plan.global_batch_size} per global batch x {accumulation} accumulation, "
                f"{plan.max_train_steps} steps, {processes} process(es), seed {run.seed}; cache: {run.cache_stats}")


def train_loop(run: Run, on_step: Callable[[int, dict[str, float]], None] | None = None) -> None:
    """Optimizer steps from the state's position in the seeded data order to ``max_train_steps``."""
    args, accelerator, state, plan = run.args, run.accelerator, run.state, run.state.plan
    sampler = GlobalBatchSampler(plan.num_rows, plan.batch_size, plan.processes, accelerator.process_index, run.seed,
                                 state.micro_step, plan.max_train_steps * plan.accumulation,
                                 buckets=[p.target for p in run.samples.placements] if args.enable_bucket else None)
    loader = torch.utils.data.DataLoader(run.samples, batch_sampler=sampler, collate_fn=collate_samples,
                                         num_workers=args.dataloader_num_workers, pin_memory=run.device.type == "cuda")
    progress = tqdm(total=plan.max_train_steps, initial=state.global_step, desc="Steps",
                    disable=not accelerator.is_local_main_process)
    inject_nan = set(args.debug_inject_nan_at_step or ())
    names = ("loss", "loss_diffusion") + tuple(f"loss_{loss.name}" for loss in run.extra_losses)
    window = LossWindow(names)
    trained = [*run.model.parameters(), *run.lora_parameters]
    denoiser = run.model if run.trains_denoiser else None  # called through accelerate's wrapper when trained

    if state.global_step == 0 and (start_values := run.validation_loss(0)):
        accelerator.log(start_values, step=0)

    with progress:  # closed on an error too, so the error starts its own line
        for batch in loader:
            batch = batch_to_device(batch, run.device)
            with accelerator.accumulate(run.model):
                losses = compute_losses(batch, controlnet=run.controlnet, backbone=run.backbone, weight_dtype=run.weight_dtype,
                                        extra_losses=run.extra_losses, step=state.global_step, denoiser=denoiser)
                loss = losses.loss * float("nan") if state.global_step + 1 in inject_nan else losses.loss
                parts = {"loss": loss, "loss_diffusion": losses.loss_diffusion, **losses.extras}
                finite = window.add(accelerator, parts, 1.0 / (plan.processes * plan.accumulation))
                window.extra_logs = dict(losses.extra_logs)
                if finite:
                    accelerator.backward(loss)
                if accelerator.sync_gradients:
                    if window.finite:
                        average_gradients(accelerator, run.lora_parameters)  # the ControlNet's are averaged by DDP
                        accelerator.clip_grad_norm_(trained, args.max_grad_norm)
                        run.optimizer.step()
                    run.lr_scheduler.step()
                    run.optimizer.zero_grad(set_to_none=args.set_grads_to_none)
                    if run.ema is not None:
                        run.ema.step(accelerator.unwrap_model(run.model))
            if not accelerator.sync_gradients:
                continue
            state.record_step(window.finite)
            progress.update(1)
            if not window.finite:
                logger.warning(f"step {state.global_step}: loss is not finite; skipped the update "
                               f"({state.nonfinite_in_a_row} in a row)")
            _after_step(run, window.logs(), progress, on_step)
            window.reset()


def _after_step(run: Run, logs: dict[str, float], progress, on_step) -> None:
    """Log, stop on too many non-finite steps, checkpoint and validate after an optimizer step."""
    args, accelerator, state = run.args, run.accelerator, run.state
    step = state.global_step
    progress.set_postfix(**{k: f"{v:.4g}" for k, v in logs.items()})
    logs.update(lr=run.lr_scheduler.get_last_lr()[0], nonfinite_steps=state.nonfinite_steps)
    if step % args.validation_steps == 0 or state.finished:
        logs.update(run.validation_loss(step))
    accelerator.log(logs, step=step)
    if on_step is not None:
        on_step(step, logs)

    if state.nonfinite_in_a_row >= args.max_nonfinite_steps:
        checkpoints = list_checkpoints(run.output_dir)
        kept = f"the last good checkpoint is {checkpoints[-1][1]}" if checkpoints else "no checkpoint was saved yet"
        raise SkingenError(
            f"training stopped at step {step}: the loss was NaN/inf for {state.nonfinite_in_a_row} steps in a row "
            f"(--max_nonfinite_steps {args.max_nonfinite_steps}); those updates were skipped and {kept}. Try a lower "
            "--learning_rate, --mixed_precision bf16, or an fp16-safe --pretrained_vae_model_name_or_path, then "
            "--resume_from_checkpoint latest"
        )
    if step % args.checkpointing_steps == 0:
        save_checkpoint(accelerator, run.output_dir, step, state.checkpoint(), args.checkpoints_total_limit)
    if run.pairs and step % args.validation_steps == 0 and accelerator.is_main_process:
        run.validate(step)


def finish(run: Run) -> TrainingResult:
    """Save the trained model (a ControlNet in OUTPUT_DIR, a denoiser in OUTPUT_DIR/unet or /transformer), the last
    validation grid and the model card (of a ControlNet); upload if asked."""
    args, accelerator, state = run.args, run.accelerator, run.state
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(run.model)
        save_controlnet_weights(_in_save_dtype(model, args), weights_folder(args, run.output_dir))
        if run.ema is not None:
            run.ema.save(model, run.output_dir, lambda ema, folder: save_controlnet_weights(ema, weights_folder(args, folder)))
        if run.lora_parameters:
            run.backbone.save_denoiser_lora(run.output_dir)
        if run.pairs and run.last_validated != state.global_step:
            run.validate(state.global_step)
        if not run.trains_denoiser:  # the card describes a ControlNet
            card_args = argparse.Namespace(**{**vars(args), "seed": run.seed})
            write_model_card(card_args, global_step=state.global_step, num_rows=state.plan.num_rows,
                             num_processes=state.plan.processes, mixed_precision=accelerator.mixed_precision,
                             grid=run.grids[-1] if run.grids else None)
        if run.repo_id is not None:
            from huggingface_hub import upload_folder

            upload_folder(repo_id=run.repo_id, folder_path=run.output_dir, commit_message="End of training",
                          token=args.hub_token, ignore_patterns=["checkpoint-*", "cache/*", ".*", f"{args.logging_dir}/*"])
    accelerator.wait_for_everyone()
    return TrainingResult(
        output_dir=run.output_dir, global_step=state.global_step, nonfinite_steps=state.nonfinite_steps,
        checkpoints=[path for _, path in list_checkpoints(run.output_dir)], validation_grids=run.grids,
        cache_stats=run.cache_stats, validation_losses=run.validation_losses,
        is_main_process=accelerator.is_main_process,
    )


# ---------------------------------------------------------------------------------------------------------------
# Helpers of the loop


def _setup_logging(accelerator) -> None:
    import diffusers
    import transformers

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    # The loop's stages speak once, from the main process (the loop, its state and its cache filling).
    for name in (__name__, f"{__package__}.state", f"{__package__}.caching"):
        logging.getLogger(name).setLevel(logging.INFO if accelerator.is_main_process else logging.ERROR)
    library_level = logging.WARNING if accelerator.is_local_main_process else logging.ERROR
    transformers.utils.logging.set_verbosity(library_level)
    diffusers.utils.logging.set_verbosity(library_level)
    # Loading bars of every weight file (transformers >= 5 shows one per model) are library noise, not stages.
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


def _in_save_dtype(controlnet, args):
    """The ControlNet to save: a copy in ``--save_weight_dtype`` (FLUX's flag) when that is not fp32."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(getattr(args, "save_weight_dtype", "fp32"))
    if dtype is None:
        return controlnet
    import copy

    return copy.deepcopy(controlnet).to(dtype=dtype)


def _check_option_states(checkpoint: Path, flags: list[str]) -> None:
    """A checkpoint holds the EMA and LoRA states (accelerate's custom_checkpoint_<i>.pkl) of the options it was
    saved with; resuming needs the same options."""
    saved = len(list(checkpoint.glob("custom_checkpoint_*.pkl")))
    if saved != len(flags):
        raise SkingenError(
            f"--resume_from_checkpoint {checkpoint}: it holds {saved} option state(s) (EMA, UNet LoRA) but this run "
            f"has {len(flags)} ({', '.join(flags) or 'neither --use_ema nor --unet_lora_rank'}); resume with the "
            "options it was saved with"
        )


def _make_optimizer(args, params, learning_rate: float):
    if getattr(args, "use_adafactor", False):  # FLUX trainer's option, as diffusers configures it
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=learning_rate, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=args.adam_weight_decay)
    if args.use_8bit_adam:
        import bitsandbytes

        optimizer_class = bitsandbytes.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(params, lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                           weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
