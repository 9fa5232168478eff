"""Launching tests' runs in several processes with torch.distributed.run (CPU, offline, one thread each)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from repo_scripts import REPO

LAUNCH_ENV = {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "ACCELERATE_USE_CPU": "1",
              "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def launch(runs: list, tmp_path: Path, processes: int = 2, name: str = "runs") -> subprocess.CompletedProcess:
    """Run ``[script, argv(, options)]`` entries in ``processes`` processes started by torch.distributed.run."""
    runs_file = tmp_path / f"{name}.json"
    runs_file.write_text(json.dumps(runs), encoding="utf-8")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               str(REPO / "tests" / "two_process_runs.py"), str(runs_file)]  # fmt: skip
    return subprocess.run(command, env={**os.environ, **LAUNCH_ENV}, cwd=REPO, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def launch_script(script: str, argv: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    """The script itself under torch.distributed.run (its run_cli prints the error lines)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               str(REPO / script), *argv]  # fmt: skip
    return subprocess.run(command, env={**os.environ, **LAUNCH_ENV}, cwd=REPO, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
