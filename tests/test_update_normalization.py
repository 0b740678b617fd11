"""The loss of an optimizer update is normalized by the target tokens of the WHOLE update (fairseq's rule).

With W ranks and A accumulated micro-batches, the gradient Lightning applies must equal
    Σ_(micro-batches b of the update) ∇ loss_sum(b) / N,   N = Σ_b target tokens(b),
whatever W and A are. The reference here is that formula, computed by hand on a copy of the model; the
multi-process cases (DDP with 2 ranks, DeepSpeed with accumulation) are checked in tests/test_deepspeed_cpu.py.
"""

from __future__ import annotations

import copy

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from one_update import one_update_trainer, reference_gradient

from data import TokenBatchSampler, TranslationDataModule
from modules.lightning import TranslationModule
from pipeline.config import load_config

TINY = ["model.n_layers=1", "model.d_model=32", "model.d_ff=64", "model.n_heads=2", "model.vocab_size=400"]


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
@pytest.mark.parametrize("accumulation", [1, 2, 3])
def test_every_batch_knows_its_updates_target_tokens(world_size, accumulation):
    rng = np.random.default_rng(0)
    src, tgt = rng.integers(1, 60, 3000), rng.integers(1, 60, 3000)
    samplers = [
        TokenBatchSampler(src, tgt, max_tokens=400, seed=5, rank=r, world_size=world_size, accumulation=accumulation)
        for r in range(world_size)
    ]
    for s in samplers:
        s.set_epoch(2)
    per_rank = [list(s.with_update_tokens()) for s in samplers]
    n = len(per_rank[0])
    assert n % accumulation == 0 and all(len(batches) == n for batches in per_rank)
    assert sorted(i for batches in per_rank for b, _ in batches for i in b) == list(range(3000))
    for u in range(n // accumulation):
        # all ranks' micro-batches of update u, counted directly: each target plus its eos
        micro = [per_rank[r][u * accumulation + a] for r in range(world_size) for a in range(accumulation)]
        expected = sum(int(tgt[i]) + 1 for batch, _ in micro for i in batch)
        assert {tokens for _, tokens in micro} == {expected}


def test_accumulated_gradient_is_the_update_mean_over_all_its_tokens(tmp_path, corpora_dir):
    overrides = [*TINY, "model.dropout=0.0", "data=tiny", f"paths.corpora_dir={corpora_dir}", "data.max_tokens=96"]
    cfg = load_config(overrides)
    L.seed_everything(0)
    module = TranslationModule(
        model=OmegaConf.to_container(cfg.model, resolve=True), optim=OmegaConf.to_container(cfg.optim, resolve=True)
    )
    reference = copy.deepcopy(module.model)
    datamodule = TranslationDataModule(cfg.data, tmp_path / "out", seed=3, accumulation=3)

    grads = {}

    class Capture(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads.update({n: p.grad.clone() for n, p in pl_module.model.named_parameters()})

    trainer = one_update_trainer(devices=1, accumulation=3, callback=Capture())
    trainer.fit(module, datamodule=datamodule)

    # the reference: the epoch's first three batches, summed losses over all their tokens, in one backward
    expected, sizes = reference_gradient(reference, module.criterion, datamodule, 1, 3, seed=3)
    assert len(set(sizes)) > 1  # micro-batches of different sizes: a plain mean of means would differ
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
