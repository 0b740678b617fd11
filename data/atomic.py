"""Writing a file so that a reader, or the next run after a kill, sees the old file or the whole new one, never half.

Every writer in data/ and pipeline/ goes through here: the bytes go to `<dir>/.<name>.tmp-<pid>` in the same folder,
are flushed to disk, and the temporary file is renamed over `<dir>/<name>` (a rename within one folder replaces the
file at once, POSIX); the folder is then flushed too, so that the rename itself survives a crash.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def temp_path(path: Path) -> Path:
    """Where `path` is written before it is renamed into place: `<dir>/.<name>.tmp-<pid>` (hidden, one per process)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename in it) to disk; some filesystems refuse it, then there is nothing to do."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def move_into_place(tmp: Path, path: Path) -> None:
    """For a file written whole by someone else (a library, a streamed writer): flush `tmp`, rename it to `path`."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call `write(f)` on a binary temporary file beside `path`, flush it to disk, then rename it to `path`.

    On any exception (a KeyboardInterrupt too) the temporary file is removed and `path` keeps its previous content.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def write_text_atomic(path: Path, text: str) -> None:
    """`text` as UTF-8, newlines as given (no platform translation)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, obj: Any, indent: int = 2) -> None:
    """`obj` as JSON with sorted keys: the same object always gives the same bytes (manifests, shard records)."""
    write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=True))
