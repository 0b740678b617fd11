"""What makes a checkpoint resume *exactly*: an interrupted run, resumed, ends with the weights of an uninterrupted one.

Lightning's checkpoint already holds the model, optimizer, LR scheduler, loop counters (global step, batch position)
and the training loader's position (data/datamodule.py: `TrainLoader`, which Lightning saves and restores because it
has state_dict/load_state_dict). Three pieces are added here:

- `RNGState`: every rank's random number generators (dropout draws from them, section 5.4), which Lightning does
  not save, and which it would not restore at the right moment anyway (see the class). It is a callback with
  state_dict/load_state_dict, so Lightning keeps its state in the checkpoint's "callbacks".
- `UpdateCheckpoint`: ModelCheckpoint that never saves between the micro-batches of one optimizer update, where the
  accumulated gradients (not in any checkpoint) would be lost on resume, and that saves the end of the fit.
- `AtomicCheckpointIO`: a checkpoint file is written beside its final name and renamed over it, so a process killed
  while saving leaves the previous `last.ckpt` intact instead of a truncated one.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import fsspec.utils
import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from modules.lightning import TrainingDiverged
from pipeline.checkpoints import save_atomic


class RNGState(L.Callback):
    """Saves each rank's torch (CPU and CUDA), numpy and Python `random` state in the checkpoint; restores its own.

    The training stream of random numbers is kept to itself: the state at the end of each training batch is put
    back at the start of the next one. So whatever runs between two batches (validation, a new epoch's data loader
    drawing its base seed, writing a checkpoint) leaves the dropout masks of the following batches unchanged, and
    the state a checkpoint holds is exactly the one the next batch starts from, in the uninterrupted run and in the
    resumed one alike (which, for instance, skips the validation the uninterrupted run did right after the save).

    Under DDP every rank starts from the same seed (`seed_everything`); at setup each rank's torch generator is
    reseeded with seed + rank, so that ranks draw different dropout masks (the CPU kernels' dropout,
    modules/cpu_kernels.py, draws one number per mask from it, the same count on every rank: without this, ranks
    would apply identical masks). The checkpoint therefore holds all ranks' states, gathered on every save (the one
    rank that writes the file has them all),
    and each rank restores its own. Resuming with another world size raises: neither these states nor the
    sampler's per-rank position (data/batching.py) could be continued exactly.
    """

    def __init__(self) -> None:
        self._trainer: L.Trainer | None = None
        self._state: dict[str, Any] | None = None  # this rank's generators at the end of the last training batch

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer
        if stage == "fit" and trainer.world_size > 1:  # a resumed run's states replace this at its first batch
            torch.manual_seed(torch.initial_seed() + trainer.global_rank)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if self._state is not None:
            set_rng_state(self._state)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        self._state = rng_state()

    def state_dict(self) -> dict[str, Any]:
        mine = _to_tensors(self._state if self._state is not None else rng_state())
        world_size = self._trainer.world_size if self._trainer is not None else 1
        ranks = [mine]
        if world_size > 1:  # every rank is saving this checkpoint now (Trainer.save_checkpoint runs on all ranks)
            ranks = [None] * world_size
            torch.distributed.all_gather_object(ranks, mine)
        return {"world_size": world_size, "ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        trainer = self._trainer
        world_size, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        saved = int(state_dict["world_size"])
        if saved != world_size:
            path = getattr(trainer, "ckpt_path", None) or "the checkpoint"
            raise RuntimeError(
                f"{path} was written by {saved} process(es) but this run has {world_size} (trainer.devices x "
                f"trainer.num_nodes): its per-rank random states and data positions cannot continue exactly. "
                f"Resume with {saved} processes, or start a new run (run.resume=null) that loads its weights."
            )
        self._state = _from_tensors(state_dict["ranks"][rank])  # set at the start of the next training batch


def rng_state() -> dict[str, Any]:
    """This process's global random number generators (torch CPU and CUDA, numpy, Python)."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _to_tensors(state: dict[str, Any]) -> dict[str, Any]:
    """rng_state() as tensors and numbers only, so that torch.load(weights_only=True) (Lightning's default) reads it.

    numpy: ("MT19937", 624 uint32 keys, pos, has_gauss, cached_gaussian); Python: (version, 625 ints, gauss).
    """
    name, keys, pos, has_gauss, cached = state["numpy"]
    version, words, gauss = state["python"]
    return {
        "torch": state["torch"],
        "cuda": list(state["cuda"]),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos)}
        | {"has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
    }


