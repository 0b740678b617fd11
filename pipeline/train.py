"""`aiayn train`: fit the Transformer with Lightning on the configured data, then report."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from filelock import FileLock, Timeout
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf

from data import TranslationDataModule
from modules.kernels import select_kernels
from modules.lightning import TranslationModule
from pipeline import preemption
from pipeline.callbacks import (
    AttentionImages,
    MemoryMonitor,
    RequeueOnPreemption,
    RunProgress,
    RunStart,
    TokenThroughput,
    announce,
)
from pipeline.config import output_dir
from pipeline.costs import accumulation_steps
from pipeline.errors import RunFolderError
from pipeline.host import reuse_freed_memory
from pipeline.loggers import build_loggers, finish_wandb
from pipeline.resume import AtomicCheckpointIO, RNGState, UpdateCheckpoint
from pipeline.runs import (
    CONFIG_NAME,
    DATASET_KEY,
    check_resume,
    checkpoints_dir,
    new_run_dir,
    record_dataset,
    resume_path,
    save_config,
)
from pipeline.strategies import build_strategy
from pipeline.validate import validate


def build_trainer(cfg: DictConfig, directory: Path) -> L.Trainer:
    announce(f"run folder: {directory}")  # first: where to look while the run starts
    minutes = cfg.checkpoint.get("every_n_minutes")  # or every_n_train_steps: one of them (pipeline/validate.py)
    checkpoints = UpdateCheckpoint(
        dirpath=directory / "checkpoints",
        filename="step{step:07d}",
        auto_insert_metric_name=False,
        every_n_train_steps=None if minutes else cfg.checkpoint.every_n_train_steps,
        train_time_interval=timedelta(minutes=minutes) if minutes else None,
        save_top_k=cfg.checkpoint.save_top_k,
        monitor="step",
        mode="max",
        save_last=True,
        enable_version_counter=False,  # names are unique by step; last.ckpt stays last.ckpt after a resume
    )
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    # RunStart prints the model's parameters in one line instead of Lightning's summary table.
    trainer_args.setdefault("enable_model_summary", False)
    strategy = build_strategy(OmegaConf.to_container(cfg.strategy, resolve=True), trainer_args["accelerator"])
    # trainer.enable_progress_bar: the run's bar on a terminal, else a line every trainer.log_every_n_steps steps
    # (pipeline/progress.py); after TokenThroughput, whose tokens/s of the same step it shows.
    progress = [RunProgress()] if trainer_args.get("enable_progress_bar", True) else []
    callbacks = [
        TokenThroughput(pad_id=cfg.model.pad_id, gpu=cfg.cluster.gpu),
        MemoryMonitor(),
        *progress,
        RunStart(resume_path(cfg, directory)),
        RNGState(),
        checkpoints,
    ]
    if cfg.run.val_attention_maps:  # images for W&B: it does nothing without a W&B logger
        callbacks.append(AttentionImages())
    # Exact resume (pipeline/resume.py): RNG states in the checkpoint, saves only between optimizer updates,
    # checkpoint files renamed into place whole. (DeepSpeed writes its checkpoint folders itself.)
    plugins: list = [] if cfg.strategy.name == "deepspeed" else [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():  # a task started by srun: ranks, world and address come from SLURM
        # auto_requeue=False: Lightning's handler would checkpoint inside the signal handler; RequeueOnPreemption
        # does it at an optimizer step instead (why: pipeline/preemption.py).
        plugins.append(SLURMEnvironment(auto_requeue=False, requeue_signal=preemption.REQUEUE_SIGNAL))
        callbacks.append(RequeueOnPreemption(directory / "checkpoints" / "last.ckpt"))
    return L.Trainer(
        **trainer_args,
        strategy=strategy,
        plugins=plugins or None,
        default_root_dir=str(directory),
        logger=build_loggers(cfg, directory),
        callbacks=callbacks,
    )


def accumulation(cfg: DictConfig, world_size: int) -> int:
    """Micro-batches per optimizer update: from train.tokens_per_update, else trainer.accumulate_grad_batches."""
    tokens_per_update = cfg.train.tokens_per_update  # never both (pipeline/validate.py)
    if not tokens_per_update:
        return int(cfg.trainer.accumulate_grad_batches)
    return accumulation_steps(tokens_per_update, cfg.data.max_tokens, world_size)


def describe_run(cfg: DictConfig, trainer: L.Trainer) -> str:
    """The resolved parallel layout, printed at start: what a user checks before a long job."""
    strategy = cfg.strategy.name + (f" ZeRO-{cfg.strategy.stage}" if cfg.strategy.name == "deepspeed" else "")
    world, accumulate, max_tokens = trainer.world_size, trainer.accumulate_grad_batches, cfg.data.max_tokens
    device = trainer.strategy.root_device
    kernels = select_kernels(cfg.device.kernels, device).name
    compiled = cfg.device.compile is True or (cfg.device.compile == "auto" and device.type == "cuda")
    return (
        f"run: world size {world} ({trainer.num_nodes} node(s) x {trainer.num_devices} device(s), "
        f"{trainer.accelerator.__class__.__name__.removesuffix('Accelerator')}), strategy {strategy}, "
        f"precision {trainer.precision}, accumulation {accumulate}: up to {max_tokens * world * accumulate:,} "
        f"tokens per update (data.max_tokens {max_tokens:,} x {world} x {accumulate}); "
        f"{kernels} kernels{', compiled' if compiled else ''} (device.kernels, device.compile)"
    )


def hold_run_lock(directory: Path) -> Any:
    """The run folder's lock (<run>/.lock), held until this process ends, so that a second `aiayn train` on the same
    folder is refused instead of writing over the first one's checkpoints. The ranks of one run share it: only the
    first process of a launch takes it (a launcher's child or a SLURM task other than rank 0 runs with the lock
    its rank 0 holds)."""
    if any(int(os.environ.get(var, 0)) > 0 for var in ("LOCAL_RANK", "RANK", "SLURM_PROCID", "NODE_RANK")):
        return None
    lock = FileLock(str(directory / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RunFolderError(
            f"run.dir={directory}: another `aiayn train` is writing to it ({directory / '.lock'} is held); wait for "
            "it to end, or train into another run.dir"
        ) from None
    return lock


class RecordDataset(L.Callback):
    """Keeps the dataset's SentencePiece model and identity in the run folder once the data is set up (pipeline/
    runs.py record_dataset): the run then translates, and is checked, without the dataset or the corpora."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        if trainer.is_global_zero and getattr(datamodule, "tokenizer", None) is not None:
            record_dataset(self.directory, datamodule.dataset_dir, datamodule.manifest, datamodule.tokenizer.model_path)

    @staticmethod
    def identity(trainer: L.Trainer) -> dict[str, Any] | None:
        datamodule = trainer.datamodule
        if getattr(datamodule, "manifest", None) is None:
            return None
        return {"fingerprint": datamodule.manifest.get("fingerprint"), "spm_sha256": datamodule.tokenizer.sha256}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        identity = self.identity(trainer)
        if identity is not None:  # every checkpoint says which data and BPE model its weights read and write
            checkpoint[DATASET_KEY] = identity

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        theirs, ours = checkpoint.get(DATASET_KEY), self.identity(trainer)
        if theirs is not None and ours is not None and theirs["fingerprint"] != ours["fingerprint"]:
            raise RunFolderError(
                f"run.resume: the checkpoint was trained on dataset {theirs['fingerprint']} (BPE model sha256 "
                f"{theirs['spm_sha256']}), this run's data is {ours['fingerprint']} ({ours['spm_sha256']}): "
                "resume with the data it was trained on"
            )


