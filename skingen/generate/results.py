"""An inference output folder: ``results.jsonl`` (one record per image, written here and read back by
evaluation through :func:`read_results`), the settings that decide the pixels, grids.

A rerun skips every image already listed whose file exists; an image listed with other inputs is an error.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import SkingenError
from ..fileio import read_jsonl, remove_stale_temp_files, write_jsonl
from .jobs import ImageJob, SamplingSettings, file_stem
from .pipeline import per_controlnet

RESULTS_FILE = "results.jsonl"
GRIDS_DIR = "grids"
# Keys of a results record that must match for an existing image to count as this run's image.
_RESUME_KEYS = ("prompt", "negative_prompt", "seed", "conditioning_images", "height", "width", "settings")


def read_results(output_dir: str | os.PathLike) -> list[tuple[str, dict]]:
    """``(file:line, record)`` of each image an inference run listed in ``output_dir/results.jsonl``."""
    listing = Path(output_dir) / RESULTS_FILE
    if not listing.is_file():
        raise SkingenError(
            f"{listing}: not found; --results_dir must be an inference.py output folder holding {RESULTS_FILE}"
        )
    return [(f"{listing}:{lineno}", record) for lineno, record in read_jsonl(listing)]


def settings_record(
    *,
    pretrained_model_name_or_path: str | os.PathLike,
    controlnet_model_name_or_path: Sequence[str | os.PathLike],
    vae_model_name_or_path: str | os.PathLike | None,
    variant: str | None,
    scheduler: str,
    dtype: str,
    sampling: SamplingSettings,
    lora: str | os.PathLike | None = None,
) -> dict:
    """What decides the pixels of a run (not how fast it runs), as stored with every results record."""
    count = len(controlnet_model_name_or_path)
    return {
        **({} if lora is None else {"lora": _model_id(lora)}),
        "pretrained_model_name_or_path": _model_id(pretrained_model_name_or_path),
        "controlnet": [_model_id(path) for path in controlnet_model_name_or_path],
        "vae": None if vae_model_name_or_path is None else _model_id(vae_model_name_or_path),
        "variant": variant,
        "scheduler": scheduler,
        "dtype": dtype,
        "num_inference_steps": sampling.num_inference_steps,
        "guidance_scale": float(sampling.guidance_scale),
        "negative_prompt": sampling.negative_prompt,
        "controlnet_conditioning_scale": [
            float(v)
            for v in per_controlnet(sampling.controlnet_conditioning_scale, count, "--controlnet_conditioning_scale")
        ],
        "control_guidance_start": [
            float(v) for v in per_controlnet(sampling.control_guidance_start, count, "--control_guidance_start")
        ],
        "control_guidance_end": [
            float(v) for v in per_controlnet(sampling.control_guidance_end, count, "--control_guidance_end")
        ],
    }


def _model_id(name_or_path: str | os.PathLike) -> str:
    """A local model folder as an absolute path (so reruns from another folder match); a hub id as given."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else str(name_or_path)


def job_record(job: ImageJob, settings_record: dict) -> dict:
    """The ``results.jsonl`` line of one image. ``output`` is relative to the output folder; control paths are absolute.

    ``box`` is given in the generated image's pixels (scaled from the row's image), with ``box_size`` = its (w, h).
    """
    row = job.row
    record = {
        "row_id": row.row_id,
        "prompt": row.prompt,
        "negative_prompt": settings_record.get("negative_prompt"),
        "seed": job.seed,
        "conditioning_image": row.control_images[0],
        "conditioning_images": list(row.control_images),
        "output": job.output,
        "grid": f"{GRIDS_DIR}/{file_stem(row.row_id)}.png",
        "height": job.height,
        "width": job.width,
        "settings": settings_record,
    }
    if row.reference_image is not None:
        record["reference_image"] = row.reference_image
    if row.box:
        src_w, src_h = row.box_size
        sx, sy = job.width / src_w, job.height / src_h
        record["box"] = [[[round(x * sx, 2), round(y * sy, 2)] for x, y in quad] for quad in row.box]
        record["box_size"] = [job.width, job.height]
        record["texts"] = list(row.texts or [])
    return record


class ResultsLog:
    """``results.jsonl`` of an output folder: one record per generated image, keyed by its ``output`` path."""

    def __init__(self, output_dir: str | os.PathLike, *, overwrite: bool = False):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / RESULTS_FILE
        self.overwrite = overwrite
        self.records: dict[str, dict] = {}
        self.lines: dict[str, int] = {}
        if self.path.is_file() and not overwrite:
            for lineno, record in read_jsonl(self.path):
                if not isinstance(record.get("output"), str):
                    raise SkingenError(f"{self.path}:{lineno}: record has no 'output' path; fix or delete the line")
                self.records[record["output"]] = record
                self.lines[record["output"]] = lineno

    def pending(self, jobs: Sequence[ImageJob], settings_record: dict) -> list[ImageJob]:
        """Jobs still to generate: not listed yet, or listed with a missing image file.

        A listed image made from other inputs (prompt, seed, control, size or settings) is an error, so earlier
        results are never silently replaced or mixed with new ones.
        """
        todo = []
        for job in jobs:
            old = self.records.get(job.output)
            if old is None or not (self.output_dir / job.output).is_file():
                todo.append(job)
                continue
            difference = _first_difference(old, job_record(job, settings_record))
            if difference is not None:
                key, was, now = difference
                raise SkingenError(
                    f"{self.path}:{self.lines[job.output]}: {job.output} was made with {key} {_short(was)}, "
                    f"this run asks for {_short(now)}; pass --overwrite to regenerate, or choose another --output_dir"
                )
        return todo

    def remove_leftovers(self) -> None:
        """Temp files of a killed run (images, grids, results.jsonl): by the main process, before any image."""
        remove_stale_temp_files(self.output_dir, recursive=True)

    def add(self, record: dict) -> None:
        self.records[record["output"]] = record

    def save(self) -> None:
        write_jsonl(self.path, self.records.values())


def _first_difference(old: dict, new: dict) -> tuple[str, Any, Any] | None:
    """The first input that differs between an existing record and this run's record of the same image."""
    for key in _RESUME_KEYS:
        was, now = old.get(key), new.get(key)
        if key == "settings" and isinstance(was, dict) and isinstance(now, dict):
            for name in dict.fromkeys([*now, *was]):
                if was.get(name) != now.get(name):
                    return f"--{name}", was.get(name), now.get(name)
        elif was != now:
            return key, was, now
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def make_grid(controls: Sequence[Image.Image], images: Sequence[Image.Image]) -> Image.Image:
    """One row: the control image(s), then the generated images, all scaled to the first image's height."""
    height = images[0].height
    tiles = [tile.convert("RGB") for tile in [*controls, *images]]
    tiles = [
        tile if tile.height == height else tile.resize((max(1, round(tile.width * height / tile.height)), height))
        for tile in tiles
    ]
    grid = Image.new("RGB", (sum(tile.width for tile in tiles), height), (255, 255, 255))
    x = 0
    for tile in tiles:
        grid.paste(tile, (x, 0))
        x += tile.width
    return grid
