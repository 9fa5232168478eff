"""The repository's stand-alone scripts as modules, and the trainer flags of the tiny training tests.

A plain module, not a test file: tests import it as ``from repo_scripts import ...`` (pytest puts the
tests folder on sys.path, as it has no __init__.py).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent


def load_script(relative_path: str) -> ModuleType:
    """Import a script of the repository (e.g. ``"scripts/make_fill50k.py"``) as a fresh module."""
    path = REPO / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_training_argv(tiny_sdxl_dir, dataset, output_dir, *extra) -> list[str]:
    """Trainer flags for a short 64 px run on the tiny pipeline, then ``extra``."""
    return [
        "--pretrained_model_name_or_path", str(tiny_sdxl_dir), "--train_data_dir", str(dataset),
        "--output_dir", str(output_dir), "--resolution", "64", "--train_batch_size", "2", "--learning_rate", "1e-3",
        "--lr_warmup_steps", "0", "--seed", "0", "--report_to", "none", *map(str, extra),
    ]