@dataclass
class Run:
    """A training run's parts, built from its config by build_run: what `aiayn train` fits, and what tests and
    benchmarks drive by hand."""

    cfg: DictConfig
    directory: Path  # the run folder
    datamodule: TranslationDataModule
    module: TranslationModule
    trainer: L.Trainer
    resume_from: str | None  # the checkpoint fit starts from (run.resume), None for a fresh run
    lock: Any = None  # the run folder's lock while this process writes to it (hold_run_lock)


def build_module(cfg: DictConfig) -> TranslationModule:
    """The LightningModule of the config: model, optimizer and loss settings, validation decoding, device kernels."""
    return TranslationModule(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        n_samples=cfg.run.n_samples,
        bleu_sentences=cfg.run.val_bleu_sentences,
        val_beam=cfg.run.val_beam,
        val_alpha=cfg.evaluate.alpha,
        kernels=cfg.device.kernels,
        compile=cfg.device.compile,
        max_skipped_updates=cfg.train.get("max_skipped_updates"),
    )


def build_run(cfg: DictConfig, directory: Path | None = None) -> Run:
    """Every part of the run the config describes, in its run folder (run.dir, or a new timestamped one; created,
    with its config.yaml): the data module, the LightningModule, the trainer with its callbacks and loggers, and
    the accumulation that train.tokens_per_update asks for, set on both trainer and data."""
    # First: a config that cannot train leaves nothing behind (`aiayn train` checked it already). A run that started
    # before (its config.yaml is there) keeps the settings it started with: the cross-key rules are for new runs.
    given = directory or (Path(cfg.run.dir).expanduser() if cfg.run.get("dir") else None)
    validate(cfg, "train", started=given is not None and (given / CONFIG_NAME).is_file())
    directory = directory or new_run_dir(cfg)
    resume_from = resume_path(cfg, directory)
    if resume_from is not None:  # its model and step, before anything is written (pipeline/runs.py)
        check_resume(cfg, resume_from)
    existing = sorted(checkpoints_dir(directory).glob("*.ckpt")) if directory.is_dir() else []
    if existing and resume_from is None:
        raise RunFolderError(
            f"run.dir={directory} already holds a run ({len(existing)} checkpoint(s) in checkpoints/): continue it "
            "with run.resume=last, or train into a new run.dir"
        )
    directory.mkdir(parents=True, exist_ok=True)
    lock = hold_run_lock(directory)
    save_config(cfg, directory)
    L.seed_everything(cfg.seed, workers=True)
    if cfg.trainer.accelerator == "cpu":
        reuse_freed_memory()
    datamodule = TranslationDataModule(cfg.data, output_dir(cfg), seed=cfg.seed)
    module = build_module(cfg)
    trainer = build_trainer(cfg, directory)
    trainer.callbacks.append(RecordDataset(directory))
    trainer.accumulate_grad_batches = accumulation(cfg, trainer.world_size)
    datamodule.accumulation = trainer.accumulate_grad_batches
    return Run(cfg, directory, datamodule, module, trainer, resume_from, lock)


