"""One stage's rows over many processes, one result: what the preparation, generation and evaluation stages
share when they are launched like the trainer (``accelerate launch``, ``torchrun``, Slurm ``srun``) or run as
a Slurm job array (``--num_shards`` / ``--shard_index``), and the worker pool behind ``--num_workers``.

- Which rows a process owns: row ``i`` (its place in the stage's input) goes to shard
  ``(i // block) % shards``; blocks keep a batch's rows together and the owner of a row never depends on
  which rows are done, so job-array tasks running at once never share a row.
- Finished rows go to part files (``<folder>/.parts/<stage>/part-<first row>.jsonl``), each written
  atomically, keyed by the row: a rerun, with any number of processes, reads them and does only the rest.
- The main process merges the parts into the stage's usual files in the original row order and removes
  them, so the files are the same bytes whatever the number of processes. Outputs that depend on a row
  only (its seed, its image) make this possible; the stages keep them so.
- Processes advance in lock step, one batch each per step: after each step they exchange how many rows
  they finished (the main process's bar shows the whole job) and any error; an error in any process
  stops every process with the same ``error:`` line (the one of the lowest row).
"""

from __future__ import annotations

import atexit
import json
import multiprocessing
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .errors import SkingenError, describe_os_error
from .fileio import atomic_write_json, atomic_write_text, read_jsonl

PARTS_DIR = ".parts"
SETTINGS_FILE = "settings.json"


# ---------------------------------------------------------------------------------------------------------------
# The launched processes


def _slurm_to_torch_env() -> None:
    """``srun python script.py`` starts one task per process and sets only Slurm's variables: name them as
    torchrun does (RANK, WORLD_SIZE, LOCAL_RANK) so accelerate sees the same launch. The address of the main
    process comes from MASTER_ADDR, which the job script exports (scripts/slurm/*.sbatch)."""
    if "WORLD_SIZE" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) < 2 or "SLURM_PROCID" not in os.environ:
        return
    if "MASTER_ADDR" not in os.environ:
        raise SkingenError(
            "launched by srun with several tasks but MASTER_ADDR is not set; export MASTER_ADDR (the first node, e.g. "
            "$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1)) and MASTER_PORT before srun"
        )
    os.environ.update(
        RANK=os.environ["SLURM_PROCID"],
        WORLD_SIZE=os.environ["SLURM_NTASKS"],
        LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"),
    )
    os.environ.setdefault("MASTER_PORT", "29500")


class ProcessGroup:
    """The processes of this launch (one when the script is started plainly): rank, count, device, collectives.

    A plain start needs no torch.distributed; a launched one uses accelerate's ``PartialState`` (gloo on CPUs,
    NCCL on GPUs), as the trainer does."""

    def __init__(self):
        _slurm_to_torch_env()
        self.state = None
        self.rank, self.size, self.device = 0, 1, None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch
            from accelerate import PartialState
            from accelerate.utils import parse_flag_from_env

            # On CPUs (`accelerate launch --cpu`, or no GPU at all) the processes talk over gloo.
            self.state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())
            self.rank, self.size, self.device = self.state.process_index, self.state.num_processes, self.state.device
            atexit.register(_close_process_group)  # a process leaving gloo's group open aborts at exit

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def all_gather(self, obj: Any) -> list:
        """Every process's ``obj``, in rank order (pickled: small objects only)."""
        if self.state is None:
            return [obj]
        import torch.distributed as dist

        gathered: list = [None] * self.size
        dist.all_gather_object(gathered, obj)
        return gathered

    def on_main(self, work: Callable[[], Any]) -> Any:
        """Run ``work`` on the main process only (writes others must not race), then wait for it everywhere.
        Its result comes back to every process; its error is raised in every process, as the same line."""
        outcome = [_attempt(work) if self.is_main else None]
        if self.state is not None:
            import torch.distributed as dist

            dist.broadcast_object_list(outcome, src=0)
        result, error = outcome[0]
        if error is not None:
            raise SkingenError(error)
        return result


def _close_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _attempt(work: Callable[[], Any]) -> tuple[Any, str | None]:
    """(result, None), or (None, the error line's message) for a user error or an OS error of the user's paths."""
    try:
        return work(), None
    except SkingenError as err:
        return None, str(err)
    except OSError as err:
        return None, describe_os_error(err)


_GROUP: ProcessGroup | None = None


def process_group() -> ProcessGroup:
    """This launch's processes (set up once per process)."""
    global _GROUP
    if _GROUP is None or (_GROUP.state is not None and not _GROUP.state.initialized):
        _GROUP = ProcessGroup()
    return _GROUP


