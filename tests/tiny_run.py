"""A tiny trained-looking run for the stages after training (`aiayn average`, `evaluate`, `translate`,
`attention`): data=tiny (Multi30k val as training text) with its test split cut to the first N_TEST pairs,
prepared, and checkpoints made by hand (snapshots of a short fit, saved in Lightning's checkpoint layout) instead
of trained.

The fixtures `tiny` and `hand_made_run` (tests/conftest.py) build them once per test session.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf

from data import prepare_dataset
from modules.lightning import TranslationModule
from pipeline.config import load_config

# The tiny Transformer of the tests that train or decode through the config (tests/test_train.py, SLURM jobs, ...).
TINY_MODEL = ["model.n_layers=2", "model.d_model=64", "model.d_ff=128", "model.n_heads=4", "model.vocab_size=400"]
N_TEST = 40
STEPS = (100, 200, 300)  # global steps the hand-made checkpoints claim
SNAPSHOT_EVERY = 20  # Adam steps between them


def make_tiny(root: Path, corpora_dir: Path) -> dict:
    """data=tiny with its test split cut to the first N_TEST pairs, prepared under root/out."""
    corpora = root / "corpora" / "multi30k"
    corpora.mkdir(parents=True)
    for lang in ("en", "de"):
        shutil.copy(corpora_dir / "multi30k" / f"val.{lang}.gz", corpora / f"val.{lang}.gz")
        with gzip.open(corpora_dir / "multi30k" / f"test_2016_flickr.{lang}.gz", "rt", encoding="utf-8") as f:
            lines = [next(f) for _ in range(N_TEST)]
        with gzip.open(corpora / f"test_2016_flickr.{lang}.gz", "wt", encoding="utf-8") as f:
            f.writelines(lines)
    overrides = [*TINY_MODEL, "data=tiny", f"paths.corpora_dir={corpora.parent}", f"paths.output_dir={root / 'out'}"]
    cfg = load_config(overrides)
    dataset_dir = prepare_dataset(cfg.data, root / "out")
    return {"root": root, "overrides": overrides, "cfg": cfg, "corpora": corpora, "dataset_dir": dataset_dir}


def new_module(cfg, seed: int) -> TranslationModule:
    torch.manual_seed(seed)
    return TranslationModule(
        model=OmegaConf.to_container(cfg.model, resolve=True), optim=OmegaConf.to_container(cfg.optim, resolve=True)
    )


def save_checkpoint(module: TranslationModule, step: int, path: Path) -> None:
    """The entries Lightning's checkpoint holds that averaging and evaluation read (no optimizer/loop states)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {
        "epoch": 0,
        "global_step": step,
        "pytorch-lightning_version": L.__version__,
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
    }
    torch.save(checkpoint, path)


def make_hand_made_run(tiny: dict, run: Path) -> dict:
    """A run folder as `aiayn train` leaves it: step checkpoints at STEPS and last.ckpt, a copy of the newest.

    The weights are snapshots of a short fit (SNAPSHOT_EVERY Adam steps apart, on the tiny training split), so
    that the model translates into varied, scoreable German rather than one repeated token.
    """
    from data import ShardedPairs, collate_pairs

    module = new_module(tiny["cfg"], 0)
    train_pairs = ShardedPairs(tiny["dataset_dir"], "train")
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3, betas=(0.9, 0.98), eps=1e-9)
    generator = torch.Generator().manual_seed(0)
    states = {}
    for step in range(1, len(STEPS) * SNAPSHOT_EVERY + 1):
        indices = torch.randint(len(train_pairs), (32,), generator=generator).tolist()
        batch = collate_pairs([train_pairs[i] for i in indices], pad_id=0, bos_id=2, eos_id=3)
        loss_sum, _ = module.criterion(module(batch["src"], batch["tgt_in"]), batch["tgt_out"])
        optimizer.zero_grad()
        (loss_sum / batch["n_tgt_tokens"]).backward()
        optimizer.step()
        if step % SNAPSHOT_EVERY == 0:
            global_step = STEPS[step // SNAPSHOT_EVERY - 1]
            save_checkpoint(module, global_step, run / "checkpoints" / f"step{global_step:07d}.ckpt")
            states[global_step] = {k: v.detach().clone() for k, v in module.state_dict().items()}
    shutil.copy(run / "checkpoints" / f"step{STEPS[-1]:07d}.ckpt", run / "checkpoints" / "last.ckpt")
    return {"run": run, "states": states}
