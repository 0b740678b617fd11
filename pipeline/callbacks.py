"""Lightning callbacks for what the paper's training loop reports, and what a dashboard watches: speed, model FLOPs
utilization and memory, logged every `trainer.log_every_n_steps` steps without making any step wait for the host.

Lightning's own ThroughputMonitor and DeviceStatsMonitor do not fit: the first wants a fixed FLOPs count per batch
(token batches vary in shape) and knows no CPU peak; the second reports machine-wide CPU use, not this process's
memory, and on GPUs dumps every allocator counter.

RunProgress is the run's progress bar: one bar for the run on a terminal, a plain line every logging interval and
after each validation elsewhere (a SLURM log), pipeline/progress.py's format.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from typing import IO, Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.callbacks.progress import ProgressBar
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from tqdm.auto import tqdm

from pipeline import preemption
from pipeline.costs import (
    ACCELERATORS,
    GB,
    accelerator_for_device_name,
    model_flops_utilization,
    training_flops_per_target_token,
)
from pipeline.progress import clock, is_terminal


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
    """Records and prints the step training starts from: 0 for a fresh run, the checkpoint's step after a resume;
    and, in place of Lightning's model summary table (whose FLOPs column reads 0 for a model without an
    example_input_array), one line of the model's trainable parameters."""

    def __init__(self, resumed_from: str | None = None) -> None:
        self.resumed_from = resumed_from
        self.start_step: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Before the strategy wraps the model: ZeRO-3 would leave partitioned (empty) parameters to count.
        model = getattr(pl_module, "model", None)
        if stage == "fit" and hasattr(model, "parameter_counts"):
            rank_zero_info(model_line(type(model).__name__, model.parameter_counts()))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_step = trainer.global_step
        job = os.environ.get("SLURM_JOB_ID")
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")  # unset before the first requeue
        attempt = f" (SLURM job {job}, restart {restarts})" if job else ""
        origin = f"resumed from {self.resumed_from}" if self.resumed_from else "fresh"
        rank_zero_info(f"training starts at step {self.start_step}: {origin}{attempt}")


def model_line(name: str, counts: dict[str, int]) -> str:
    """Transformer.parameter_counts() in one line: 'model: Transformer, 7,577,600 trainable parameters (embedding
    2,048,000, encoder 2,369,280, decoder 3,160,320)'."""
    parts = ", ".join(f"{part} {n:,}" for part, n in counts.items() if part != "params")
    return f"model: {name}, {counts['params']:,} trainable parameters ({parts})"


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


# The training metrics a train line shows, as the LightningModule and TokenThroughput log them: (metric, field
# name, format).
TRAIN_FIELDS = (
    ("train/loss", "loss", "{:.3f}"),
    ("train/ppl", "ppl", "{:.1f}"),
    ("train/lr", "lr", "{:.3g}"),
    ("train/grad_norm", "gnorm", "{:.3f}"),
    ("train/tgt_tokens_per_sec", "tok/s", "{:.0f}"),
)
VALID_FIELDS = (("val/loss", "loss", "{:.3f}"), ("val/ppl", "ppl", "{:.1f}"), ("val/bleu", "bleu", "{:.2f}"))


@rank_zero_only
def announce(text: str) -> None:
    """One line on stdout, on global rank 0 only, flushed: where a SLURM log shows it at once."""
    print(text, flush=True)