def add_shard_arguments(parser) -> None:
    """``--num_shards`` / ``--shard_index`` (names of ``datasets.Dataset.shard``) for Slurm job arrays."""
    parser.add_argument(
        "--num_shards", type=int, default=1,
        help="Split the rows into this many shards and do only --shard_index (a Slurm job array: one task per "
        "shard); finished rows are kept as parts, and a run without --num_shards does what is left and merges them.",
    )
    parser.add_argument("--shard_index", type=int, default=0, help="Which shard this run does (0 .. num_shards-1).")


def check_shard_arguments(args) -> None:
    if args.num_shards < 1 or not 0 <= args.shard_index < args.num_shards:
        raise SkingenError(
            f"--shard_index {args.shard_index} --num_shards {args.num_shards}: need num_shards >= 1 and "
            "0 <= shard_index < num_shards (e.g. --shard_index $SLURM_ARRAY_TASK_ID --num_shards $SLURM_ARRAY_TASK_COUNT)"
        )


# ---------------------------------------------------------------------------------------------------------------
# Part files


@dataclass
class Entry:
    """One finished row in a part file: ``fields`` go into the stage's output, ``notes`` only into its counts."""

    key: str
    fields: dict
    notes: dict = field(default_factory=dict)


class Parts:
    """The part files of one stage in ``folder/.parts/<stage>``, valid for one set of ``settings``."""

    def __init__(self, folder: str | os.PathLike, stage: str, settings: dict):
        self.dir = Path(folder) / PARTS_DIR / stage
        self.settings = settings

    def prepare(self, overwrite: bool = False) -> None:
        """Main process, before any work: drop parts made under other settings (or all, with ``overwrite``) and
        the temp files of parts a killed process was writing. Nothing is written when there are no parts."""
        settings_path = self.dir / SETTINGS_FILE
        try:
            recorded = json.loads(settings_path.read_text(encoding="utf-8")) if settings_path.is_file() else None
        except (OSError, json.JSONDecodeError):
            recorded = {}
        if overwrite or (recorded is not None and recorded != self.settings):
            self.clear()
        if self.dir.is_dir():
            for stale in self.dir.glob(".*.tmp"):
                stale.unlink(missing_ok=True)

    def read(self) -> dict[str, Entry]:
        """Every finished row of earlier and current processes, by key."""
        entries: dict[str, Entry] = {}
        for path in sorted(self.dir.glob("part-*.jsonl")) if self.dir.is_dir() else []:
            for _, line in read_jsonl(path):
                entries[line["key"]] = Entry(line["key"], line["fields"], line.get("notes", {}))
        return entries

    def write(self, first_index: int, entries: Sequence[Entry]) -> Path:
        if not (self.dir / SETTINGS_FILE).is_file():
            atomic_write_json(self.dir / SETTINGS_FILE, self.settings)
        path = self.dir / f"part-{first_index:09d}.jsonl"
        lines = (json.dumps({"key": e.key, "fields": e.fields, "notes": e.notes}, ensure_ascii=False) for e in entries)
        return atomic_write_text(path, "".join(line + "\n" for line in lines))

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        parent = self.dir.parent
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()


# ---------------------------------------------------------------------------------------------------------------
# A stage's rows over the processes


