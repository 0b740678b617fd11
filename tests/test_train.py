"""End to end through Lightning: a short fit on a Multi30k slice lowers validation loss; a tiny batch is overfit."""

from __future__ import annotations

import csv as csv_module
import gzip
import json
import os
from pathlib import Path

import lightning as L
import pytest
import sacrebleu
import torch
from omegaconf import OmegaConf
from tiny_run import TINY_MODEL
from wandb_records import offline_runs

from data import TranslationDataModule
from modules.config import TransformerConfig
from modules.lightning import TranslationModule
from modules.loss import LabelSmoothedCrossEntropy
from modules.search import greedy_search
from modules.transformer import Transformer
from pipeline import train
from pipeline.config import load_config
from pipeline.plan import ACCELERATORS, training_flops_per_target_token


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
            "logger.wandb.enabled=false",  # W&B is test_cli_train_runs_and_reports's
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


def test_cli_train_runs_and_reports(tmp_path, corpora_dir, capsys, monkeypatch):
    """`aiayn train` with overrides: trains, writes summary.json with validation perplexity, prints samples; logs
    every dashboard metric to an offline W&B run (read back from its files), grouped by the SLURM job, with the
    config's secrets redacted; a resumed run appends to the same W&B run."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # W&B's stdout capture would hide pytest's own
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # only the W&B group reads it (Lightning's SLURM needs SLURM_NTASKS)
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    corpora = _slice_multi30k(corpora_dir, tmp_path / "corpora", n_train=500, n_valid=50)
    overrides = [
        *TINY_MODEL,
        f"paths.output_dir={tmp_path / 'outputs'}",
        f"paths.corpora_dir={corpora}",
        f"run.dir={tmp_path / 'run'}",
        "trainer.val_check_interval=4",
        "trainer.log_every_n_steps=2",
        "trainer.enable_progress_bar=false",
        "checkpoint.every_n_train_steps=4",
        "run.n_samples=8",
        "run.val_bleu_sentences=8",  # = n_samples: the samples table holds every sentence BLEU was computed on
        "logger.wandb.tags=[ci]",
        "+secrets.hf_token=hf_do_not_log_me",
    ]
    summary = train.main(load_config([*overrides, "trainer.max_steps=4"]))
    assert summary["steps"] == 4
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["val/ppl"] > 1.0
    out = capsys.readouterr().out
    assert "validation perplexity" in out and "HYP" in out

    (run,) = offline_runs(tmp_path / "run")
    assert (run.run_id, run.project, run.group, run.tags) == ("run", "aiayn", "4242", ["ci"])
    assert run.config["model"]["d_model"] == 64 and run.config["run"]["val_bleu_sentences"] == 8
    assert run.config["secrets"]["hf_token"] == "<redacted>"
    for path in (tmp_path / "run" / "wandb").rglob("*"):
        assert not path.is_file() or b"hf_do_not_log_me" not in path.read_bytes(), path

    # W&B holds what the CSV logger wrote, step for step.
    csv = list(csv_module.DictReader((tmp_path / "run" / "logs" / "metrics.csv").open()))
    for key in ("train/loss", "train/ppl", "train/lr", "train/grad_norm", "train/tgt_tokens_per_sec", "train/mfu"):
        logged = [(row["trainer/global_step"], row[key]) for row in run.history if key in row]
        written = [(int(row["step"]), float(row[key])) for row in csv if row.get(key)]
        assert logged and [step for step, _ in logged] == [step for step, _ in written], key
        assert [value for _, value in logged] == pytest.approx([value for _, value in written], rel=1e-6), key
    for key in ("memory/rss_gb", "memory/peak_rss_gb", "val/loss", "val/ppl", "val/bleu"):
        assert run.values(key), key

    # MFU = FLOPs per token x tokens/s / peak: the FLOPs per token it implies lie between those of the shortest
    # and the longest sentences (pipeline/plan.py's formula, this CPU's peak).
    model = TransformerConfig.from_dict(OmegaConf.to_container(load_config(overrides).model, resolve=True))
    counts = Transformer(model).parameter_counts()
    flops = [training_flops_per_target_token(model, counts["encoder"], counts["decoder"], n, n).total for n in (2, 65)]
    for row in run.history:
        if "train/mfu" in row:
            implied = row["train/mfu"] * ACCELERATORS["cpu"].peak_flops / row["train/tgt_tokens_per_sec"]
            assert flops[0] <= implied <= flops[1], (implied, flops)
    rss, peak = run.values("memory/rss_gb")[-1], run.values("memory/peak_rss_gb")[-1]
    assert 0.05 < rss <= peak < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9

    # The samples table: the first validation pairs of the corpus, the step, and the greedy hypotheses whose
    # sacreBLEU is val/bleu.
    (table_row,) = [row for row in run.history if "val/samples" in row]
    table = run.table(table_row["val/samples"])
    assert table["columns"] == ["src", "ref", "hyp", "step"] and table_row["trainer/global_step"] == 4
    srcs, refs, hyps, steps = zip(*table["data"], strict=True)
    for lang, lines in (("en", srcs), ("de", refs)):
        with gzip.open(corpora / "multi30k" / f"val.{lang}.gz", "rt", encoding="utf-8") as f:
            assert list(lines) == [next(f).strip() for _ in range(8)]
    assert set(steps) == {4}
    (bleu,) = run.values("val/bleu")
    assert bleu == pytest.approx(sacrebleu.corpus_bleu(list(hyps), [list(refs)]).score, abs=1e-9)

    # A restart from the last checkpoint (a requeued job) reopens the same W&B run and carries on after step 4.
    train.main(load_config([*overrides, "trainer.max_steps=6", "run.resume=last"]))
    first, resumed = offline_runs(tmp_path / "run")
    assert resumed.run_id == first.run_id == "run" and resumed.resume and resumed.group == "4242"
    # Lightning logs an update's training metrics at the count of updates BEFORE it (_batches_that_stepped), so
    # with log_every_n_steps=2 updates 2 and 4 appear at steps 1 and 3, and the resumed run's update 6 at step 5.
    trained = [row["trainer/global_step"] for row in first.history if "train/loss" in row]
    assert trained == [1, 3] and max(first.values("trainer/global_step")) == 4
    assert [row["trainer/global_step"] for row in resumed.history if "train/loss" in row] == [5]
