"""Run several trainer scripts one after another in the same launched processes (tests start one
``torch.distributed.run`` for all backbones instead of one each: the imports dominate a tiny run).

    python -m torch.distributed.run --nproc_per_node 2 tests/two_process_runs.py RUNS.json

RUNS.json: a list of ``[script path relative to the repository, [argv...]]``.
"""

from __future__ import annotations

import json
import sys

from repo_scripts import load_script


def main(runs_file: str) -> None:
    import torch.distributed
    from accelerate.state import AcceleratorState, GradientState, PartialState

    with open(runs_file, encoding="utf-8") as handle:
        runs = json.load(handle)
    # Each run ends its accelerator, which would tear down the process group the next run needs: keep it.
    PartialState.destroy_process_group = lambda self, group=None: None
    for script, argv in runs:
        load_script(script).main(argv)
        AcceleratorState._reset_state()  # a fresh accelerate state for the next run, in the same process group
        GradientState._reset_state()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
