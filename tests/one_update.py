"""One optimizer update of the real TranslationModule, and its reference gradient computed by hand.

Shared by tests/test_update_normalization.py (1 process) and tests/ds_toy_run.py (2 ranks, DDP and DeepSpeed).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from data import TokenBatchSampler, collate_pairs


def one_update_trainer(devices: int, accumulation: int, callback: L.Callback, strategy: Any = "auto") -> L.Trainer:
    """A Trainer that runs exactly one update of `accumulation` micro-batches per rank, in fp32, nothing else."""
    return L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        precision="32-true",
        max_steps=1,
        accumulate_grad_batches=accumulation,
        limit_val_batches=0,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )


def reference_gradient(model, criterion, datamodule, world_size: int, accumulation: int, seed: int):
    """{name: grad} of Σ summed loss / Σ target tokens over ALL micro-batches of the epoch's first update (every
    rank's, rebuilt from the epoch plan), backpropagated through `model` (a copy of the initial weights) in one
    process; and the micro-batches' sizes."""
    train, tok = datamodule.splits["train"], datamodule.tokenizer
    plan = TokenBatchSampler(
        train.src_lengths,
        train.tgt_lengths,
        datamodule.cfg["max_tokens"],
        seed=seed,
        world_size=world_size,
        accumulation=accumulation,
    ).epoch_batches(0)[: world_size * accumulation]
    batches = [collate_pairs([train[i] for i in b], tok.pad_id, tok.bos_id, tok.eos_id) for b in plan]
    total = sum(criterion(model(b["src"], b["tgt_in"]), b["tgt_out"])[0] for b in batches)
    (total / sum(b["n_tgt_tokens"] for b in batches)).backward()
    grads: dict[str, torch.Tensor] = {name: p.grad.clone() for name, p in model.named_parameters()}
    return grads, [len(b["src"]) for b in batches]
