"""``--config file.yaml``: any flag of a script can be set from a YAML file; the command line wins."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import yaml

from .errors import SkingenError


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=str,
        default=None,
        help="YAML file whose keys are flag names (with or without leading dashes); flags given on the command line override it.",
    )


def parse_args_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; values from ``--config`` become defaults, so explicit flags still override them."""
    if not any(action.dest == "config" for action in parser._actions):
        add_config_argument(parser)
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**load_config_defaults(parser, pre.config))
    return parser.parse_args(argv)


def load_config_defaults(parser: argparse.ArgumentParser, config_path: str) -> dict:
    path = Path(config_path)
    if not path.is_file():
        raise SkingenError(f"--config {path}: file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise SkingenError(f"{where}: invalid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise SkingenError(f"{path}: expected a mapping of flag names to values, got {type(data).__name__}")
    known = {action.dest: action for action in parser._actions}
    defaults = {}
    for key, value in data.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in known or dest in ("help", "config"):
            close = sorted(k for k in known if k.split("_")[0] == dest.split("_")[0])[:5]
            hint = f" (did you mean: {', '.join(close)}?)" if close else ""
            raise SkingenError(f"{path}: unknown setting '{key}'{hint}; run the script with --help for the flags")
        action = known[dest]
        if value is not None and action.type is not None and not isinstance(value, (list, bool)):
            try:
                value = action.type(value)
            except (TypeError, ValueError) as err:
                raise SkingenError(f"{path}: setting '{key}': {err}") from None
        if action.choices is not None and value is not None and value not in action.choices:
            raise SkingenError(f"{path}: setting '{key}' must be one of {list(action.choices)}, got {value!r}")
        defaults[dest] = value
    return defaults