def main(cfg: DictConfig) -> dict:
    run = build_run(cfg)
    trainer, directory = run.trainer, run.directory
    rank_zero_info(describe_run(cfg, trainer))
    started = time.perf_counter()
    trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=run.resume_from)
    minutes = (time.perf_counter() - started) / 60

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "train/"))}
    run_start = next(c for c in trainer.callbacks if isinstance(c, RunStart))
    requeue = next((c for c in trainer.callbacks if isinstance(c, RequeueOnPreemption)), None)
    summary = {
        "run_dir": str(directory),
        "steps": trainer.global_step,
        "minutes": round(minutes, 2),
        "start_step": run_start.start_step,
        "resumed_from": run.resume_from,
        "world_size": trainer.world_size,
        "cluster_environment": type(getattr(trainer.strategy, "cluster_environment", None)).__name__,
        **metrics,
    }
    if requeue is not None and requeue.requeued:  # not finished: the requeued job continues from last.ckpt
        summary["requeued"] = True
    elif trainer.is_global_zero:
        (directory / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"\nTrained {trainer.global_step} steps in {minutes:.1f} min; run folder: {directory}")
        if "val/ppl" in metrics:
            print(f"validation perplexity {metrics['val/ppl']:.2f}  (loss {metrics['val/loss']:.3f})")
        for src, ref, hyp in run.module.samples:
            print(f"  SRC {src}\n  REF {ref}\n  HYP {hyp}\n")
    finish_wandb()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Tear the process groups down now, not while the interpreter exits: ZeRO-3 leaves a second gloo group
        # whose worker thread is still running then, and destroying a running std::thread aborts the process
        # ("terminate called without an active exception", exit code 134) after a successful run.
        torch.distributed.destroy_process_group()
    return summary
