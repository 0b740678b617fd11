"""Where a training update's time goes, and how close it is to this CPU's bf16 matmul ceiling (issue 6).

For each model (small; base with the paper's 37k vocabulary) in bf16-mixed, runs the training step on real
Multi30k token batches (the data module's own sampler and collation, as `aiayn train` uses them) with 4096 tokens
per batch (the paper's batches hold 25,000 per side; vs_fairseq.py gives the base model 1024 to keep fairseq's fp32
run short, but matmuls that small measure the batch, not the pipeline). First --steps updates are timed as they
run in training, for the model FLOPs utilization: training FLOPs from pipeline/costs.py's formula at the batches'
real lengths, per second, over the bf16 matmul peak measured in the same run. Then --steps more run under the torch
profiler, with one `record_function` range per phase:
  data       next batch from the DataLoader (sampling, collation)
  forward    the model and the label-smoothed loss under bf16 autocast (TranslationModule.batch_losses)
  backward   loss.backward()
  optimizer  Adam step, schedule and zero_grad
  logging    reading the loss back to the host (what a progress bar does every update)
for each phase's share of the time and the ten most expensive operators (the profiler's own cost is why the MFU is
not taken from these). Also the padding efficiency of the batches (real tokens / padded tokens, source and target,
of the profiled batches and of a whole epoch's).
Writes bench/step_profile.json (or --out).

    .venv/bin/python bench/step_profile.py [--models small base] [--steps 20] [--warmup N (default: one epoch)]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.host import set_torch_environment  # noqa: E402

set_torch_environment()  # as `aiayn` does, before torch is imported (pipeline/host.py)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402
from train_throughput import CONFIGS, matmul_gflops  # noqa: E402  (bench/ is first on sys.path)

from data import TranslationDataModule  # noqa: E402
from pipeline.config import load_config, output_dir  # noqa: E402
from pipeline.costs import training_flops_per_target_token  # noqa: E402
from pipeline.host import reuse_freed_memory  # noqa: E402
from pipeline.train import build_module  # noqa: E402

PHASES = ("data", "forward", "backward", "optimizer", "logging")
MAX_TOKENS = 4096  # padded tokens per batch, both models


def epoch_padding(sampler, pairs) -> dict[str, float]:  # noqa: ANN001
    """Real tokens / padded tokens over all of one epoch's batches (the profiled ones are a sample), per side and
    both together; lengths with the eos/bos that collation adds."""
    real, padded = {"src": 0, "tgt": 0}, {"src": 0, "tgt": 0}
    for side, lengths in (("src", pairs.src_lengths), ("tgt", pairs.tgt_lengths)):
        lengths = np.asarray(lengths) + 1
        for batch in sampler.epoch_batches(0):
            real[side] += int(lengths[batch].sum())
            padded[side] += len(batch) * int(lengths[batch].max())
    result = {side: round(real[side] / padded[side], 3) for side in real}
    result["both"] = round(sum(real.values()) / sum(padded.values()), 3)
    return result


def epochs(loader, sampler) -> Iterator[dict]:  # noqa: ANN001
    """The training batches of epoch 0, 1, 2, ... as Lightning's loop feeds them (a new shuffle each epoch)."""
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        yield from loader


def profile_model(name: str, steps: int, warmup: int | None) -> dict:
    max_tokens = MAX_TOKENS
    cfg = load_config([*CONFIGS[name], f"data.max_tokens={max_tokens}"])
    datamodule = TranslationDataModule(cfg.data, output_dir(cfg), seed=cfg.seed)
    datamodule.prepare_data()
    datamodule.setup("fit")
    module = build_module(cfg)  # as `aiayn train` builds it (pipeline/train.py)
    optimizers = module.configure_optimizers()  # Adam and Eq. 3 as training configures them (optim.fused_adam)
    optimizer, scheduler = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    loader = datamodule.train_dataloader()
    batches = epochs(loader, loader.batches)
    counts = module.model.parameter_counts()
    real = {"src": 0, "tgt": 0}
    padded = {"src": 0, "tgt": 0}
    flops = 0.0

    def update(measure: bool) -> None:
        nonlocal flops
        with record_function("data"):
            batch = next(batches)
        with record_function("forward"), torch.autocast("cpu", dtype=torch.bfloat16):
            loss_sum, _, n_tokens = module.batch_losses(batch)
            loss = loss_sum / n_tokens
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        with record_function("logging"):
            loss.item()
        if measure:
            sentences = batch["src"].size(0)
            n_src, n_tgt = int(batch["src"].ne(0).sum()), int(batch["tgt_out"].ne(0).sum())
            real["src"], real["tgt"] = real["src"] + n_src, real["tgt"] + n_tgt
            padded["src"] += batch["src"].numel()
            padded["tgt"] += batch["tgt_out"].numel()
            per_token = training_flops_per_target_token(
                module.model.cfg, counts["encoder"], counts["decoder"], n_src / sentences, n_tgt / sentences
            ).total
            flops += per_token * n_tgt

    if warmup is None:  # one epoch: every batch shape of the run has been seen
        warmup = len(loader)
    for _ in range(warmup):
        update(False)
    start = time.perf_counter()
    for _ in range(steps):
        update(True)
    wall = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            update(False)
    events = prof.key_averages()
    phase_us = {e.key: e.cpu_time_total for e in events if e.key in PHASES}
    total_us = sum(phase_us.values())
    top = sorted((e for e in events if e.key not in PHASES), key=lambda e: e.self_cpu_time_total, reverse=True)
    return {
        "max_tokens": max_tokens,
        "warmup_updates": warmup,
        "steps": steps,
        "seconds_per_update": round(wall / steps, 3),
        "target_tokens_per_sec": round(real["tgt"] / wall),
        "phase_share": {k: round(phase_us.get(k, 0) / total_us, 3) for k in PHASES},
        "top_ops_self_cpu_share": {e.key: round(e.self_cpu_time_total / total_us, 3) for e in top[:10]},
        "model_tflops_per_sec": round(flops / wall / 1e12, 3),
        "padding_efficiency": {k: round(real[k] / padded[k], 3) for k in real},
        "padding_efficiency_epoch": epoch_padding(loader.batches, datamodule.splits["train"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=20)
    # Untimed updates first, by default a whole epoch: the steady state of a run is after every batch shape has been
    # seen. Until then a batch of a new shape makes oneDNN generate new matmul kernels (about 4 ms per matmul shape,
    # some 25 per update; host.py keeps them all cached) and makes the heap grow (new blocks, faulted in on first
    # touch). Multi30k has 107 batches of 4096 tokens per epoch but only 39 source and 38 target shapes.
    parser.add_argument("--warmup", type=int, default=None, help="untimed updates first (default: one epoch)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("step_profile.json"))
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    reuse_freed_memory()  # as `aiayn train` does
    # The ceiling MFU is measured against: the better of before and after the models (so a slow moment of this
    # shared machine cannot lower it and flatter the MFU).
    peak_before = matmul_gflops(torch.bfloat16) * 1e9
    models = {name: profile_model(name, args.steps, args.warmup) for name in args.models}
    peak = max(peak_before, matmul_gflops(torch.bfloat16) * 1e9)
    for result in models.values():
        result["mfu"] = round(result["model_tflops_per_sec"] * 1e12 / peak, 3)
    report = {
        "what": "bf16-mixed training update: MFU, time per phase (torch profiler), top operators, padding",
        "command": "python bench/step_profile.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "bf16_matmul_peak_tflops": round(peak / 1e12, 3),
        "models": models,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
