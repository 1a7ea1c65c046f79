"""Result files that a long run writes at its end: checked before the run, written with one-line errors.

A benchmark or an evaluation that works for an hour and then finds its `--output` is a
directory would lose that hour; `check_writable` makes it fail first instead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from looplm.errors import LooplmError

# What a benchmark's failed final write leaves: it prints its JSON document before writing the file.
PRINTED_ABOVE = "the JSON document is the last line printed above"


def check_writable(path: Path | str | None, option: str, directory: bool = False) -> None:
    """A LooplmError unless `path` can be created or replaced as a file (missing folders may be made),
    or, with `directory`, created as a directory or written into. An existing file must be writable:
    every writer opens it in place, so a read-only one would fail only after the run."""
    if path is None:
        return
    path = Path(path).expanduser()
    if directory and path.exists() and not path.is_dir():
        raise LooplmError(f"{option} {path} exists and is not a directory")
    if not directory and path.is_dir():
        raise LooplmError(f"{option} {path} is a directory; give a file name")
    if not directory and path.exists() and not os.access(path, os.W_OK):
        raise LooplmError(f"{option} {path} exists and is not writable (read-only)")
    existing = next(folder for folder in ((path,) if directory else ()) + tuple(path.parents) if folder.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise LooplmError(f"{option} {path}: cannot write there ({existing} is not a writable directory)")


def make_output_dir(path: Path | str, option: str) -> Path:
    """Create the directory `path` (and its parents) before a run writes there, or a LooplmError."""
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LooplmError(f"{option} {path}: cannot create the directory ({exc.strerror or exc})") from None
    return path


def write_result(path: Path | str, content: str | Callable[[Path], None], kept: str) -> None:
    """Write `content` (text, or a function that writes the file at the path it is given) to `path`,
    making its folder; on failure a LooplmError that says where the results still are (`kept`)."""
    path = Path(path).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if callable(content):
            content(path)
        else:
            path.write_text(content)
    except OSError as exc:  # checked up front, but a disk can still fill up
        raise LooplmError(f"could not write {path} ({exc.strerror or exc}); {kept}") from None


def replace_text(path: Path | str, text: str) -> None:
    """Write `text` (UTF-8) to `path` through a temporary file beside it, synced, then renamed over
    it: a full disk or a crash leaves the old file, never a cut-off one, and the temporary goes on
    failure (the OSError is raised). A file that existed keeps its permissions; through a symlink
    the target is replaced and the link kept."""
    path = Path(os.path.realpath(Path(path).expanduser()))
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temporary, "xb") as handle:
            handle.write(text.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())  # on disk before the rename makes it the file
        if path.is_file():
            shutil.copymode(path, temporary)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise


__all__ = ["PRINTED_ABOVE", "check_writable", "make_output_dir", "replace_text", "write_result"]
