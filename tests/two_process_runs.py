"""Run several scripts one after another in the same launched processes (tests start one
``torch.distributed.run`` for all backbones instead of one each: the imports dominate a tiny run).

    python -m torch.distributed.run --nproc_per_node 2 tests/two_process_runs.py RUNS.json

RUNS.json: a list of ``[script path relative to the repository, [argv...]]``, or ``[script, [argv...], options]``
for the sharded stages (skingen.sharding), where options may hold ``"count_dir"``: each process writes the keys
of the rows it finished to ``<count_dir>/rank<N>.json``; ``"exit_after_parts"``: each process dies (``os._exit``,
as a kill would leave it: no cleanup, no merge) right after writing that many part files.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from repo_scripts import load_script


def watch_parts(options: dict) -> None:
    """Record (and optionally stop after) the part files this process writes."""
    from skingen import sharding

    write = sharding.Parts.write
    written: list[list[str]] = []  # the keys of each part file this process wrote
    rank = os.environ.get("RANK", "0")

    def watched_write(self, first_index, entries):
        path = write(self, first_index, entries)
        written.append([entry.key for entry in entries])
        if "count_dir" in options:
            Path(options["count_dir"]).mkdir(parents=True, exist_ok=True)
            (Path(options["count_dir"]) / f"rank{rank}.json").write_text(json.dumps(written))
        if len(written) == options.get("exit_after_parts"):
            os._exit(3)
        return path

    sharding.Parts.write = watched_write


def main(runs_file: str) -> None:
    import torch.distributed
    from accelerate.state import AcceleratorState, GradientState, PartialState

    with open(runs_file, encoding="utf-8") as handle:
        runs = json.load(handle)
    # Each run ends its accelerator, which would tear down the process group the next run needs: keep it.
    PartialState.destroy_process_group = lambda self, group=None: None
    from skingen import sharding

    unwatched_write = sharding.Parts.write
    for script, argv, *options in runs:
        sharding.Parts.write = unwatched_write
        if options:
            watch_parts(options[0])
        load_script(script).main(argv)
        AcceleratorState._reset_state()  # a fresh accelerate state for the next run, in the same process group
        GradientState._reset_state()
    if torch.distributed.is_initialized():  # one process (--nproc_per_node 1) starts no group
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
