"""User-facing errors and the command-line wrapper that reports them without a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence


class SkingenError(Exception):
    """A mistake in the user's input. The message names the file (and line), what is wrong and how to fix it."""


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run a script's ``main``; user mistakes print ``error: ...`` and exit with status 2, no traceback."""
    try:
        result = main(argv)
    except SkingenError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; finished outputs are kept and a rerun resumes where this one stopped", file=sys.stderr)
        sys.exit(130)
    if isinstance(result, int) and result != 0:
        sys.exit(result)
