"""Lightning callbacks for what the paper's training loop reports."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch


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
