"""Lightning callbacks for what the paper's training loop reports, and what a dashboard watches: speed, model FLOPs
utilization and memory, logged every `trainer.log_every_n_steps` steps without making any step wait for the host.

Lightning's own ThroughputMonitor and DeviceStatsMonitor do not fit: the first wants a fixed FLOPs count per batch
(token batches vary in shape) and knows no CPU peak; the second reports machine-wide CPU use, not this process's
memory, and on GPUs dumps every allocator counter.
"""

from __future__ import annotations

import os
import resource
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from pipeline import preemption
from pipeline.costs import (
    ACCELERATORS,
    GB,
    accelerator_for_device_name,
    model_flops_utilization,
    training_flops_per_target_token,
)


def _logging_step(trainer: L.Trainer) -> bool:
    return trainer.global_step % max(trainer.log_every_n_steps, 1) == 0


def accelerator_key(trainer: L.Trainer, configured: str | None) -> str | None:
    """The key of pipeline/costs.py's ACCELERATORS this run trains on: `cpu`, the GPU the CUDA device's name names
    (pipeline/costs.py's accelerator_for_device_name: an "NVIDIA H100 80GB HBM3" is h100), else `configured`
    (cluster.gpu) if that is a GPU's key; None if unknown (then no `train/mfu`)."""
    device = trainer.strategy.root_device
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda":
        key = accelerator_for_device_name(torch.cuda.get_device_name(device))
        if key:
            return key
    # Not cluster.gpu=cpu (conf/cluster/local.yaml's default) on a GPU: the CPU's peak would make a wrong MFU.
    return configured if configured in ACCELERATORS and configured != "cpu" else None


class TokenThroughput(L.Callback):
    """Logs target tokens per second (`train/tgt_tokens_per_sec`) over each logging interval, and the model FLOPs
    utilization (`train/mfu`) it implies.

    Time runs from one training batch's end to the next, so data loading counts and validation or checkpointing
    between them does not. Token counts come from the collated batch (host integers: n_src_tokens, n_tgt_tokens),
    so no training step waits for the device. Both numbers are this rank's (rank 0's on the dashboard); the job's
    throughput is about world size times more.

    MFU = training FLOPs per target token x target tokens/s / peak FLOP/s of one device (useful FLOPs / peak,
    Chowdhery et al. 2022, PaLM, appendix B), with FLOPs per token from pipeline/costs.py's formula at the mean
    source and target lengths (tokens per sentence) of the interval's batches, and the peak of pipeline/costs.py's
    ACCELERATORS table for this device (its bf16 or fp16 peak, so a 32-true run reads low).
    """

    def __init__(self, pad_id: int = 0, gpu: str | None = None) -> None:
        self.pad_id = pad_id
        self.gpu = gpu  # cluster.gpu: the device type when the CUDA device's name does not say
        self._tokens: torch.Tensor | int = 0
        self._src_tokens = self._sentences = 0
        self._elapsed = 0.0
        self._last: float | None = None
        self._flops: tuple[Any, int, int] | None = None  # (model config, encoder params, decoder params)
        self._peak: float | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Before the strategy wraps the model: ZeRO-3 would leave partitioned (empty) parameters to count.
        model = getattr(pl_module, "model", None)
        if hasattr(model, "parameter_counts") and hasattr(model, "cfg"):
            counts = model.parameter_counts()
            self._flops = (model.cfg, counts["encoder"], counts["decoder"])
        key = accelerator_key(trainer, self.gpu)
        self._peak = ACCELERATORS[key].peak_flops if key else None

    def _pause(self, *args: Any) -> None:
        self._last = None

    on_train_start = on_validation_start = on_save_checkpoint = _pause

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self._elapsed += now - self._last
            if "n_tgt_tokens" in batch:
                self._tokens = self._tokens + batch["n_tgt_tokens"]
            else:  # a batch without counts: summed on the device, read back only when logged
                self._tokens = self._tokens + batch["tgt_out"].ne(self.pad_id).sum()
            self._src_tokens += batch.get("n_src_tokens", 0)
            self._sentences += batch["tgt_out"].size(0)
        self._last = now
        if _logging_step(trainer) and self._elapsed > 0:
            tokens = float(self._tokens)
            pl_module.log("train/tgt_tokens_per_sec", tokens / self._elapsed, prog_bar=True)
            if self._flops and self._peak and self._src_tokens:
                model, encoder, decoder = self._flops
                src_len, tgt_len = self._src_tokens / self._sentences, tokens / self._sentences
                per_token = training_flops_per_target_token(model, encoder, decoder, src_len, tgt_len).total
                pl_module.log("train/mfu", model_flops_utilization(per_token, tokens / self._elapsed, 1, self._peak))
            self._tokens, self._src_tokens, self._sentences, self._elapsed = 0, 0, 0, 0.0


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


