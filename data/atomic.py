"""Writing a file so that a reader, or the next run after a kill, sees the old file or the whole new one, never half.

Every writer in data/ and pipeline/ goes through here: the bytes go to `<dir>/.<name>.tmp-<pid>` in the same folder,
are flushed to disk, and the temporary file is renamed over `<dir>/<name>` (a rename within one folder replaces the
file at once, POSIX); the folder is then flushed too, so that the rename itself survives a crash.

A process killed while writing (kill -9, a node lost) leaves its temporary file behind: `remove_stale_temp_files`
deletes those of processes that no longer run (`aiayn prepare` calls it where it starts). A full disk (ENOSPC, or a
quota) is a DiskFullError naming the file, not a traceback.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from data.errors import DiskFullError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# `.<name>.tmp-<pid>` (temp_path), and the `.spm.tmp-<pid>.model/.vocab` of versions that let sentencepiece write
# its files itself
TEMP_NAME = re.compile(r"^\..+\.tmp-(\d+)(?:\.model|\.vocab)?$")


def temp_path(path: Path) -> Path:
    """Where `path` is written before it is renamed into place: `<dir>/.<name>.tmp-<pid>` (hidden, one per process)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def is_disk_full(err: BaseException) -> bool:
    """Whether `err` says the disk (or the user's quota) is full."""
    return isinstance(err, OSError) and (err.errno in NO_SPACE or "No space left on device" in str(err))


def disk_full(path: Path, err: BaseException | None = None) -> DiskFullError:
    """The one-line error for a write of `path` that found no space left (err: the OSError that said so)."""
    try:
        free = f"{shutil.disk_usage(Path(path).parent).free / 2**20:,.0f} MiB free"
    except OSError:
        free = "full"
    code = getattr(err, "errno", None) or errno.ENOSPC
    return DiskFullError(
        code,
        f"no space left on the device to write {path} ({os.strerror(code)}; {free}): free some space there, or "
        "write to another disk (the output folder: paths.output_dir or AIAYN_OUTPUT_DIR), then run the command "
        "again (files already finished are kept)",
    )


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (a zombie counts: it has not been reaped yet)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's process
        return True
    return True


def remove_stale_temp_files(folder: str | os.PathLike, min_age_s: float = 0.0) -> list[Path]:
    """Delete the temporary files (and folders) under `folder` whose writer no longer runs; return them.

    A name `.<name>.tmp-<pid>` (temp_path) is stale when no process `pid` runs here and, with `min_age_s`, when it
    was not written for that long: a folder other machines write to as well (a shared filesystem) may hold the
    file of a live writer elsewhere, which writes to it at least every few seconds.
    """
    folder, now, removed = Path(folder), time.time(), []
    if not folder.is_dir():
        return removed
    for path in sorted(folder.rglob(".*.tmp-*")):
        match = TEMP_NAME.match(path.name)
        if match is None or pid_alive(int(match.group(1))):
            continue
        try:
            if min_age_s and now - path.lstat().st_mtime < min_age_s:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:  # gone meanwhile (inside a folder removed just before, or another cleaner)
            continue
        removed.append(path)
    return removed


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

    On any exception (a KeyboardInterrupt too) the temporary file is removed and `path` keeps its previous content;
    a full disk raises DiskFullError naming `path`.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if is_disk_full(err) and not isinstance(err, DiskFullError):
            raise disk_full(path, err) from err
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
