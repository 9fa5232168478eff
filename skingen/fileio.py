"""Atomic writes and line-numbered JSONL reading: outputs are never left half-written, inputs never overwritten."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import SkingenError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_path_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    # mkstemp makes owner-only files; outputs should be readable like any other file (shared clusters).
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    return Path(tmp)


TEMP_SUFFIX = ".tmp"


def _naming(path: Path, err: OSError) -> OSError:
    """The OSError of a write, naming the path the user knows: the one it names (e.g. a parent folder that is a
    file), else the file asked for (not our temp file, or nothing at all as a failed write or fsync does)."""
    named = err.filename is not None and not os.fsdecode(err.filename).endswith(TEMP_SUFFIX)
    if err.errno is None or named:
        return err
    return OSError(err.errno, err.strerror or str(err), str(path))


def _reraise_naming(path: Path, err: OSError) -> None:
    named = _naming(path, err)
    if named is err:
        raise err
    raise named from err


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or folder's data and metadata to the disk (folders: the names they hold)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temp file beside ``path`` and rename it into place."""
    path = Path(path)
    tmp = None
    try:
        tmp = _temp_path_beside(path)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        _reraise_naming(path, err)
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=indent) + "\n")


def atomic_save_image(image, path: str | os.PathLike, **save_kwargs) -> Path:
    """Save a PIL image atomically; the format comes from the file suffix."""
    path = Path(path)
    tmp = None
    try:
        tmp = _temp_path_beside(path)
        fmt = (path.suffix.lstrip(".") or "png").upper()
        image.save(tmp, format="JPEG" if fmt == "JPG" else fmt, **save_kwargs)
        fsync_path(tmp)
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        _reraise_naming(path, err)
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    return path


def remove_stale_temp_files(folder: str | os.PathLike, recursive: bool = False) -> int:
    """Delete the temp files (``.<name>.<random>.tmp``) that writes killed midway left in ``folder``; how many.

    Call it at the start of a stage, before anything of this run is being written there."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    pattern = f".*{TEMP_SUFFIX}"
    stale = [p for p in (folder.rglob(pattern) if recursive else folder.glob(pattern)) if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict | None, str | None]]:
    """Yield ``(line_number, object, problem)`` per non-blank line; a bad line is reported and reading goes on."""
    path = Path(path)
    if not path.is_file():
        raise SkingenError(f"{path}: file not found")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                yield lineno, None, f"invalid JSON ({err.msg} at column {err.colno}); each line must be one JSON object"
                continue
            if not isinstance(obj, dict):
                yield lineno, None, f"expected a JSON object, got {type(obj).__name__}"
                continue
            yield lineno, obj, None


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-blank line; the first bad line stops with its file and line."""
    for lineno, obj, problem in iter_jsonl(path):
        if problem is not None:
            raise SkingenError(f"{path}:{lineno}: {problem}")
        yield lineno, obj


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """Write rows as JSONL atomically (UTF-8, non-ASCII kept readable)."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return atomic_write_text(path, text)


class AtomicDirectory:
    """Build a directory under a temp name and rename it into place on success.

    Used for checkpoints and skin packages: a kill mid-write leaves the previous
    version (or nothing) and never a half-written folder under the final name. Every file and folder
    is fsynced before the rename that publishes it, and the parent after it, so a power loss right
    after the rename cannot leave a complete-looking folder of empty files.
    """

    def __init__(self, final_path: str | os.PathLike):
        self.final_path = Path(final_path)
        try:
            self.final_path.parent.mkdir(parents=True, exist_ok=True)
            self.tmp_path = Path(tempfile.mkdtemp(prefix=f".{self.final_path.name}.", dir=self.final_path.parent))
            os.chmod(self.tmp_path, 0o777 & ~_umask())
        except OSError as err:
            _reraise_naming(self.final_path, err)

    def __enter__(self) -> Path:
        return self.tmp_path

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp_path, ignore_errors=True)
            return
        try:
            self._publish()
        except OSError as err:
            shutil.rmtree(self.tmp_path, ignore_errors=True)
            _reraise_naming(self.final_path, err)

    def _publish(self) -> None:
        for folder, _, files in os.walk(self.tmp_path, topdown=False):
            for name in files:
                fsync_path(os.path.join(folder, name))
            fsync_path(folder)
        if self.final_path.exists():
            # Move the old version aside first so a crash between the two renames keeps one complete copy.
            old = self.final_path.with_name(f".{self.final_path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.final_path, old)
            os.replace(self.tmp_path, self.final_path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp_path, self.final_path)
        fsync_path(self.final_path.parent)