class MemoryMonitor(L.Callback):
    """Logs this process's memory every logging interval, in GB (10^9 bytes, as pipeline/plan.py).

    GPU: the CUDA caching allocator's peaks since the start, `memory/max_allocated_gb` (tensors) and
    `memory/max_reserved_gb` (what the allocator holds, what nvidia-smi shows): host-side counters, no sync.
    CPU: the resident set size now and at its peak, `memory/rss_gb` and `memory/peak_rss_gb` (Linux
    /proc/self/status VmRSS and VmHWM; elsewhere only the peak, from getrusage).
    """

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if not _logging_step(trainer):
            return
        device = trainer.strategy.root_device
        if device.type == "cuda":
            pl_module.log("memory/max_allocated_gb", torch.cuda.max_memory_allocated(device) / GB)
            pl_module.log("memory/max_reserved_gb", torch.cuda.max_memory_reserved(device) / GB)
            return
        for key, value in process_memory().items():
            pl_module.log(f"memory/{key}_gb", value / GB)


def process_memory() -> dict[str, float]:
    """{'rss': bytes, 'peak_rss': bytes} of this process ('rss' only where /proc exists)."""
    try:
        with open("/proc/self/status") as status:
            fields = dict(line.split(":", 1) for line in status if ":" in line)
        return {"rss": _kib(fields["VmRSS"]), "peak_rss": _kib(fields["VmHWM"])}
    except (FileNotFoundError, KeyError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return {"peak_rss": float(peak if os.uname().sysname == "Darwin" else peak * 1024)}


def _kib(field: str) -> float:
    """'  123456 kB' -> bytes."""
    return float(field.split()[0]) * 1024


class AttentionImages(L.Callback):
    """At each validation (not the sanity check), the attention maps of the first validation sentence, logged to
    W&B as images: `val/attention/<kind>` (encoder_self, decoder_self, cross), one image per layer, one heatmap per
    head. They are the figures `aiayn attention` draws (pipeline/attention.py), of the source read with its
    reference translation as the decoder's input (teacher forcing, as the validation loss reads it): the same
    sentence and target at every step, so the panels of successive validations show the attention forming.

    Only with a W&B logger. The forward pass runs on every rank, inside the module's `full_parameters()`: under
    ZeRO-3 it runs outside the engine's forward, where each rank holds only partitions of the parameters, so they
    are gathered from all ranks first, a collective (one rank alone would wait forever); only global rank 0 draws
    and logs.
    """

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        from lightning.pytorch.loggers import WandbLogger

        loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        datamodule = getattr(trainer, "datamodule", None)
        if not loggers or datamodule is None or not hasattr(datamodule, "valid_examples"):
            return
        examples = datamodule.valid_examples(1)
        if not examples:
            return
        from pipeline.attention import attention_figures, sentence_attention

        (source, reference) = examples[0]
        with pl_module.full_parameters():  # every rank (TranslationModule.full_parameters)
            att = sentence_attention(pl_module.model, datamodule.tokenizer, source, target=reference)
        if not trainer.is_global_zero:
            return
        images: dict[str, list] = {}
        captions: dict[str, list[str]] = {}
        for kind, layer, fig in attention_figures(att):
            images.setdefault(kind, []).append(fig)
            captions.setdefault(kind, []).append(f"layer {layer} | {source} -> {reference}")
        for logger in loggers:
            for kind, figures in images.items():
                logger.log_image(
                    key=f"val/attention/{kind}", images=figures, step=trainer.global_step, caption=captions[kind]
                )
