"""Reading a run's checkpoints, whatever wrote them: Lightning files or DeepSpeed checkpoint folders.

`aiayn train` writes <run>/checkpoints/step<NNNNNNN>.ckpt every N steps or T minutes, plus last.ckpt, a copy of
the newest. Under DeepSpeed (strategy=deepspeed) each "checkpoint path" is a folder: `latest` names a tag folder
holding the (partitioned) model and optimizer states, and Lightning's own entries (global_step,
hyper_parameters, ...) ride along as DeepSpeed's client state in the rank-0 model-states file. Everything here
returns one shape for both: a Lightning checkpoint dict whose "state_dict" holds full fp32 tensors.
"""

from __future__ import annotations

import errno
import glob
import os
import pickle
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data.atomic import atomic_write, remove_stale_temp_files
from pipeline.errors import RunFolderError

# DeepSpeed's own file names (deepspeed/runtime/engine.py): rank 0's model states under ZeRO 0-2, then ZeRO-3.
_DS_MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
# Entries of a DeepSpeed model-states file that are DeepSpeed's, not Lightning's (as Lightning's
# convert_zero_checkpoint_to_fp32_state_dict drops them).
_DS_ENTRIES = {
    "module",
    "buffer_names",
    "param_shapes",
    "frozen_param_shapes",
    "frozen_param_fragments",
    "shared_params",
    "optimizer",
    "lr_scheduler",
    "data_sampler",
    "random_ltd",
    "sparse_tensor_module_names",
    "csr_tensor_module_names",
    "skipped_steps",
    "global_steps",
    "global_samples",
    "dp_world_size",
    "mp_world_size",
    "ds_config",
    "ds_version",
}


@dataclass(frozen=True)
class CheckpointRef:
    """One checkpoint of a run: where it is, the optimizer step it was taken at, when it was last written."""

    path: Path
    global_step: int
    mtime: float  # newest modification time of the file (or of any file in a DeepSpeed folder)

    def record(self) -> dict[str, Any]:
        """What averaged.ckpt stores about its inputs (to tell later whether it is up to date)."""
        return {"name": self.path.name, "global_step": self.global_step}


def _torch_load(path: Path, allowed: tuple[type, ...] = ()) -> dict[str, Any]:
    """A checkpoint file read with torch's weights-only unpickler: tensors, numbers, strings and containers (and the
    plain data classes `allowed`), never code (a crafted pickle could otherwise run any command as it is opened).
    mmap: tensors are read only when touched, so reading the metadata is cheap."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RunFolderError(
            f"{path}: refused, it holds more than weights ({reason}); aiayn loads checkpoints weights-only, so that "
            "opening one can never run code: use a checkpoint written by `aiayn train` or `aiayn average`"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise RunFolderError(f"{path} cannot be read as a checkpoint ({type(error).__name__}: {error})") from None


def _deepspeed_records() -> tuple[type, ...]:
    """The data classes DeepSpeed pickles into its optimizer-state files besides tensors: an enum, the loss scaler's
    settings, the address of a parameter's fragment."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address


def _ds_tag_dir(folder: Path) -> Path:
    latest = folder / "latest"
    if not latest.is_file():
        raise RunFolderError(
            f"{folder} is a folder but not a DeepSpeed checkpoint (no 'latest' file naming its tag folder); "
            "remove it or point to a checkpoint file"
        )
    tag_dir = folder / latest.read_text().strip()
    if not tag_dir.is_dir():
        raise RunFolderError(f"{latest} names the tag folder {tag_dir.name!r}, which does not exist in {folder}")
    return tag_dir


def _ds_client_state(folder: Path) -> dict[str, Any]:
    """Lightning's entries of a DeepSpeed checkpoint folder (global_step, hyper_parameters, ...), no tensors."""
    tag_dir = _ds_tag_dir(folder)
    for name in _DS_MODEL_STATES:
        if (tag_dir / name).is_file():
            state = _torch_load(tag_dir / name)
            return {k: v for k, v in state.items() if k not in _DS_ENTRIES}
    raise RunFolderError(f"no DeepSpeed model-states file ({' or '.join(_DS_MODEL_STATES)}) in {tag_dir}")


def _mtime(path: Path) -> float:
    if path.is_dir():
        return max((p.stat().st_mtime for p in path.rglob("*") if p.is_file()), default=path.stat().st_mtime)
    return path.stat().st_mtime


def checkpoint_meta(path: Path) -> dict[str, Any]:
    """A checkpoint's entries without reading its tensors: a file's, memory-mapped; a DeepSpeed folder's Lightning
    entries (global_step, hyper_parameters, ...)."""
    return _ds_client_state(path) if path.is_dir() else _torch_load(path)


def checkpoint_ref(path: Path) -> CheckpointRef:
    """The step and modification time of one checkpoint (file or DeepSpeed folder), read without its tensors."""
    meta = checkpoint_meta(path)
    if "global_step" not in meta:
        raise RunFolderError(f"{path} has no 'global_step': not a Lightning checkpoint written by `aiayn train`")
    return CheckpointRef(path=path, global_step=int(meta["global_step"]), mtime=_mtime(path))