def _from_tensors(state: dict[str, Any]) -> dict[str, Any]:
    n, p = state["numpy"], state["python"]
    return {
        "torch": state["torch"],
        "cuda": list(state["cuda"]),
        "numpy": (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]),
        "python": (p["version"], tuple(p["words"].tolist()), p["gauss"]),
    }


class UpdateCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose step- and time-triggered saves happen only after an optimizer update.

    A save between the micro-batches of one update (gradient accumulation: train.tokens_per_update) would miss the
    gradients accumulated so far, which no checkpoint holds, and the resumed update would be computed from fewer
    micro-batches. A training batch ended an update when it moved trainer.global_step (the optimizer steps taken);
    ModelCheckpoint's triggers are consulted after those batches only. Step-triggered saves already fall after
    updates; a time-triggered one waits for the next.

    The end of the fit is saved too, when no checkpoint holds its last update: a run stopped by trainer.max_time, or
    by max_steps between two saves, would otherwise lose the updates since the last save (Lightning's
    ModelCheckpoint saves on steps, time or epochs, never at the end, except last.ckpt when it saved nothing else).
    A fit that stopped inside an update (trainer.max_time can) is not saved at its end, not even that
    last.ckpt: its accumulated gradients would be lost, and the resumed run would skip the micro-batches they came
    from.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._step = 0  # trainer.global_step after the previous training batch
        self._update_ended = True  # whether the last training batch ended an optimizer update
        self._saved_step = 0  # trainer.global_step when the newest checkpoint was written (by anyone)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # Nothing to save yet: step 0 is untrained, and a resumed fit starts from a checkpoint of its step.
        self._step = self._saved_step = trainer.global_step
        self._update_ended = True

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        self._update_ended = trainer.global_step != self._step
        self._step = trainer.global_step
        if not self._update_ended:
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, idx)
        if getattr(self, "_defer_save_until_validation", False):
            # Lightning (2.6) puts off a save that falls on an epoch's last batch until the validation it expects
            # there, for fresh metrics; validation every val_check_interval steps (check_val_every_n_epoch: null)
            # does not run there, so the checkpoint was lost, or written at a later step under that step's name.
            # The monitored value is the step itself, never stale: saved now.
            self._defer_save_until_validation = False
            _save_topk_and_last(self, trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Called on every rank for every resumable checkpoint (weights-only ones skip callbacks), whoever saves it.
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        self._saved_step = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._update_ended:
            return
        if trainer.global_step != self._saved_step:
            _save_topk_and_last(self, trainer)
        super().on_train_end(trainer, pl_module)


def _save_topk_and_last(checkpoint: ModelCheckpoint, trainer: L.Trainer) -> None:
    """Save now, as `checkpoint`'s own step trigger does: a top-k file (deleting the one that falls out) and last.

    Lightning's private API, kept on purpose and only here: ModelCheckpoint has no public method that saves on
    demand, and a file written with the public trainer.save_checkpoint would be left out of its top-k bookkeeping
    (never deleted, unknown to a resumed run).
    """
    candidates = checkpoint._monitor_candidates(trainer)
    checkpoint._save_topk_checkpoint(trainer, candidates)
    checkpoint._save_last_checkpoint(trainer, candidates)


# A checkpoint that could not be written (a full disk): what the one-line error says after the path and the reason.
WRITE_FAILED = (
    "the checkpoints written before it are intact (last.ckpt: the newest); free space there, then continue the run "
    "with run.resume=last"
)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes checkpoints through data/atomic.py: a temporary file beside the target, flushed to disk, then renamed.

    A rename within one directory replaces the file at once (POSIX), so whenever the process is killed, `last.ckpt`
    is either the previous complete checkpoint or the new complete one. Lightning's default writes the whole
    checkpoint to a memory buffer, then to a temporary file in the system's temp folder, then moves it: when that
    folder is on another filesystem than the run (node-local /tmp, shared checkpoints), the move is a copy, and a
    kill during the copy leaves a truncated checkpoint under the final name. Remote paths (s3://...) keep the default.
    A checkpoint whose weights are not all finite is refused (TrainingDiverged); one that cannot be written (a full
    disk: torch's "unexpected pos") stops the run with a one-line RunFolderError naming it (pipeline/checkpoints.py).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        not_finite = [k for k, v in checkpoint.get("state_dict", {}).items() if not bool(torch.isfinite(v).all())]
        if not_finite:  # a diverged model is never written, least of all over the last good checkpoint
            raise TrainingDiverged(f"not writing {Path(path).name}: {not_finite[0]} holds non-finite values")
        if storage_options is not None or fsspec.utils.get_protocol(str(path)) != "file":
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        save_atomic(checkpoint, Path(path), fix=WRITE_FAILED)
