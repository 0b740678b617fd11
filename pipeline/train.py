"""`aiayn train`: fit the Transformer with Lightning on the configured data, then report."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from data import TranslationDataModule
from modules.lightning import TranslationModule
from pipeline.callbacks import TokenThroughput
from pipeline.config import output_dir
from pipeline.loggers import build_loggers


def run_dir(cfg: DictConfig) -> Path:
    """The run's folder: run.dir if given, else <output_dir>/runs/<run.name>-<timestamp>."""
    if cfg.run.dir:
        path = Path(cfg.run.dir).expanduser().resolve()
    else:
        path = output_dir(cfg) / "runs" / f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_trainer(cfg: DictConfig, directory: Path) -> L.Trainer:
    checkpoints = ModelCheckpoint(
        dirpath=directory / "checkpoints",
        filename="step{step:07d}",
        auto_insert_metric_name=False,
        every_n_train_steps=cfg.checkpoint.every_n_train_steps,
        save_top_k=cfg.checkpoint.save_top_k,
        monitor="step",
        mode="max",
        save_last=True,
    )
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    return L.Trainer(
        **trainer_args,
        default_root_dir=str(directory),
        logger=build_loggers(cfg, directory),
        callbacks=[TokenThroughput(pad_id=cfg.model.pad_id), checkpoints],
    )


def main(cfg: DictConfig) -> dict:
    L.seed_everything(cfg.seed, workers=True)
    directory = run_dir(cfg)
    (directory / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    datamodule = TranslationDataModule(cfg.data, output_dir(cfg), seed=cfg.seed)
    module = TranslationModule(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        n_samples=cfg.run.n_samples,
    )
    trainer = build_trainer(cfg, directory)
    ckpt_path = cfg.run.resume
    if ckpt_path == "last":
        ckpt_path = str(directory / "checkpoints" / "last.ckpt")
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    minutes = (time.perf_counter() - started) / 60

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "train/"))}
    summary = {
        "run_dir": str(directory),
        "steps": trainer.global_step,
        "minutes": round(minutes, 2),
        **metrics,
    }
    if trainer.is_global_zero:
        (directory / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"\nTrained {trainer.global_step} steps in {minutes:.1f} min; run folder: {directory}")
        if "val/ppl" in metrics:
            print(f"validation perplexity {metrics['val/ppl']:.2f}  (loss {metrics['val/loss']:.3f})")
        for src, ref, hyp in module.samples:
            print(f"  SRC {src}\n  REF {ref}\n  HYP {hyp}\n")
    return summary
