"""Training checkpoints: atomic ``checkpoint-N`` folders, retention, resuming, and the final weights of the trained
model (a ControlNet, or the denoiser itself when the loop trains a base model).

A checkpoint is written by ``accelerator.save_state`` into a temporary folder that is renamed to
``checkpoint-N`` only once every process has finished writing, so a kill during a save leaves the previous
checkpoints untouched and never a half-written one under a final name. Layout (as diffusers' trainer, so
``checkpoint-N/controlnet`` loads with ``ControlNetModel.from_pretrained``):

    checkpoint-N/controlnet/{config.json, diffusion_pytorch_model.safetensors}   (unet/ or transformer/ when the
                                                                                 denoiser itself is trained)
    checkpoint-N/optimizer.bin, scheduler.bin, random_states_<rank>.pkl, [scaler.pt]
    checkpoint-N/training_state.json     (ours: global step, seed, data order, non-finite step counts)
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from ..errors import SkingenError
from ..fileio import AtomicDirectory, atomic_write_json, fsync_path

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "training_state.json"
CONTROLNET_SUBFOLDER = "controlnet"
TRAINED_SUBFOLDERS = (CONTROLNET_SUBFOLDER, "unet", "transformer")  # a ControlNet, or the denoiser itself
_CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every checkpoint in ``output_dir``, oldest first.

    Temporary folders of interrupted saves start with a dot and never match.
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _CHECKPOINT_NAME.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def recover_interrupted_saves(output_dir: str | os.PathLike) -> None:
    """Tidy what a kill during a save left behind (main process only, before training starts).

    A ``.checkpoint-N.old`` folder whose ``checkpoint-N`` is missing is the one complete copy of a checkpoint
    that was being replaced: rename it back. Any other ``.checkpoint-*`` folder is an unfinished save.
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.is_dir() and path.name.startswith(".final-weights."):
            shutil.rmtree(path, ignore_errors=True)  # an interrupted final save; the weights are written again
        if not (path.is_dir() and path.name.startswith(f".{CHECKPOINT_PREFIX}")):
            continue
        final = folder / path.name[1:].split(".")[0]
        if path.name.endswith(".old") and not final.exists():
            os.replace(path, final)
        else:
            shutil.rmtree(path, ignore_errors=True)


def register_controlnet_hooks(accelerator, subfolder: str = CONTROLNET_SUBFOLDER) -> None:
    """Make ``save_state``/``load_state`` store the trained model in diffusers format under ``subfolder``
    (``controlnet/``; the denoiser's own folder name, ``unet/`` or ``transformer/``, when it is the trained model)."""
    from accelerate.utils import DistributedType

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                accelerator.unwrap_model(model).save_pretrained(Path(output_dir) / subfolder)
        weights.clear()  # saved above; accelerate would otherwise write a second copy

    def load_hook(models, input_dir):
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            return  # DeepSpeed restores its own engine checkpoint
        while models:
            model = accelerator.unwrap_model(models.pop())
            loaded = type(model).from_pretrained(input_dir, subfolder=subfolder)  # any backbone's class
            model.load_state_dict(loaded.state_dict())

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def prune_checkpoints(output_dir: str | os.PathLike, total_limit: int | None) -> list[Path]:
    """Delete the oldest checkpoints beyond ``total_limit`` (called after a new one is complete)."""
    if total_limit is None:
        return []
    checkpoints = list_checkpoints(output_dir)
    removed = [path for _, path in checkpoints[: max(0, len(checkpoints) - total_limit)]]
    for path in removed:
        shutil.rmtree(path)
    return removed


def save_checkpoint(accelerator, output_dir: str | os.PathLike, step: int, state: dict, total_limit: int | None) -> Path:
    """Write ``output_dir/checkpoint-<step>`` atomically from all processes; every process must call this."""
    from accelerate.utils import broadcast_object_list

    final = Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"
    # The main process picks the temporary folder; the others write their RNG states into the same one.
    # A failed save (full disk, read-only folder) removes the temporary folder: the previous checkpoints stay
    # and no folder that `--resume_from_checkpoint latest` would pick is left behind.
    try:
        building = AtomicDirectory(final) if accelerator.is_main_process else contextlib.nullcontext(None)
        with building as tmp:
            tmp = broadcast_object_list([str(tmp) if tmp is not None else None])[0]
            accelerator.save_state(tmp)
            if accelerator.is_main_process:
                atomic_write_json(Path(tmp) / STATE_FILE, state)
            accelerator.wait_for_everyone()
    except Exception as err:
        reason = write_failure(err)
        if reason is None:
            raise
        raise SkingenError(
            f"{final}: the checkpoint could not be written: {reason}; previous checkpoints are kept. Free some "
            "space or choose another --output_dir, then rerun with --resume_from_checkpoint latest"
        ) from None
    if accelerator.is_main_process:
        prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def write_failure(err: Exception) -> str | None:
    """What a failed write of a checkpoint's files says, or None for an error that is not a failed write.

    The writers report a full disk in three forms: an ``OSError`` (ENOSPC), torch.save's stream writer as a
    ``RuntimeError`` ("file write failed"), and the safetensors writer as a ``SafetensorError`` ("No space left on
    device", "StorageFull")."""
    from safetensors import SafetensorError

    text = str(err)
    if (isinstance(err, OSError) and err.errno == errno.ENOSPC) or "No space left on device" in text \
            or "StorageFull" in text:
        return "no space left on device"
    if isinstance(err, OSError):
        return err.strerror or text
    if isinstance(err, SafetensorError) or (isinstance(err, RuntimeError) and "write" in text.lower()):
        return text.strip().splitlines()[-1] if text.strip() else type(err).__name__
    return None


