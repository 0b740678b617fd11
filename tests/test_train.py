"""End to end through Lightning: a tiny batch is overfit; a short fit on a Multi30k slice lowers validation loss;
`aiayn train` (one short run and its resumption, shared by the tests after it) reports to the CSV log, W&B and
stdout."""

from __future__ import annotations

import contextlib
import csv as csv_module
import gzip
import io
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
from pipeline.costs import ACCELERATORS, training_flops_per_target_token


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


def _first_pairs(corpora: Path, split: str, n: int) -> list[tuple[str, str]]:
    """The first n (English, German) pairs of a split of a corpora folder's Multi30k, read from its files."""
    sides = []
    for lang in ("en", "de"):
        with gzip.open(corpora / "multi30k" / f"{split}.{lang}.gz", "rt", encoding="utf-8") as f:
            sides.append([next(f).strip() for _ in range(n)])
    return list(zip(*sides, strict=True))


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
            "logger.wandb.enabled=false",  # W&B is checked on the cli_run fixture's run below
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
    # The samples of the last validation are the corpus's first validation pairs with the trained model's greedy
    # translations: decoding each source alone (no batch padding, no decoder cache) gives the same hypothesis.
    assert [(src, ref) for src, ref, _ in module.samples] == _first_pairs(corpora, "val", 2)
    tokenizer = datamodule.tokenizer
    module.model.eval()
    with torch.no_grad():
        for src, _, hyp in module.samples:
            ids = torch.tensor([tokenizer.encode([src])[0] + [tokenizer.eos_id]])
            (tokens,) = greedy_search(module.model, ids, tokenizer.bos_id, tokenizer.eos_id, use_cache=False)
            assert tokens and hyp == tokenizer.decode([tokens])[0], (src, hyp, tokens)
    metrics = (tmp_path / "run" / "logs" / "metrics.csv").read_text()
    for name in ("train/loss", "train/ppl", "train/lr", "train/grad_norm", "train/tgt_tokens_per_sec", "val/ppl"):
        assert name in metrics
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


# --- `aiayn train` end to end, with W&B offline: one 4-step run and its resumption, checked by concern ----------

CLI_ENV = {
    "WANDB_MODE": "offline",
    "WANDB_CONSOLE": "off",  # W&B's stdout capture would hide pytest's own
    "SLURM_JOB_ID": "4242",  # only the W&B group reads it (Lightning's SLURM needs SLURM_NTASKS)
}


def _train_main(overrides: list[str]) -> tuple[dict, str]:
    """train.main under CLI_ENV (and without SLURM_NTASKS): its summary and what it printed."""
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        for name, value in CLI_ENV.items():
            mp.setenv(name, value)
        mp.delenv("SLURM_NTASKS", raising=False)
        with contextlib.redirect_stdout(out):
            summary = train.main(load_config(overrides))
    return summary, out.getvalue()


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory, corpora_dir: Path) -> dict:
    """`aiayn train` with overrides for 4 steps on a 500-pair slice, logging to an offline W&B run. Everything the
    tests read of it is taken before cli_resumed restarts it: the summary, the output, the CSV rows, the W&B run."""
    root = tmp_path_factory.mktemp("cli_train")
    corpora = _slice_multi30k(corpora_dir, root / "corpora", n_train=500, n_valid=50)
    overrides = [
        *TINY_MODEL,
        f"paths.output_dir={root / 'outputs'}",
        f"paths.corpora_dir={corpora}",
        f"run.dir={root / 'run'}",
        "trainer.val_check_interval=4",
        "trainer.log_every_n_steps=2",
        "trainer.enable_progress_bar=false",
        "checkpoint.every_n_train_steps=4",
        "run.n_samples=8",
        "run.val_bleu_sentences=8",  # = n_samples: the samples table holds every sentence BLEU was computed on
        "logger.wandb.tags=[ci]",
        "+secrets.hf_token=hf_do_not_log_me",
    ]
    summary, out = _train_main([*overrides, "trainer.max_steps=4"])
    run_dir = root / "run"
    (wandb_run,) = offline_runs(run_dir)
    return {
        "overrides": overrides,
        "corpora": corpora,
        "run_dir": run_dir,
        "summary": summary,
        "saved": json.loads((run_dir / "summary.json").read_text()),
        "out": out,
        "csv": list(csv_module.DictReader((run_dir / "logs" / "metrics.csv").open())),
        "wandb": wandb_run,
    }


@pytest.fixture(scope="module")
def cli_resumed(cli_run: dict) -> tuple:
    """The same run restarted from its last checkpoint up to step 6 (a requeued job): its W&B runs, (first,
    resumed)."""
    _train_main([*cli_run["overrides"], "trainer.max_steps=6", "run.resume=last"])
    return tuple(offline_runs(cli_run["run_dir"]))


def test_cli_train_trains_and_writes_the_summary(cli_run):
    assert cli_run["summary"]["steps"] == 4
    assert cli_run["saved"]["val/ppl"] > 1.0