@dataclass
class Shard:
    """This process's share of a stage: ``group`` (the launched processes) times the job-array shards."""

    group: ProcessGroup
    parts: Parts
    num_shards: int = 1
    shard_index: int = 0
    done_here: int = 0  # rows this process finished in this run
    parts_here: int = 0

    @property
    def count(self) -> int:
        return self.num_shards * self.group.size

    @property
    def index(self) -> int:
        return self.shard_index * self.group.size + self.group.rank

    @property
    def whole_job(self) -> bool:
        """Whether this run covers every row (no job-array shard), so it may merge the parts."""
        return self.num_shards == 1

    def owns(self, position: int, block: int = 1) -> bool:
        """Whether row ``position`` is this process's (blocks of ``block`` rows go round the processes)."""
        return (position // max(1, block)) % self.count == self.index

    def run(
        self,
        todo: Sequence[tuple[int, Any]],
        work: Callable[[list], list[Entry]],
        *,
        batch_size: int,
        desc: str,
        unit: str = "img",
        batches: list[list[tuple[int, Any]]] | None = None,
    ) -> None:
        """Do this process's rows of ``todo`` (``(position, item)`` pairs in input order) in batches: ``work(items)``
        returns one :class:`Entry` per finished row, written as one part. ``batches`` replaces the default batching
        of the owned rows (e.g. by image size)."""
        if batches is None:
            mine = [pair for pair in todo if self.owns(pair[0], batch_size)]
            batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
        counts = self.group.all_gather((len(batches), sum(len(batch) for batch in batches)))
        total = sum(rows for _, rows in counts)
        with tqdm(total=total, desc=desc, unit=unit, disable=not self.group.is_main or not total) as bar:
            for step in range(max(steps for steps, _ in counts)):
                batch = batches[step] if step < len(batches) else []
                done, error = 0, None
                if batch:
                    entries, error = _attempt(lambda items=[item for _, item in batch]: work(items))
                    if error is None:
                        self.parts.write(batch[0][0], entries)
                        done = len(batch)
                        self.done_here += done
                        self.parts_here += 1
                outcomes = self.group.all_gather((done, None if error is None else (batch[0][0], error)))
                bar.update(sum(n for n, _ in outcomes))
                errors = sorted(failure for _, failure in outcomes if failure is not None)
                if errors:
                    raise SkingenError(errors[0][1])
        if self.group.size > 1 or self.num_shards > 1:
            print(
                f"process {self.index} of {self.count}: {self.done_here} {unit} in {self.parts_here} part file(s) "
                f"under {self.parts.dir}",
                file=sys.stderr,
            )

    def finish(self, merge: Callable[[dict[str, Entry]], Any]) -> Any:
        """After every process's rows: the main process merges the parts (``merge(entries)`` writes the stage's
        files) and removes them; the result comes back to every process. A job-array shard leaves its parts to
        the run without --num_shards."""
        self.group.barrier()
        if not self.whole_job:
            return None

        def merge_and_clear():
            result = merge(self.parts.read())
            self.parts.clear()
            return result

        return self.group.on_main(merge_and_clear)

    def merge_on_interrupt(self, merge: Callable[[dict[str, Entry]], Any]) -> None:
        """Ctrl-C: the main process writes the finished rows into the stage's files right away (the parts stay
        until a run finishes, so nothing is lost if this is cut short too)."""
        if self.group.is_main and self.whole_job:
            merge(self.parts.read())


def shard_for(folder: str | os.PathLike, stage: str, settings: dict, args=None) -> Shard:
    """This process's share of ``stage``, whose parts live under ``folder``; ``args`` may carry --num_shards."""
    return Shard(
        group=process_group(),
        parts=Parts(folder, stage, settings),
        num_shards=getattr(args, "num_shards", 1),
        shard_index=getattr(args, "shard_index", 0),
    )


def sum_notes(entries: Iterable[Entry]) -> dict[str, int]:
    """The numeric notes of finished rows, added up (counts that span processes and reruns)."""
    totals: dict[str, int] = {}
    for entry in entries:
        for name, value in entry.notes.items():
            if isinstance(value, (int, float)):
                totals[name] = totals.get(name, 0) + value
    return totals


# ---------------------------------------------------------------------------------------------------------------
# --num_workers: a process pool for CPU-bound work


_WORKER: tuple[Callable, Any] | None = None  # in a worker process: (function, state)


def _initialize_worker(function: Callable, factory: Callable[..., Any], factory_args: tuple) -> None:
    global _WORKER
    _WORKER = (function, factory(*factory_args))


def _call_worker(item: Any) -> tuple[Any, str | None]:
    function, state = _WORKER
    return _attempt(lambda: function(state, item))


class WorkerPool:
    """``num_workers`` processes, each holding one ``factory(*factory_args)`` (e.g. an OCR engine, built once per
    worker); ``map(items)`` calls ``function(state, item)`` and returns the results in item order, so the output
    is the same as one worker's. One worker runs in this process, with no pool. The workers are forked, so the
    function and the factory's arguments are inherited, never pickled (a script loaded as a module works too)."""

    def __init__(self, num_workers: int, function: Callable[[Any, Any], Any], factory: Callable[..., Any],
                 factory_args: tuple = ()):  # fmt: skip
        if num_workers < 1:
            raise SkingenError(f"--num_workers must be at least 1, got {num_workers}")
        self.pool, self.state = None, None
        self.function, self.factory = function, (factory, factory_args)
        if num_workers > 1:
            self.pool = multiprocessing.get_context("fork").Pool(
                num_workers, initializer=_initialize_worker, initargs=(function, factory, factory_args)
            )

    def map(self, items: Sequence) -> list:
        if self.pool is None:
            if self.state is None:  # built when first needed: a run with nothing to do loads no OCR engine
                self.state = self.factory[0](*self.factory[1])
            return [self.function(self.state, item) for item in items]
        results = []
        for result, error in self.pool.imap(_call_worker, items):
            if error is not None:
                raise SkingenError(error)
            results.append(result)
        return results

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
