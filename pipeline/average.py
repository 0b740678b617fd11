"""`aiayn average`: one model from the last checkpoints of a run, as in section 6.1.

"For the base models, we used a single model obtained by averaging the last 5 checkpoints, which were written at
10-minute intervals. For the big models, we averaged the last 20 checkpoints." (average.last_n: 5 in
conf/config.yaml, 20 in conf/experiment/wmt14_big.yaml). The result, <run.dir>/averaged.ckpt, is a Lightning
checkpoint (state_dict + hyper_parameters, no optimizer state) that records which checkpoints it was made from,
so a second call with nothing new prints "up to date" and does nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from pipeline.checkpoints import CheckpointRef, load_checkpoint, run_checkpoints, save_atomic
from pipeline.errors import RunFolderError
from pipeline.runs import AVERAGED_NAME, DATASET_KEY, require_run_dir


def average_state_dicts(states: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The elementwise mean of state dicts with the same keys and shapes, one held in memory at a time.

    Floating-point tensors are summed in float32 (float64 ones in float64), divided by their number and cast
    back to their dtype; other tensors (integer buffers, counters) are taken from the last state dict. Keys that
    name one tensor in the first state dict (the tied embeddings of section 3.4) stay one tensor in the result.
    """
    total: dict[str, torch.Tensor] = {}
    alias: dict[str, str] = {}  # key -> the first key naming the same tensor
    dtypes: dict[str, torch.dtype] = {}
    count = 0
    for state in states:
        if count and state.keys() != total.keys():
            missing, extra = sorted(total.keys() - state.keys()), sorted(state.keys() - total.keys())
            raise RunFolderError(f"checkpoints differ in their parameters (missing {missing[:3]}, extra {extra[:3]})")
        if not count:
            seen: dict[tuple, str] = {}
            for key, value in state.items():
                ident = (value.untyped_storage().data_ptr(), value.storage_offset(), value.shape, value.stride())
                alias[key] = seen.setdefault(ident, key)
        for key, value in state.items():
            dtypes[key] = value.dtype
            if alias[key] != key:
                continue
            if not value.is_floating_point():
                total[key] = value.clone()
            elif not count:
                total[key] = value.to(torch.float64 if value.dtype == torch.float64 else torch.float32, copy=True)
            elif value.shape != total[key].shape:
                raise RunFolderError(
                    f"{key}: shape {tuple(value.shape)} in one checkpoint, {tuple(total[key].shape)} in another"
                )
            else:
                total[key] += value
        count += 1
        for key, first in alias.items():
            total.setdefault(key, total[first])
    if not count:
        raise ValueError("no state dicts to average")
    mean = {k: (v / count).to(dtypes[k]) if v.is_floating_point() else v for k, v in total.items() if alias[k] == k}
    return {k: mean[alias[k]] for k in alias}  # in the first state dict's order


def _is_up_to_date(target: Path, selected: list[CheckpointRef]) -> bool:
    """averaged.ckpt exists, is newer than each checkpoint and was made from exactly these checkpoints."""
    if not target.is_file() or target.stat().st_mtime <= max(ref.mtime for ref in selected):
        return False
    try:
        recorded = load_checkpoint(target).get("averaged_from")
    except Exception:  # unreadable (e.g. not ours): make it again
        return False
    return recorded == [ref.record() for ref in selected]


def average_run(run_dir: Path, last_n: int, log=print) -> Path:
    """Average the newest `last_n` checkpoints of run_dir/checkpoints into run_dir/averaged.ckpt; returns its path."""
    if last_n < 1:
        raise RunFolderError(f"average.last_n={last_n}: must be at least 1")
    checkpoints = run_checkpoints(run_dir / "checkpoints", log=log)
    if not checkpoints:
        raise RunFolderError(f"no checkpoints in {run_dir / 'checkpoints'}: train first, then average")
    selected = checkpoints[-last_n:]
    target = run_dir / AVERAGED_NAME
    steps = ", ".join(str(ref.global_step) for ref in selected)
    if _is_up_to_date(target, selected):
        log(f"up to date: {target} (steps {steps})")
        return target
    if len(selected) < last_n:
        log(f"average.last_n={last_n} but {run_dir / 'checkpoints'} holds {len(selected)}: averaging those")
    log(f"averaging {len(selected)} checkpoint(s) at steps {steps}")

    newest: dict[str, Any] = {}

    def states():
        nonlocal newest
        for ref in selected:
            newest = load_checkpoint(ref.path)
            yield newest.pop("state_dict")

    averaged = average_state_dicts(states())
    if "hyper_parameters" not in newest:
        raise RunFolderError(f"{selected[-1].path} has no hyper_parameters: the model cannot be rebuilt from it")
    checkpoint = {
        "state_dict": averaged,
        # What LightningModule.load_from_checkpoint needs to rebuild the model: its constructor arguments.
        **{
            k: newest[k] for k in ("hyper_parameters", "pytorch-lightning_version", "epoch", DATASET_KEY) if k in newest
        },
        "global_step": selected[-1].global_step,
        "averaged_from": [ref.record() for ref in selected],
    }
    save_atomic(checkpoint, target)
    return target


def main(cfg: DictConfig) -> Path:
    target = average_run(require_run_dir(cfg, "average"), int(cfg.average.last_n))
    print(target)
    return target
