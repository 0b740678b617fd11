"""Lightning callbacks for what the paper's training loop reports."""

from __future__ import annotations

import os
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from pipeline import preemption


class TokenThroughput(L.Callback):
    """Logs target tokens per second (`train/tgt_tokens_per_sec`) over each logging interval.

    Time runs from one training batch's end to the next, so data loading counts and validation or checkpointing
    between them does not. Token counts are summed as tensors and read back only when logged, so no training
    step waits for the host.
    """

    def __init__(self, pad_id: int = 0) -> None:
        self.pad_id = pad_id
        self._tokens: torch.Tensor | int = 0
        self._elapsed = 0.0
        self._last: float | None = None

    def _pause(self, *args: Any) -> None:
        self._last = None

    on_train_start = on_validation_start = on_save_checkpoint = _pause

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self._elapsed += now - self._last
            self._tokens = self._tokens + batch["tgt_out"].ne(self.pad_id).sum()
        self._last = now
        if trainer.global_step % max(trainer.log_every_n_steps, 1) == 0 and self._elapsed > 0:
            pl_module.log("train/tgt_tokens_per_sec", float(self._tokens) / self._elapsed, prog_bar=True)
            self._tokens, self._elapsed = 0, 0.0


class RunStart(L.Callback):
    """Records and prints the step training starts from: 0 for a fresh run, the checkpoint's step after a resume."""

    def __init__(self, resumed_from: str | None = None) -> None:
        self.resumed_from = resumed_from
        self.start_step: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_step = trainer.global_step
        job = os.environ.get("SLURM_JOB_ID")
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")  # unset before the first requeue
        attempt = f" (SLURM job {job}, restart {restarts})" if job else ""
        origin = f"resumed from {self.resumed_from}" if self.resumed_from else "fresh"
        rank_zero_info(f"training starts at step {self.start_step}: {origin}{attempt}")


class RequeueOnPreemption(L.Callback):
    """SLURM's warning signal -> last.ckpt at the next optimizer step -> `scontrol requeue` -> stop.

    The signal handler (pipeline/preemption.py, where the choice against Lightning's and submitit's own handlers
    is explained) only sets a flag. After every optimizer step the ranks agree on it (one boolean all-reduce: a
    rank may see the signal a step later than another); then every rank takes part in saving `checkpoint_path`,
    rank 0 requeues the job, and training stops. `requeued` tells the caller not to report the run as finished.
    """

    def __init__(self, checkpoint_path: str | os.PathLike, signum: int = preemption.REQUEUE_SIGNAL) -> None:
        self.checkpoint_path = str(checkpoint_path)
        self.signum = signum
        self.requeued = False
        self._checked_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        preemption.install(self.signum)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._checked_step = trainer.global_step
        # The signal came while the job was still starting (imports, data, resume): nothing new to save.
        if trainer.strategy.reduce_boolean_decision(preemption.requested(), all=False):
            self._requeue(trainer)

    def _requeue(self, trainer: L.Trainer) -> None:
        if trainer.is_global_zero:
            rank_zero_info(f"requeued SLURM job {preemption.requeue_job()}")
        self.requeued = True
        trainer.should_stop = True

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if trainer.global_step == self._checked_step:  # inside an accumulation: wait for the optimizer step
            return
        self._checked_step = trainer.global_step
        if not trainer.strategy.reduce_boolean_decision(preemption.requested(), all=False):
            return
        trainer.save_checkpoint(self.checkpoint_path)  # collective: every rank, the same step
        rank_zero_info(f"preempted: saved {self.checkpoint_path} at step {trainer.global_step}")
        self._requeue(trainer)
