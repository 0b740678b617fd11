"""End to end through Lightning: a short fit on a Multi30k slice lowers validation loss; a tiny batch is overfit."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf

from data import TranslationDataModule
from modules.config import TransformerConfig
from modules.lightning import TranslationModule
from modules.loss import LabelSmoothedCrossEntropy
from modules.search import greedy_search
from modules.transformer import Transformer
from pipeline import train
from pipeline.config import load_config

TINY_MODEL = ["model.n_layers=2", "model.d_model=64", "model.d_ff=128", "model.n_heads=4", "model.vocab_size=400"]


def _slice_multi30k(corpora_dir: Path, out: Path, n_train: int = 3000, n_valid: int = 200) -> Path:
    """The first lines of Multi30k train and val, written as a corpora folder of the same layout."""
    (out / "multi30k").mkdir(parents=True)
    for split, n in (("train", n_train), ("val", n_valid), ("test_2016_flickr", n_valid)):
        for lang in ("en", "de"):
            with gzip.open(corpora_dir / "multi30k" / f"{split}.{lang}.gz", "rt", encoding="utf-8") as f:
                lines = [next(f) for _ in range(n)]
            with gzip.open(out / "multi30k" / f"{split}.{lang}.gz", "wt", encoding="utf-8") as f:
                f.writelines(lines)
    return out


def test_overfits_a_tiny_batch():
    """With dropout off, the model memorizes 4 sentence pairs and greedy search reproduces them."""
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=30, n_layers=2, d_model=64, d_ff=128, n_heads=4, dropout=0.0))
    criterion = LabelSmoothedCrossEntropy(epsilon=0.0, pad_id=0)
    src = torch.randint(4, 30, (4, 7))
    src[:, -1] = 3  # <eos>
    body = torch.randint(4, 30, (4, 6))
    tgt_in = torch.cat([torch.full((4, 1), 2), body], dim=1)  # <bos> y
    tgt_out = torch.cat([body, torch.full((4, 1), 3)], dim=1)  # y <eos>
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.98), eps=1e-9)
    for _ in range(150):
        loss, _ = criterion(model(src, tgt_in), tgt_out)
        optimizer.zero_grad()
        (loss / tgt_out.numel()).backward()
        optimizer.step()
    assert loss.item() / tgt_out.numel() < 0.05
    model.eval()
    assert greedy_search(model, src, bos_id=2, eos_id=3) == body.tolist()


def test_short_fit_lowers_validation_loss(tmp_path, corpora_dir):
    corpora = _slice_multi30k(corpora_dir, tmp_path / "corpora", n_train=1500, n_valid=100)
    cfg = load_config(
        [
            *TINY_MODEL,
            f"paths.output_dir={tmp_path / 'outputs'}",
            f"paths.corpora_dir={corpora}",
            "data.max_tokens=1024",
            "optim.warmup_steps=30",
            "optim.lr_scale=0.25",  # Eq. 3 alone peaks at 2.3e-2 for d_model 64, warmup 30: too hot
            "trainer.max_steps=60",
            "checkpoint.every_n_train_steps=30",
            "trainer.precision=bf16-mixed",
            "trainer.enable_progress_bar=false",
        ]
    )
    L.seed_everything(cfg.seed)
    datamodule = TranslationDataModule(cfg.data, tmp_path / "outputs", seed=cfg.seed)
    module = TranslationModule(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        n_samples=2,
    )
    trainer = train.build_trainer(cfg, tmp_path / "run")
    before = trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/loss"]
    trainer.fit(module, datamodule=datamodule)
    after = trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/loss"]
    assert after < before - 0.5, (before, after)
    assert len(module.samples) == 2 and all(isinstance(hyp, str) for _, _, hyp in module.samples)
    metrics = (tmp_path / "run" / "logs" / "metrics.csv").read_text()
    for name in ("train/loss", "train/ppl", "train/lr", "train/grad_norm", "train/tgt_tokens_per_sec", "val/ppl"):
        assert name in metrics
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def test_cli_train_runs_and_reports(tmp_path, corpora_dir, capsys):
    """`aiayn train` with overrides: trains, writes summary.json with validation perplexity, prints samples."""
    corpora = _slice_multi30k(corpora_dir, tmp_path / "corpora", n_train=500, n_valid=50)
    cfg = load_config(
        [
            *TINY_MODEL,
            f"paths.output_dir={tmp_path / 'outputs'}",
            f"paths.corpora_dir={corpora}",
            f"run.dir={tmp_path / 'run'}",
            "trainer.max_steps=4",
            "trainer.val_check_interval=4",
            "trainer.enable_progress_bar=false",
            "logger.wandb.enabled=false",
        ]
    )
    summary = train.main(cfg)
    assert summary["steps"] == 4
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["val/ppl"] > 1.0
    out = capsys.readouterr().out
    assert "validation perplexity" in out and "HYP" in out