class RunProgress(ProgressBar):
    """Lightning's progress bar for a whole training run: step / max_steps, loss, tokens/s, elapsed time and ETA.

    On a terminal (of `stream`: stdout unless given) one tqdm bar counts optimizer steps from the step training
    starts at to trainer.max_steps, with a second, passing bar for each validation's batches; off a terminal, a
    plain line (pipeline/progress.py's docstring) every `every_n_steps` optimizer steps (None:
    trainer.log_every_n_steps, the steps at which metrics are logged, so the values are those the loggers get) and
    one after each validation. Metric values are read only at those steps: reading a logged tensor waits for the
    device. Global rank 0 only (Lightning disables the bar on the other ranks).
    """

    def __init__(self, every_n_steps: int | None = None, stream: IO[str] | None = None) -> None:
        super().__init__()
        self.every_n_steps = every_n_steps
        self._stream = stream
        self._enabled = True
        self._bar: tqdm | None = None
        self._val_bar: tqdm | None = None
        self._fields: dict[str, str] = {}  # the training metrics at the last logging step, formatted
        self._start_time: float | None = None  # set when training starts (none for a lone trainer.validate)
        self._start_step = 0
        self._shown_step = -1

    @property
    def stream(self) -> IO[str]:
        return self._stream if self._stream is not None else sys.stdout

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    @property
    def is_disabled(self) -> bool:
        return not self._enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def print(self, *args: Any, sep: str = " ", end: str = "\n", **kwargs: Any) -> None:
        """Lightning's `self.print` (validation samples): above the bar on a terminal, a plain print elsewhere."""
        text = sep.join(str(arg) for arg in args)
        if self._bar is not None:
            tqdm.write(text, file=self.stream, end=end)
        else:
            print(text, end=end, file=self.stream, flush=True)

    # --- the numbers ---------------------------------------------------------------------------------------------

    def _every(self, trainer: L.Trainer) -> int:
        return max(int(self.every_n_steps or trainer.log_every_n_steps or 1), 1)

    def _step(self, trainer: L.Trainer) -> str:
        total = trainer.max_steps
        return f"step {trainer.global_step}/{total}" if total and total > 0 else f"step {trainer.global_step}"

    def eta(self, trainer: L.Trainer, now: float) -> float | None:
        """Seconds until training ends: to max_steps at the rate since the start, or to max_time if sooner."""
        etas: list[float] = []
        if self._start_time is None:
            return None
        done, elapsed = trainer.global_step - self._start_step, now - self._start_time
        if trainer.max_steps and trainer.max_steps > 0 and done > 0 and elapsed > 0:
            etas.append(max(trainer.max_steps - trainer.global_step, 0) * elapsed / done)
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)  # Lightning's, for max_time
        remaining = timer.time_remaining() if timer is not None else None
        if remaining is not None:
            etas.append(max(remaining, 0.0))
        return min(etas) if etas else None

    def _times(self, trainer: L.Trainer) -> list[str]:
        if self._start_time is None:
            return []
        now = time.monotonic()
        fields = [f"elapsed {clock(now - self._start_time)}"]
        eta = self.eta(trainer, now)
        if eta is not None:
            fields.append(f"eta {clock(eta)}")
        return fields

    @staticmethod
    def _metrics(trainer: L.Trainer, table: tuple[tuple[str, str, str], ...]) -> dict[str, str]:
        metrics = trainer.callback_metrics
        return {name: fmt.format(float(metrics[key])) for key, name, fmt in table if key in metrics}

    def train_line(self, trainer: L.Trainer) -> str:
        fields = [f"{name} {value}" for name, value in self._fields.items()]
        return " | ".join(["train", self._step(trainer), *fields, *self._times(trainer)])

    def valid_line(self, trainer: L.Trainer) -> str:
        fields = [f"{name} {value}" for name, value in self._metrics(trainer, VALID_FIELDS).items()]
        return " | ".join(["valid", self._step(trainer), *fields, *self._times(trainer)])

    # --- the hooks -----------------------------------------------------------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_time, self._start_step = time.monotonic(), trainer.global_step
        self._shown_step, self._fields = trainer.global_step, {}
        if self.is_disabled or not is_terminal(self.stream):
            return
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        counted = "{n_fmt}/{total_fmt} {percentage:3.0f}%|{bar:20}|" if total else "{n_fmt} |"
        self._bar = tqdm(
            total=total,
            initial=trainer.global_step,
            file=self.stream,
            bar_format=f"train {counted} {{desc}}",
            dynamic_ncols=True,
        )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.is_disabled or step == self._shown_step:  # inside a gradient accumulation: no new step yet
            return
        self._shown_step = step
        report = step % self._every(trainer) == 0
        if report:
            self._fields = self._metrics(trainer, TRAIN_FIELDS)
        if self._bar is not None:
            fields = [f"{name} {value}" for name, value in self._fields.items()]
            self._bar.set_description_str(" | ".join([*fields, *self._times(trainer)]), refresh=False)
            self._bar.update(step - self._bar.n)
        elif report:
            print(self.train_line(trainer), file=self.stream, flush=True)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.is_disabled or trainer.sanity_checking or self._bar is None:
            return
        batches = trainer.num_val_batches
        total = sum(batches) if isinstance(batches, list) else batches
        known = total != float("inf")
        self._val_bar = tqdm(
            total=total if known else None,
            leave=False,
            file=self.stream,
            bar_format=f"valid {{n_fmt}}{'/{total_fmt}' if known else ''} batches | elapsed {{elapsed}}",
        )

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._val_bar is not None:
            self._val_bar.update(1)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._val_bar is not None:
            self._val_bar.close()
            self._val_bar = None
        if self.is_disabled or trainer.sanity_checking:
            return
        self.print(self.valid_line(trainer))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._close()

    def _close(self) -> None:
        for bar in (self._val_bar, self._bar):
            if bar is not None:
                bar.close()
        self._val_bar = self._bar = None