def resolve_resume_checkpoint(output_dir: str | os.PathLike, resume_from: str | None,
                              subfolder: str = CONTROLNET_SUBFOLDER) -> Path | None:
    """The folder ``--resume_from_checkpoint`` names: ``latest`` (None when there is none yet) or a path; the
    checkpoint must hold the trained model's ``subfolder``.

    A path may be given as is or relative to ``output_dir`` (diffusers accepts the bare ``checkpoint-N``).
    """
    if not resume_from:
        return None
    if resume_from == "latest":
        checkpoints = list_checkpoints(output_dir)
        if checkpoints:
            require_safe_loading()
        other_models = [name for name in TRAINED_SUBFOLDERS if name != subfolder]
        if checkpoints and not (checkpoints[-1][1] / subfolder).is_dir() and \
                any((checkpoints[-1][1] / name).is_dir() for name in other_models):
            raise SkingenError(f"--resume_from_checkpoint latest: {checkpoints[-1][1]} holds no {subfolder}/ (it was "
                               "saved by a run that trained another model); choose another --output_dir")
        return checkpoints[-1][1] if checkpoints else None
    for candidate in (Path(resume_from), Path(output_dir) / resume_from):
        if candidate.is_dir():
            if not _CHECKPOINT_NAME.fullmatch(candidate.name) or not (candidate / subfolder).is_dir():
                raise SkingenError(
                    f"--resume_from_checkpoint {resume_from}: {candidate} is not a training checkpoint of this run's "
                    f"model (expected a folder named checkpoint-N holding {subfolder}/ and optimizer state)"
                )
            require_safe_loading()
            return candidate
    available = ", ".join(path.name for _, path in list_checkpoints(output_dir)) or "none"
    raise SkingenError(
        f"--resume_from_checkpoint {resume_from}: no such checkpoint folder (checkpoints in {output_dir}: {available}); "
        "pass 'latest' or an existing checkpoint-N folder"
    )


def require_safe_loading() -> None:
    """Refuse to resume where a checkpoint's optimizer/scheduler state cannot be loaded with
    ``torch.load(weights_only=True)`` (torch < 2.4, where accelerate falls back to full unpickling, which can
    run arbitrary code). torch's own version says so; no private helper of a dependency is needed."""
    import torch
    from packaging.version import Version

    if Version(torch.__version__.split("+")[0]) < Version("2.4"):
        raise SkingenError(
            f"--resume_from_checkpoint: torch {torch.__version__} cannot load checkpoints safely (weights_only needs "
            "torch >= 2.4); upgrade torch (`pip install -r requirements.txt`) to resume"
        )


def read_training_state(path: Path) -> dict:
    """The training state saved with a checkpoint (at least ``global_step``).

    Checkpoints from diffusers' own trainer have no state file: the step then comes from the folder name.
    """
    state_file = path / STATE_FILE
    if state_file.is_file():
        return json.loads(state_file.read_text(encoding="utf-8"))
    return {"global_step": int(_CHECKPOINT_NAME.fullmatch(path.name).group(1))}


def save_controlnet_weights(controlnet, output_dir: str | os.PathLike) -> Path:  # any diffusers model
    """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` into ``output_dir`` (atomically per file).

    The weights are moved into place before the config, so a folder whose config.json is present always
    holds the weights that go with it.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix=".final-weights.", dir=output_dir) as tmp:
            controlnet.save_pretrained(tmp, safe_serialization=True)
            for path in sorted(Path(tmp).iterdir(), key=lambda p: p.name == "config.json"):
                fsync_path(path)
                os.replace(path, output_dir / path.name)
            fsync_path(output_dir)
    except Exception as err:
        reason = write_failure(err)
        if reason is None:
            raise
        raise SkingenError(
            f"{output_dir}: the trained weights could not be written: {reason}; the checkpoints and any earlier "
            "weights there are kept. Free some space, then rerun with --resume_from_checkpoint latest"
        ) from None
    return output_dir
