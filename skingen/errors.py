"""User-facing errors and the command-line wrapper that reports them without a traceback."""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable, Sequence


class SkingenError(Exception):
    """A mistake in the user's input. The message names the file (and line), what is wrong and how to fix it."""


# What to do about the operating-system errors a user's paths cause (read-only folder, full disk, ...).
_OS_ERROR_FIXES = {
    errno.EACCES: "make the folder writable for this user or choose another path",
    errno.EPERM: "make the folder writable for this user or choose another path",
    errno.EROFS: "write the outputs to a folder on a writable disk",
    errno.ENOSPC: "free some space or write to another disk, then rerun (finished outputs are kept, the rerun resumes)",
    errno.EDQUOT: "free some space or write to another disk, then rerun (finished outputs are kept, the rerun resumes)",
    errno.ENOENT: "check the path and that its parent folders exist",
    errno.ENOTDIR: "a part of this path is a file, not a folder; choose a path whose parents are folders",
    errno.EISDIR: "pass a file, not a folder",
    errno.EEXIST: "remove it or choose another path",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.EMFILE: "raise the open-file limit (ulimit -n) and rerun",
    errno.EIO: "check the disk, then rerun",
}


def describe_os_error(err: OSError) -> str:
    """``<path>: <reason>; <fix>`` for an OSError (without a path when the error names none)."""
    reason = err.strerror or str(err) or type(err).__name__
    fix = _OS_ERROR_FIXES.get(err.errno, "check the path and its permissions, then rerun")
    if err.errno == errno.EEXIST and err.filename is not None and os.path.isfile(err.filename):
        fix = "it is a file where a folder is needed; move it away or choose another path"
    if err.filename is None:
        return f"{reason}; {fix}"
    where = os.fsdecode(err.filename)
    if err.filename2 is not None:
        where += f" -> {os.fsdecode(err.filename2)}"
    return f"{where}: {reason}; {fix}"


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run a script's ``main``; user mistakes and OS errors from the user's paths print ``error: ...`` and exit
    with status 2, no traceback."""
    try:
        result = main(argv)
    except SkingenError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:
        # The reader of stdout went away (`script.py | head -1`): not a fault of the user's paths; the outputs
        # are files, written atomically. Quiet, with the status a shell gives a process killed by SIGPIPE.
        try:  # Python would report the unflushed rest at exit: point stdout at /dev/null first
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        sys.exit(141)
    except OSError as err:
        print(f"error: {describe_os_error(err)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; finished outputs are kept and a rerun resumes where this one stopped", file=sys.stderr)
        sys.exit(130)
    if isinstance(result, int) and result != 0:
        sys.exit(result)


def require(condition: bool, message: str) -> None:
    """Raise ``SkingenError(message)`` unless ``condition`` (flag checks read as a list of requirements)."""
    if not condition:
        raise SkingenError(message)