def test_cli_train_prints_validation_perplexity_and_samples(cli_run):
    assert "validation perplexity" in cli_run["out"] and "HYP" in cli_run["out"]


def test_wandb_run_is_named_after_the_run_and_grouped_by_the_slurm_job(cli_run):
    run = cli_run["wandb"]
    assert (run.run_id, run.project, run.group, run.tags) == ("run", "aiayn", "4242", ["ci"])


def test_wandb_run_holds_the_config(cli_run):
    config = cli_run["wandb"].config
    assert config["model"]["d_model"] == 64 and config["run"]["val_bleu_sentences"] == 8


def test_wandb_config_redacts_secrets_and_no_wandb_file_holds_them(cli_run):
    assert cli_run["wandb"].config["secrets"]["hf_token"] == "<redacted>"
    for path in (cli_run["run_dir"] / "wandb").rglob("*"):
        assert not path.is_file() or b"hf_do_not_log_me" not in path.read_bytes(), path


def test_wandb_training_metrics_match_the_csv_logger_step_for_step(cli_run):
    run, csv = cli_run["wandb"], cli_run["csv"]
    for key in ("train/loss", "train/ppl", "train/lr", "train/grad_norm", "train/tgt_tokens_per_sec", "train/mfu"):
        logged = [(row["trainer/global_step"], row[key]) for row in run.history if key in row]
        written = [(int(row["step"]), float(row[key])) for row in csv if row.get(key)]
        assert logged and [step for step, _ in logged] == [step for step, _ in written], key
        assert [value for _, value in logged] == pytest.approx([value for _, value in written], rel=1e-6), key


def test_wandb_logs_memory_and_validation_metrics(cli_run):
    for key in ("memory/rss_gb", "memory/peak_rss_gb", "val/loss", "val/ppl", "val/bleu"):
        assert cli_run["wandb"].values(key), key


def test_mfu_implies_flops_per_token_between_shortest_and_longest_sentences(cli_run):
    """MFU = FLOPs per token x tokens/s / peak: the FLOPs per token it implies lie between those of the shortest
    and the longest sentences (pipeline/costs.py's formula, the CPU entry's peak)."""
    model = TransformerConfig.from_dict(OmegaConf.to_container(load_config(cli_run["overrides"]).model, resolve=True))
    counts = Transformer(model).parameter_counts()
    flops = [training_flops_per_target_token(model, counts["encoder"], counts["decoder"], n, n).total for n in (2, 65)]
    rows = [row for row in cli_run["wandb"].history if "train/mfu" in row]
    assert rows
    for row in rows:
        implied = row["train/mfu"] * ACCELERATORS["cpu"].peak_flops / row["train/tgt_tokens_per_sec"]
        assert flops[0] <= implied <= flops[1], (implied, flops)


def test_memory_metrics_are_resident_set_sizes(cli_run):
    """The last RSS is at most the peak, and both lie between 50 MB and the machine's physical memory."""
    run = cli_run["wandb"]
    rss, peak = run.values("memory/rss_gb")[-1], run.values("memory/peak_rss_gb")[-1]
    assert 0.05 < rss <= peak < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def test_samples_table_holds_the_first_validation_pairs_and_their_bleu(cli_run):
    """The samples table: the corpus's first validation pairs, the step, and the greedy hypotheses whose sacreBLEU
    is val/bleu."""
    run = cli_run["wandb"]
    (table_row,) = [row for row in run.history if "val/samples" in row]
    table = run.table(table_row["val/samples"])
    assert table["columns"] == ["src", "ref", "hyp", "step"] and table_row["trainer/global_step"] == 4
    srcs, refs, hyps, steps = zip(*table["data"], strict=True)
    assert list(zip(srcs, refs, strict=True)) == _first_pairs(cli_run["corpora"], "val", 8)
    assert set(steps) == {4}
    (bleu,) = run.values("val/bleu")
    assert bleu == pytest.approx(sacrebleu.corpus_bleu(list(hyps), [list(refs)]).score, abs=1e-9)


def test_resumed_run_appends_to_the_same_wandb_run(cli_resumed):
    first, resumed = cli_resumed
    assert resumed.run_id == first.run_id == "run" and resumed.resume and resumed.group == "4242"


def test_resumed_run_logs_training_metrics_after_the_checkpoints_step(cli_resumed):
    """Lightning logs an update's training metrics at the count of updates BEFORE it (_batches_that_stepped), so
    with log_every_n_steps=2 updates 2 and 4 appear at steps 1 and 3, and the resumed run's update 6 at step 5."""
    first, resumed = cli_resumed
    trained = [row["trainer/global_step"] for row in first.history if "train/loss" in row]
    assert trained == [1, 3] and max(first.values("trainer/global_step")) == 4
    assert [row["trainer/global_step"] for row in resumed.history if "train/loss" in row] == [5]