def _warn(message: str) -> None:
    print(message, file=sys.stderr)  # stdout may be the command's output (translations)


def run_checkpoints(checkpoint_dir: Path, log: Callable[[str], None] = _warn) -> list[CheckpointRef]:
    """The distinct checkpoints of a run that can be read, oldest first (by global step).

    last.ckpt (or last-v1.ckpt, ...) is a copy of the newest step checkpoint: it counts only when it holds a step
    no other checkpoint holds (e.g. when older step checkpoints were deleted). Two files of the same step are one
    checkpoint (the step-named one is kept). A file that cannot be read (cut short by a crash outside the atomic
    write, or a copy that did not finish) is passed over, and `log` says so.
    """
    if not checkpoint_dir.is_dir():
        raise RunFolderError(f"no checkpoints folder {checkpoint_dir}: train first (`aiayn train run.dir=...`)")
    paths = [p for p in checkpoint_dir.iterdir() if p.name.endswith(".ckpt") and not p.name.startswith(".")]
    # The step-named ones first, so that for a step both hold, the step-named file wins over last.ckpt.
    paths.sort(key=lambda p: (p.name.startswith("last"), p.name))
    by_step: dict[int, CheckpointRef] = {}
    for path in paths:
        try:
            ref = checkpoint_ref(path)
        except RunFolderError as error:
            log(f"passing over {path.name}: {error}")
            continue
        by_step.setdefault(ref.global_step, ref)
    return [by_step[step] for step in sorted(by_step)]


def readable_or_newest(path: Path, log: Callable[[str], None] = _warn) -> Path:
    """path if it can be read as a checkpoint, else the newest readable checkpoint of its folder (a last.ckpt cut
    short falls back to the newest step checkpoint beside it), said in one line; the error if there is none."""
    try:
        checkpoint_ref(path)
        return path
    except RunFolderError as error:
        others = [ref for ref in run_checkpoints(path.parent, log=lambda _: None) if ref.path != path]
        if not others:
            raise
        log(f"{error}; using the newest checkpoint that can be read instead: {others[-1].path.name}")
        return others[-1].path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint as a Lightning checkpoint dict; a DeepSpeed folder is consolidated to full fp32 tensors
    with DeepSpeed's own zero_to_fp32 (any ZeRO stage, any number of ranks it was written by)."""
    path = Path(path)
    if not path.exists():
        raise RunFolderError(f"checkpoint not found: {path}")
    if not path.is_dir():
        checkpoint = _torch_load(path)
        if "state_dict" not in checkpoint:
            raise RunFolderError(f"{path} has no 'state_dict': not a Lightning checkpoint")
        return checkpoint
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # consolidation runs on the CPU, with or without a GPU
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint = _ds_client_state(path)
    tag_dir = _ds_tag_dir(path)
    for states in sorted(tag_dir.glob("*.pt")):  # DeepSpeed's reader unpickles them whole: each is checked first
        _torch_load(states, _deepspeed_records())
    state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag_dir.name)
    # Lightning < 2.1 wrapped the module as `_forward_module`: strip it, as Lightning's own converter does.
    checkpoint["state_dict"] = {k.removeprefix("_forward_module."): v for k, v in state.items()}
    return checkpoint


class _KeepsWriteError:
    """The file torch.save writes to, keeping the OSError a write raised: torch's writer swallows it and reports only
    `unexpected pos N vs M` (fewer bytes written than it meant to), which hides a full disk."""

    def __init__(self, file: Any) -> None:
        self._file = file
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._file.write(data)
        except OSError as error:
            self.error = error
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


def save_atomic(obj: Any, path: Path, fix: str | None = None) -> None:
    """torch.save to `<dir>/.<name>.tmp-<pid>`, flushed to disk, then renamed to `<dir>/<name>` (data/atomic.py).

    A rename within one directory replaces the file at once (POSIX): whenever the process is killed, `path` is the
    previous complete file or the new complete one, never half of one. Temp files left by a killed writer go.
    A write that fails (a full disk, a read-only folder) is a RunFolderError naming `path`, why, and `fix` (default:
    the previous file is intact, run the command again once there is room); the previous file stays as it was.
    """

    def save(file: Any) -> None:
        kept = _KeepsWriteError(file)
        try:
            torch.save(obj, kept)
        except RuntimeError:
            if kept.error is None:
                raise
            raise kept.error from None

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(path.parent)  # left by a process killed while saving
        for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # the same, by older versions
            stale.unlink(missing_ok=True)
        atomic_write(path, save)
    except OSError as error:
        raise write_error(path, error, fix) from None


def write_error(path: Path, error: OSError, fix: str | None = None) -> RunFolderError:
    """A file that could not be written, in one line: which, why (a full disk said as such), what to do."""
    # os.strerror: the system's words for errno alone (an error that already says more, data/atomic.py's, is not
    # repeated inside this one)
    reason = os.strerror(error.errno) if error.errno else (str(error) or type(error).__name__)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = f"the disk is full ({reason})"
    if fix is None:
        kept = f"the {path.name} there before is intact" if path.exists() else "nothing was left half-written"
        fix = f"{kept}; free space there (or make it writable), then run the command again"
    return RunFolderError(f"cannot write {path}: {reason}; {fix}")
