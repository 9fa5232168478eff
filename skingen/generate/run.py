"""A generation run: every pending job in batches of same-size images, each batch saved at once (images,
``results.jsonl``), then the finished rows' grids and, with ``--split_elements``, their skin packages."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .. import sharding
from ..errors import SkingenError
from ..fileio import atomic_save_image
from ..skins.atlas import split_atlas
from ..skins.layout import Layout, load_layout
from . import pipeline
from .jobs import ImageJob, SamplingSettings, load_control_image
from .results import GRIDS_DIR, ResultsLog, file_stem, job_record, make_grid


@dataclass
class RunSummary:
    generated: int = 0
    skipped: int = 0
    grids: int = 0
    packages: int = 0


def generate_all(
    get_pipeline: Callable[[], Any],
    jobs: Sequence[ImageJob],
    settings: SamplingSettings,
    settings_record: dict,
    results: ResultsLog,
    *,
    batch_size: int = 4,
    split_layout: str | os.PathLike | None = None,
) -> RunSummary:
    """Generate every pending job in batches of same-size images, the rows split over the launched processes
    (skingen.sharding); after each batch save the images, keep their records in a part file and finish the rows
    whose images are all there (grid, and skin packages with ``split_layout``). The main process merges the parts
    into ``results.jsonl`` at the end (and on Ctrl-C): the records already there in their order, then the new ones
    in job order, whatever the number of processes.

    ``get_pipeline()`` (e.g. loading the models) is called once, and only when something is left to generate.
    """

    if batch_size < 1:
        raise SkingenError(f"--batch_size must be at least 1, got {batch_size}")
    shard = sharding.shard_for(results.output_dir, "inference", settings_record)
    shard.group.on_main(lambda: (results.remove_leftovers(), shard.parts.prepare(overwrite=results.overwrite)))
    listed = dict(results.records)  # results.jsonl as it was: the merge keeps its order
    for entry in shard.parts.read().values():
        results.add(entry.fields)
    todo = results.pending(jobs, settings_record)
    summary = RunSummary(skipped=len(jobs) - len(todo))
    layouts = _split_layouts(split_layout, jobs) if split_layout is not None else {}
    finisher = _RowFinisher(jobs, results, layouts, summary)
    row_position = {row_id: i for i, row_id in enumerate(finisher.row_ids())}
    block = max(1, batch_size // max((len(row_jobs) for row_jobs in finisher.jobs_of_row.values()), default=1))
    job_index = {job.output: i for i, job in enumerate(jobs)}

    # Stable sort by size: a batch never mixes sizes, and same-size rows keep their order.
    batches: list[list[tuple[int, ImageJob]]] = []
    mine = [job for job in todo if shard.owns(row_position[job.row.row_id], block)]
    for job in sorted(mine, key=lambda job: (job.height, job.width)):
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and (last[0][1].height, last[0][1].width) == (job.height, job.width):
            last.append((job_index[job.output], job))
        else:
            batches.append([(job_index[job.output], job)])

    model = None

    def generate(batch: list[ImageJob]) -> list[sharding.Entry]:
        nonlocal model
        if model is None:
            model = get_pipeline()
        images = pipeline.generate_batch(model, batch, settings)
        for job, image in zip(batch, images):
            atomic_save_image(image, results.output_dir / job.output)
            results.add(job_record(job, settings_record))
            finisher.fresh.add(job.output)
        summary.generated += len(batch)
        finisher.finish({job.row.row_id for job in batch})
        return [sharding.Entry(job.output, results.records[job.output]) for job in batch]

    def merge(entries: dict[str, sharding.Entry]) -> None:
        merged = dict(listed)
        for job in jobs:
            if job.output in entries:
                merged[job.output] = entries[job.output].fields
        for job in jobs if layouts else []:
            if job.output in merged and (results.output_dir / job.package).is_dir():
                merged[job.output]["package"] = job.package
        results.records = merged
        results.save()

    try:
        shard.run([], generate, batch_size=batch_size, desc="generating", batches=batches)
    except KeyboardInterrupt:
        shard.merge_on_interrupt(merge)
        raise
    # Rows finished by an earlier run may still lack their grid or packages (e.g. --split_elements added now).
    finisher.finish([row_id for row_id, position in row_position.items() if shard.owns(position, block)])
    shard.finish(merge)
    totals = shard.group.all_gather((summary.generated, summary.grids, summary.packages))
    summary.generated, summary.grids, summary.packages = (sum(values) for values in zip(*totals))
    return summary


def _split_layouts(split_layout: str | os.PathLike, jobs: Sequence[ImageJob]) -> dict[tuple[int, int], Layout]:
    """The layout to cut each output size with, checked before anything is generated.

    An output size the spec has no variant for (e.g. 128 px from a small model) is cut with the
    spec's first variant after resizing, so the packages always have the layout's native sizes.
    """
    layouts = {}
    for width, height in sorted({(job.width, job.height) for job in jobs}):
        layout = load_layout(split_layout)
        if width in layout.resolutions:
            layout = load_layout(split_layout, resolution=width)
        if layout.width * height != layout.height * width:
            raise SkingenError(
                f"--split_elements {split_layout}: layout '{layout.name}' is {layout.width}x{layout.height}, "
                f"but images are generated at {width}x{height} (another aspect ratio); "
                f"set --height and --width in the proportion {layout.width}:{layout.height}"
            )
        layouts[(width, height)] = layout
    return layouts


class _RowFinisher:
    """Writes a row's grid, and its images' skin packages, once all of the row's images exist."""

    def __init__(self, jobs: Sequence[ImageJob], results: ResultsLog, layouts: dict, summary: RunSummary):
        self.results = results
        self.layouts = layouts
        self.summary = summary
        self.fresh: set[str] = set()  # outputs generated by this run
        self.finished: set[str] = set()  # rows whose grid and packages this run has written
        self.jobs_of_row: dict[str, list[ImageJob]] = {}
        for job in jobs:
            self.jobs_of_row.setdefault(job.row.row_id, []).append(job)

    def row_ids(self) -> list[str]:
        return list(self.jobs_of_row)

    def finish(self, row_ids) -> None:
        output_dir = self.results.output_dir
        for row_id in row_ids:
            row_jobs = self.jobs_of_row[row_id]
            if row_id in self.finished or not all((output_dir / job.output).is_file() for job in row_jobs):
                continue
            self.finished.add(row_id)
            images = {}
            grid_path = output_dir / GRIDS_DIR / f"{file_stem(row_id)}.png"
            if any(job.output in self.fresh for job in row_jobs) or not grid_path.is_file():
                images = {job.output: _open_output(output_dir / job.output) for job in row_jobs}
                controls = [load_control_image(path) for path in row_jobs[0].row.control_images]
                atomic_save_image(make_grid(controls, list(images.values())), grid_path)
                self.summary.grids += 1
            for job in row_jobs if self.layouts else []:
                package_dir = output_dir / job.package
                if job.output in self.fresh or not package_dir.is_dir():
                    image = images.get(job.output) or _open_output(output_dir / job.output)
                    layout = self.layouts[(job.width, job.height)]
                    if image.size != layout.size:
                        image = image.resize(layout.size, Image.Resampling.LANCZOS)
                    split_atlas(image, layout, package_dir)
                    self.summary.packages += 1


def _open_output(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")
