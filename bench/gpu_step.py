"""The training step on one CUDA GPU: this project's, as `aiayn train` runs it, beside a plain `torch.nn.Transformer`
on the same batches, and the Lightning loop's own throughput (issue 17, point 3).

For each model (base, big: conf/model/, the paper's 37k tied vocabulary) at about 25,000 target tokens per update,
bf16 autocast over float32 weights, fused Adam with the Eq. 3 schedule, every row on the IDENTICAL batches:
  kernels=K compile=C   this project's step: modules.lightning.TranslationModule(kernels=K, compile=C), then
                        use_device (the device's kernels and torch.compile, modules/kernels.py), the optimizer and
                        schedule of configure_optimizers(), one update = batch_losses under autocast, (loss_sum /
                        n_tokens).backward(), optimizer and scheduler step, zero_grad. Default rows (--variants):
                        cuda:auto (what `aiayn train` runs on a GPU: compiled), cuda:false (eager), plain:false
                        (the paper's formulas as written, eager: the earlier H200 note's "fused_loss false" row)
  peer                  torch.nn.Transformer (batch_first, same d_model/heads/layers/d_ff/dropout; SDPA inside) with
                        a tied embedding x sqrt(d_model) + sinusoidal positions, the output projection by the
                        embedding and F.cross_entropy(logits.float(), label_smoothing, ignore_index=pad, sum), the
                        same Adam (fused, betas 0.9/0.98, eps 1e-9) and schedule, eager
Per row: seconds per update (median of --steps timed updates after --warmup untimed ones, the device synchronized
around each; the warm-up's duration, torch.compile included, is reported apart), target tokens/s, model TFLOP/s
(pipeline/costs.py's training FLOPs per target token at each batch's mean lengths) and MFU against (a) the bf16
matmul peak measured in the same run (best of several 8192^3 matmuls, before and after the rows) and (b) the
datasheet peak of pipeline/costs.py's ACCELERATORS for this device's name; peak device memory of the row
(max_memory_allocated, everything freed between rows); tokens/s relative to the peer of the same model; the loss
per target token of the first update (same seed and first batch for every row: the project's rows agree to bf16
precision where they draw the same dropout masks; compiled code draws its own, and the peer has its own weights).

Batches are synthetic token ids in [4, vocab) as data/collate.py lays them out (src ends with eos, tgt_in starts
with bos, tgt_out ends with eos, pad 0): --lengths fixed (default), the earlier H200 measurement's 893 sentences x
27 source / 28 target tokens = 25,004 target tokens, no padding; --lengths variable, --batches batches of ~25,000
target tokens each, sentence lengths uniform within a band of 9 lengths per batch, the bands spread over 10..44
(length-bucketed, as data/batching.py groups sentences), padded to each batch's longest: new shapes every update,
what compile's dynamic shapes must handle. Batches are cycled.

Then, unless --train-steps 0, the Lightning loop itself: a short `python -m pipeline train` (aiayn train) in a
subprocess on the same GPU for each of --train-models, with the first --variants row's kernels and compile, on
Multi30k (data=multi30k, the default; CORPORA_DIR and AIAYN_OUTPUT_DIR are passed through) with data.max_tokens=
25000 (padded tokens per batch: Multi30k's captions are short, so these batches hold fewer target tokens than the
synthetic ones; the JSON says what they were) and the default experiment's 8k Multi30k BPE, the model's vocabulary
set to it (the run's bare step is measured again at that vocabulary for the comparison). Its
`train/tgt_tokens_per_sec` is read from <run.dir>/logs/metrics.csv: the median of the last half of the logged values
(the first ones include compilation), and set beside the bare step's figure.

Writes bench/gpu_step.json (or --out), after every row, so a run cut short keeps what it measured. Needs one CUDA
GPU; the environment is the project's (`make setup`, or the project folder on PYTHONPATH):

    python bench/gpu_step.py [--models base big] [--variants cuda:auto cuda:false plain:false] [--steps 20]
                             [--warmup N] [--lengths fixed|variable] [--train-steps 300] [--train-models base]
    make bench-gpu ARGS="--lengths variable"

`--device cpu --smoke` runs the same code on the CPU with a tiny model (1 layer, d_model 32, vocab 200, ~200-token
batches, 2 + 2 updates, rows cuda:false, plain:false and the peer, MFU against the `cpu` entry, no memory figure, no
training run): what the test suite runs (tests/test_gpu_step.py). It writes only to --out (without it, it prints).
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.host import set_torch_environment  # noqa: E402

set_torch_environment()  # as `aiayn` does, before torch is imported (pipeline/host.py)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch import nn  # noqa: E402

from data.collate import collate_pairs  # noqa: E402
from data.tokenizer import BOS_ID, EOS_ID, PAD_ID  # noqa: E402
from modules.config import TransformerConfig  # noqa: E402
from modules.kernels import CHOICES as KERNEL_CHOICES  # noqa: E402
from modules.lightning import TranslationModule  # noqa: E402
from modules.schedule import inverse_sqrt_scheduler  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.costs import ACCELERATORS, accelerator_for_device_name, training_flops_per_target_token  # noqa: E402
from pipeline.params import count_parameters  # noqa: E402

MODELS = {
    "base": ["model=base"],  # 37k vocabulary, as conf/model/base.yaml has it
    "big": ["model=big"],
    # --smoke's model: the same code in seconds on a CPU
    "tiny": ["model=small", "model.n_layers=1", "model.d_model=32", "model.d_ff=64", "model.n_heads=2"]
    + ["model.vocab_size=200"],
}
DEFAULT_VARIANTS = ["cuda:auto", "cuda:false", "plain:false"]
FIXED_SHAPE = (893, 27, 28)  # sentences, source and target tokens (with eos/bos): 25,004 target tokens
TARGET_TOKENS = 25_000
LENGTHS = (10, 44)  # --lengths variable: shortest and longest sentence (tokens with eos)
BAND = 9  # --lengths variable: lengths per batch's band
SMOKE = {
    "models": ["tiny"],
    "variants": ["cuda:false", "plain:false"],
    "steps": 2,
    "warmup": 2,
    "train_steps": 0,
    "fixed_shape": (8, 24, 25),  # 200 target tokens
    "target_tokens": 200,
    "matmul_n": 256,
}
MULTI30K_VOCAB = 8000  # the BPE the Lightning loop's run reads: the default experiment's, not the paper's 37k
GB = 1e9


def significant(x: float, digits: int = 4) -> float:
    """x to `digits` significant digits (the smoke run's figures are millions of times smaller than a GPU's)."""
    return float(f"{x:.{digits}g}")


# -- device --------------------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timing on an asynchronous device); nothing to wait for on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float | None:
    """Peak memory allocated by tensors since the last reset, in 10^9 bytes; None where it is not tracked (CPU)."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / GB, 2)
    return None


def release(device: torch.device) -> None:
    """Free what the last row left: compiled graphs, unreachable objects, the allocator's cached blocks."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def datasheet_key(device: torch.device) -> str | None:
    """The ACCELERATORS key of this device (pipeline/costs.py), None if the table has no entry for it."""
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda":
        return accelerator_for_device_name(torch.cuda.get_device_name(device))
    return None


def matmul_peak_flops(device: torch.device, n: int, repeats: int = 10, inner: int = 10) -> float:
    """Best FLOP/s of bf16 n x n x n matmuls on `device`, measured now: the ceiling the MFU is taken against.

    Each measurement times `inner` matmuls between two synchronizations (one 8192^3 matmul takes ~1.5 ms on an H100
    class GPU, short enough for the synchronization itself to show); the best of `repeats` measurements, after
    warm-up ones (kernel selection, clocks)."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    for _ in range(3):
        a @ b
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            a @ b
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / inner)
    del a, b
    return 2 * n**3 / best


# -- batches -------------------------------------------------------------------------------------------------------
def make_batches(
    lengths: str, count: int, vocab: int, fixed_shape: tuple[int, int, int], target_tokens: int, seed: int
) -> list[dict]:
    """Synthetic token batches laid out by data.collate.collate_pairs (see the module docstring)."""
    rng = np.random.default_rng(seed)
    batches = []
    for i in range(count):
        if lengths == "fixed":
            sentences, src_len, tgt_len = fixed_shape
            src_lengths, tgt_lengths = [src_len] * sentences, [tgt_len] * sentences
        else:  # one band of lengths per batch, the bands spread over LENGTHS
            low, high = LENGTHS
            start = low + round(i * (high - low - BAND + 1) / max(count - 1, 1))
            tgt_lengths, total = [], 0
            while total < target_tokens:
                tgt_lengths.append(int(rng.integers(start, start + BAND)))
                total += tgt_lengths[-1]
            # A source about as long as its target, as in a parallel corpus.
            src_lengths = [max(2, t + int(rng.integers(-3, 4))) for t in tgt_lengths]
        # Lengths count the eos (source, tgt_out) / bos (tgt_in) that collation adds.
        pairs = [
            (rng.integers(4, vocab, s - 1), rng.integers(4, vocab, t - 1))
            for s, t in zip(src_lengths, tgt_lengths, strict=True)
        ]
        batches.append(collate_pairs(pairs, PAD_ID, BOS_ID, EOS_ID))
    return batches


def describe_batches(batches: list[dict], lengths: str) -> dict:
    return {
        "lengths": lengths,
        "count": len(batches),
        "layout": "data.collate.collate_pairs: src = ids + eos, tgt_in = bos + ids, tgt_out = ids + eos; pad 0; "
        "ids uniform in [4, vocab)",
        "sentences": [int(b["src"].size(0)) for b in batches],
        "src_padded_len": [int(b["src"].size(1)) for b in batches],
        "tgt_padded_len": [int(b["tgt_out"].size(1)) for b in batches],
        "target_tokens": [int(b["n_tgt_tokens"]) for b in batches],
        "source_tokens": [int(b["n_src_tokens"]) for b in batches],
        "padding_efficiency": round(
            sum(b["n_src_tokens"] + b["n_tgt_tokens"] for b in batches)
            / sum(b["src"].numel() + b["tgt_out"].numel() for b in batches),
            3,
        ),
    }


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# -- the peer ------------------------------------------------------------------------------------------------------
class PeerTransformer(nn.Module):
    """What a user writes in an afternoon from PyTorch's own layers: torch.nn.Transformer (post-LN, SDPA inside)
    between one embedding, scaled by sqrt(d_model) and shared by source, target and the output projection, plus
    sinusoidal positions and dropout on their sum. Masks as the project's model has them: source padding for the
    encoder's and the cross attention's keys, causal for the decoder's self-attention."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        if not (cfg.share_embeddings and cfg.positional == "sinusoidal" and cfg.norm == "post"):
            raise ValueError("the peer is the paper's base/big layout: tied embeddings, sinusoids, post-LN")
        self.pad_id, self.scale = cfg.pad_id, math.sqrt(cfg.d_model)
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        nn.init.normal_(self.embedding.weight, mean=0.0, std=cfg.d_model**-0.5)
        with torch.no_grad():
            self.embedding.weight[cfg.pad_id].zero_()
        position = torch.arange(cfg.max_positions, dtype=torch.float32)[:, None]
        angle = position / 10000.0 ** (torch.arange(0, cfg.d_model, 2, dtype=torch.float32) / cfg.d_model)
        table = torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(1)  # sin on even, cos on odd dimensions
        self.register_buffer("positions", table, persistent=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.transformer = nn.Transformer(
            d_model=cfg.d_model,
            nhead=cfg.n_heads,
            num_encoder_layers=cfg.n_layers,
            num_decoder_layers=cfg.n_layers,
            dim_feedforward=cfg.d_ff,
            dropout=cfg.dropout,
            batch_first=True,
        )

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.embedding(tokens) * self.scale + self.positions[: tokens.size(1)])

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        src_padding = src.eq(self.pad_id)
        length = tgt_in.size(1)
        causal = torch.ones(length, length, dtype=torch.bool, device=tgt_in.device).triu(1)
        hidden = self.transformer(
            self.embed(src),
            self.embed(tgt_in),
            tgt_mask=causal,
            src_key_padding_mask=src_padding,
            memory_key_padding_mask=src_padding,
            tgt_is_causal=True,
        )
        return F.linear(hidden, self.embedding.weight)


# -- rows ----------------------------------------------------------------------------------------------------------
Step = Callable[[dict], torch.Tensor]


def parse_variant(text: str) -> tuple[str, bool | str]:
    """'cuda:auto' -> ('cuda', 'auto'); 'plain:false' -> ('plain', False)."""
    kernels, _, compile_ = text.partition(":")
    choices = {"auto": "auto", "true": True, "false": False}
    if kernels not in KERNEL_CHOICES or compile_.lower() not in choices:
        raise argparse.ArgumentTypeError(
            f"{text!r}: a variant is KERNELS:COMPILE, kernels one of {'|'.join(KERNEL_CHOICES)}, compile one of "
            "auto|true|false, e.g. cuda:auto or plain:false"
        )
    return kernels, choices[compile_.lower()]


def variant_name(kernels: str, compile_: bool | str) -> str:
    return f"kernels={kernels} compile={str(compile_).lower()}"


def update(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler) -> torch.Tensor:  # noqa: ANN001
    """One optimizer update from the mean loss per target token, as Lightning's loop runs it; returns the loss."""
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def project_row(cfg, kernels: str, compile_: bool | str, device: torch.device) -> tuple[Step, dict]:  # noqa: ANN001
    """This project's training step as `aiayn train` runs it (module docstring)."""
    module = TranslationModule(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        n_samples=0,
        kernels=kernels,
        compile=compile_,
    )
    module.use_device(device)
    module.to(device)
    module.train()
    optimizers = module.configure_optimizers()  # fused Adam (optim.fused_adam), Eq. 3
    optimizer, scheduler = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]

    def step(batch: dict) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss_sum, _, n_tokens = module.batch_losses(batch)
        return update(loss_sum / n_tokens, optimizer, scheduler)

    facts = {
        "kernels": kernels,
        "compile": compile_,
        "kernels_used": module.model.kernels.name,
        "compiled": module.features != module.model.features,  # a bound method equals another of the same
        "optimizer": f"Adam fused={optimizer.defaults.get('fused')}, Eq. 3 schedule",
    }
    return step, facts


def peer_row(cfg, device: torch.device) -> tuple[Step, dict]:  # noqa: ANN001
    """The plain torch.nn.Transformer peer (PeerTransformer) with F.cross_entropy and the same optimizer."""
    model_cfg = TransformerConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    model = PeerTransformer(model_cfg).to(device)
    model.train()
    optim = cfg.optim
    optimizer = torch.optim.Adam(model.parameters(), lr=1.0, betas=tuple(optim.betas), eps=optim.eps, fused=True)
    scheduler = inverse_sqrt_scheduler(optimizer, model_cfg.d_model, optim.warmup_steps, optim.get("lr_scale", 1.0))
    pad, smoothing = model_cfg.pad_id, float(optim.label_smoothing)

    def step(batch: dict) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(batch["src"], batch["tgt_in"])
            loss_sum = F.cross_entropy(
                logits.float().flatten(0, 1),
                batch["tgt_out"].flatten(),
                label_smoothing=smoothing,
                ignore_index=pad,
                reduction="sum",
            )
        return update(loss_sum / batch["tgt_out"].ne(pad).sum(), optimizer, scheduler)

    facts = {
        "what": "torch.nn.Transformer (batch_first, SDPA) + tied embedding x sqrt(d_model) + sinusoids, "
        "F.cross_entropy(logits.float(), label_smoothing, ignore_index=pad, reduction=sum), eager",
        "params": sum(p.numel() for p in model.parameters()),
        "optimizer": "Adam fused=True, Eq. 3 schedule",
    }
    return step, facts


def measure(
    build: Callable[[], tuple[Step, dict]],
    batches: list[dict],
    flops_per_token: list[float],
    warmup: int,
    steps: int,
    device: torch.device,
    seed: int,
) -> dict:
    """Build a row's model and optimizer, run `warmup` untimed then `steps` timed updates over the batches in
    turn (from the first), and return its figures (all but those relative to peaks and the peer)."""
    release(device)
    reset_peak_memory(device)
    torch.manual_seed(seed)  # the same weights for every project row
    step, facts = build()
    torch.manual_seed(seed + 1)  # the same dropout masks where the same kernels draw them
    losses: list[torch.Tensor] = []
    synchronize(device)
    start = time.perf_counter()
    for i in range(warmup):
        losses.append(step(batches[i % len(batches)]))
    synchronize(device)
    warmup_seconds = time.perf_counter() - start
    seconds, tokens, flops = [], 0, 0.0
    for i in range(warmup, warmup + steps):
        index = i % len(batches)
        start = time.perf_counter()
        losses.append(step(batches[index]))
        synchronize(device)
        seconds.append(time.perf_counter() - start)
        tokens += batches[index]["n_tgt_tokens"]
        flops += flops_per_token[index] * batches[index]["n_tgt_tokens"]
    total = sum(seconds)
    result = {
        **facts,
        "warmup_updates": warmup,
        "warmup_seconds": round(warmup_seconds, 3),
        "steps": steps,
        "seconds_per_update": round(statistics.median(seconds), 5),
        "seconds_per_update_mean": round(total / steps, 5),
        "target_tokens_per_update": round(tokens / steps),
        "target_tokens_per_sec": round(tokens / total),
        "model_tflops_per_sec": significant(flops / total / 1e12),
        "peak_memory_gb": peak_memory_gb(device),
        "first_loss_per_token": float(losses[0]),
        "last_loss_per_token": float(losses[-1]),
    }
    del step, losses
    return result


def flops_per_token(cfg, host_batches: list[dict]) -> list[float]:  # noqa: ANN001
    """Training FLOPs per target token of each batch (pipeline/costs.py), at the batch's mean lengths."""
    model_cfg = TransformerConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    counts = count_parameters(cfg)
    return [
        training_flops_per_target_token(
            model_cfg,
            counts["encoder"],
            counts["decoder"],
            b["n_src_tokens"] / b["src"].size(0),
            b["n_tgt_tokens"] / b["src"].size(0),
        ).total
        for b in host_batches
    ]


# -- the Lightning loop --------------------------------------------------------------------------------------------
def train_overrides(
    model: str, kernels: str, compile_: bool | str, steps: int, run_dir: Path, device: torch.device
) -> list[str]:
    """`aiayn train` overrides for a short run whose logged tokens/s measures the Lightning loop: one device, no
    validation, no checkpoints during the run, no W&B, samples or BLEU; Multi30k batches of data.max_tokens=25000."""
    never = 10**9
    return [
        *MODELS[model],
        f"model.vocab_size={MULTI30K_VOCAB}",  # Multi30k's BPE (the config check refuses a model that disagrees)
        "data.max_tokens=25000",
        f"trainer={'gpu' if device.type == 'cuda' else 'cpu'}",
        f"trainer.devices={1 if device.index is None else [device.index]}",  # cuda:N: that GPU
        f"trainer.max_steps={steps}",
        "trainer.max_time=null",
        "trainer.log_every_n_steps=10",
        f"trainer.val_check_interval={never}",
        "trainer.limit_val_batches=0",
        "trainer.enable_progress_bar=false",
        f"device.kernels={kernels}",
        f"device.compile={str(compile_).lower()}",
        "logger.wandb.enabled=false",
        f"run.dir={run_dir}",
        "run.val_bleu_sentences=0",
        "run.n_samples=0",
        "run.val_attention_maps=false",
        f"checkpoint.every_n_train_steps={never}",
    ]


def logged_throughput(metrics_csv: Path) -> dict:
    """The `train/tgt_tokens_per_sec` values (and `train/mfu`, if logged) of a run's metrics.csv (pipeline/loggers.py:
    CSVLogger at <run.dir>/logs), with the median of the last half of each: the first intervals include
    torch.compile's warm-up."""
    with metrics_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    result: dict = {}
    for column, key in (("train/tgt_tokens_per_sec", "target_tokens_per_sec"), ("train/mfu", "mfu_datasheet")):
        values = [float(row[column]) for row in rows if row.get(column)]
        if values:
            result[key] = significant(statistics.median(values[len(values) // 2 :]), 5)
            result[f"{key}_logged"] = [significant(v, 5) for v in values]
    if "target_tokens_per_sec" not in result:
        raise ValueError(f"{metrics_csv} logs no train/tgt_tokens_per_sec")
    return result


def multi30k_batches(overrides: list[str]) -> dict:
    """What the run's training batches were: one epoch of its data module's batches (prepared by the run)."""
    from data import TranslationDataModule
    from pipeline.config import output_dir

    cfg = load_config(overrides)
    datamodule = TranslationDataModule(cfg.data, output_dir(cfg), seed=cfg.seed)
    datamodule.setup("fit")
    sizes = [
        (b["src"].shape, b["tgt_out"].shape, b["n_src_tokens"], b["n_tgt_tokens"])
        for b in datamodule.train_dataloader()
    ]
    sentences = sum(t[0] for _, t, _, _ in sizes)
    return {
        "corpus": f"{cfg.data.name}, {cfg.data.corpora_dir}",
        "max_tokens": int(cfg.data.max_tokens),
        "batches_per_epoch": len(sizes),
        "mean_sentences_per_batch": round(sentences / len(sizes), 1),
        "mean_target_tokens_per_batch": round(sum(n for *_, n in sizes) / len(sizes)),
        "mean_src_len": round(sum(s for _, _, s, _ in sizes) / sentences, 2),
        "mean_tgt_len": round(sum(n for *_, n in sizes) / sentences, 2),
        "padding_efficiency": round(
            sum(s + n for _, _, s, n in sizes) / sum(a.numel() + b.numel() for a, b, _, _ in sizes), 3
        ),
    }


def lightning_loop(
    model: str, kernels: str, compile_: bool | str, steps: int, device: torch.device, timeout: int
) -> dict:
    """Run `python -m pipeline train` (what `aiayn train` runs) for `steps` updates in a subprocess and read its
    logged throughput."""
    with tempfile.TemporaryDirectory(prefix="gpu_step-train-") as tmp:
        run_dir = Path(tmp) / "run"
        overrides = train_overrides(model, kernels, compile_, steps, run_dir, device)
        command = [sys.executable, "-m", "pipeline", "train", *overrides]
        env = dict(os.environ)  # CORPORA_DIR, AIAYN_OUTPUT_DIR, CUDA_VISIBLE_DEVICES, ... as given
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        result: dict = {
            "command": shlex.join(["python", "-m", "pipeline", "train", *overrides]),
            "variant": variant_name(kernels, compile_),
            "steps": steps,
        }
        start = time.perf_counter()
        try:
            done = subprocess.run(
                command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as e:
            result["error"] = f"timed out after {timeout} s"
            output = [o.decode(errors="replace") if isinstance(o, bytes) else o or "" for o in (e.stdout, e.stderr)]
            result["output_tail"] = "".join(output)[-3000:]
            return result
        result["wall_seconds"] = round(time.perf_counter() - start, 1)
        if done.returncode != 0:
            result["error"] = f"exit code {done.returncode}"
            result["output_tail"] = (done.stdout + done.stderr)[-3000:]
            return result
        try:
            result.update(logged_throughput(run_dir / "logs" / "metrics.csv"))
        except (OSError, ValueError) as e:  # no metrics.csv, or too few steps to log a value
            result["error"] = repr(e)
            return result
    try:
        result["batches"] = multi30k_batches(overrides)
    except Exception as e:  # noqa: BLE001  (a description; the measurement stands without it)
        result["batches"] = {"error": repr(e)}
    return result


# -- the run -------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, few steps: the code path, not a figure")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), help="default: base big (smoke: tiny)")
    parser.add_argument(
        "--variants",
        nargs="*",
        type=parse_variant,
        help=f"project rows as KERNELS:COMPILE (kernels auto|plain|cpu|cuda, compile auto|true|false); default: "
        f"{' '.join(DEFAULT_VARIANTS)} (smoke: {' '.join(SMOKE['variants'])})",
    )
    parser.add_argument("--no-peer", action="store_true", help="leave out the torch.nn.Transformer peer")
    parser.add_argument("--steps", type=int, help="timed updates per row (default 20; smoke 2)")
    parser.add_argument(
        "--warmup", type=int, help="untimed updates first, compilation included (default max(10, --batches); smoke 2)"
    )
    parser.add_argument("--lengths", choices=["fixed", "variable"], default="fixed")
    parser.add_argument("--batches", type=int, default=8, help="distinct batches, cycled (default 8)")
    parser.add_argument("--train-steps", type=int, help="updates of the `aiayn train` run; 0: none (default 300)")
    parser.add_argument("--train-models", nargs="+", choices=list(MODELS), default=None, help="default: base")
    parser.add_argument("--train-timeout", type=int, default=900, help="seconds for each `aiayn train` run")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, help="default bench/gpu_step.json (smoke: only printed)")
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.models = args.models or (SMOKE["models"] if smoke else ["base", "big"])
    if args.variants is None:
        args.variants = [parse_variant(v) for v in (SMOKE["variants"] if smoke else DEFAULT_VARIANTS)]
    args.steps = args.steps if args.steps is not None else (SMOKE["steps"] if smoke else 20)
    # Every batch shape once before timing (variable lengths: compile's recompilations, if any, then too).
    args.warmup = args.warmup if args.warmup is not None else (SMOKE["warmup"] if smoke else max(10, args.batches))
    args.train_steps = args.train_steps if args.train_steps is not None else (SMOKE["train_steps"] if smoke else 300)
    args.train_models = args.train_models or (args.models[:1] if smoke else ["base"])
    if args.out is None and not smoke:
        args.out = Path(__file__).with_name("gpu_step.json")
    if args.steps < 1 or args.warmup < 1 or args.batches < 1:
        parser.error("--steps, --warmup and --batches must be at least 1")
    if not args.variants and args.no_peer:
        parser.error("nothing to measure: no --variants and --no-peer")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: this benchmark needs one (`--device cpu --smoke` runs its code on a CPU)")
    if args.train_steps and not set(args.train_models) <= set(args.models):
        parser.error("--train-models must be among --models (the loop is set beside their bare step)")
    args.device = device
    return args


def relate(entry: dict, peak: float, sheet) -> None:  # noqa: ANN001
    """A model's figures relative to the peaks and to its peer, and how far its project rows' first losses lie
    apart (the same weights and first batch: bf16 rounding, and dropout masks where compiled code draws its own)."""
    peer = entry["rows"].get("peer", {})
    for row in entry["rows"].values():
        if "error" in row:
            continue
        flops = row["model_tflops_per_sec"] * 1e12
        row["mfu_measured"] = significant(flops / peak)
        row["mfu_datasheet"] = significant(flops / sheet.peak_flops) if sheet else None
        if "target_tokens_per_sec" in peer:
            row["vs_peer"] = round(row["target_tokens_per_sec"] / peer["target_tokens_per_sec"], 3)
    losses = [
        row["first_loss_per_token"] for name, row in entry["rows"].items() if name != "peer" and "error" not in row
    ]
    if len(losses) > 1:
        entry["first_loss_relative_spread"] = significant((max(losses) - min(losses)) / min(losses), 3)


def write(report: dict, out: Path | None) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(report: dict) -> None:
    header = f"{'model':6s} {'row':32s} {'s/update':>9s} {'tgt tok/s':>10s} {'TFLOP/s':>8s} {'MFU meas':>8s}"
    header += f" {'MFU sheet':>9s} {'mem GB':>7s} {'vs peer':>7s} {'warmup s':>8s}"
    print(header)
    for model, entry in report["models"].items():
        for name, row in entry["rows"].items():
            if "error" in row:
                print(f"{model:6s} {name:32s} ERROR {row['error']}")
                continue
            print(
                f"{model:6s} {name:32s} {row['seconds_per_update']:9.4f} {row['target_tokens_per_sec']:10,d} "
                f"{row['model_tflops_per_sec']:8.4g} {fmt(row.get('mfu_measured'), '8.1%')} "
                f"{fmt(row.get('mfu_datasheet'), '9.1%')} {fmt(row['peak_memory_gb'], '7.1f')} "
                f"{fmt(row.get('vs_peer'), '7.2f')} {row['warmup_seconds']:8.1f}"
            )
        loop = entry.get("lightning_loop")
        if loop:
            if "error" in loop:
                print(f"{model:6s} aiayn train ({loop['variant']}): ERROR {loop['error']}")
            else:
                print(
                    f"{model:6s} aiayn train ({loop['variant']}), Multi30k: {loop['target_tokens_per_sec']:,.0f} "
                    f"target tokens/s = {fmt(loop.get('ratio_to_bare_step'), '.2f')} x the bare step"
                )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device: torch.device = args.device
    smoke = args.smoke
    matmul_n = SMOKE["matmul_n"] if smoke else 8192
    key = datasheet_key(device)
    sheet = ACCELERATORS[key] if key else None
    report: dict = {
        "what": "one training update (bf16 autocast over float32 weights, fused Adam, Eq. 3): this project's "
        "TranslationModule step per kernels/compile variant and a plain torch.nn.Transformer peer on identical "
        "synthetic batches; the Lightning loop's own tokens/s from a short `aiayn train` (bench/gpu_step.py)",
        "command": shlex.join(["python", "bench/gpu_step.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "smoke": smoke,
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "datasheet": {"key": key, "peak_tflops": sheet.peak_flops / 1e12, "dtype": sheet.dtype} if sheet else None,
        "settings": {
            "autocast": "bfloat16",
            "weights": "float32",
            "warmup": args.warmup,
            "steps": args.steps,
            "timing": "median of per-update wall times, the device synchronized after each; tokens/s and TFLOP/s "
            "over the sum of the timed updates",
            "seed": args.seed,
        },
    }
    peak_before = matmul_peak_flops(device, matmul_n, inner=10 if device.type == "cuda" else 2)
    report["bf16_matmul_peak_tflops"] = {"n": matmul_n, "before": round(peak_before / 1e12, 3)}
    report["models"] = {}
    failed = False
    for model in args.models:
        cfg = load_config(MODELS[model])
        model_cfg = TransformerConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
        counts = count_parameters(cfg)
        shape = SMOKE["fixed_shape"] if smoke else FIXED_SHAPE
        target_tokens = SMOKE["target_tokens"] if smoke else TARGET_TOKENS
        host_batches = make_batches(args.lengths, args.batches, model_cfg.vocab_size, shape, target_tokens, args.seed)
        per_token = flops_per_token(cfg, host_batches)
        batches = [to_device(b, device) for b in host_batches]  # the same tensors for every row
        entry = {
            "model": OmegaConf.to_container(cfg.model, resolve=True),
            "params": counts,
            "training_flops_per_target_token": round(statistics.mean(per_token)),
            "batches": describe_batches(host_batches, args.lengths),
            "rows": {},
        }
        report["models"][model] = entry
        rows: list[tuple[str, Callable[[], tuple[Step, dict]]]] = [
            (variant_name(k, c), partial(project_row, cfg, k, c, device)) for k, c in args.variants
        ]
        if not args.no_peer:
            rows.append(("peer", partial(peer_row, cfg, device)))
        for name, build in rows:
            print(f"{model}: {name} ...", flush=True)
            try:
                entry["rows"][name] = measure(build, batches, per_token, args.warmup, args.steps, device, args.seed)
            except Exception as e:  # noqa: BLE001  (one row failing, e.g. out of memory, leaves the others)
                failed = True
                entry["rows"][name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
                print(entry["rows"][name]["traceback"], file=sys.stderr, flush=True)
            release(device)
            print(f"{model}: {name}: {json.dumps(entry['rows'][name])[:400]}", flush=True)
            relate(entry, peak_before, sheet)  # again with the better of both peaks at the end
            write(report, args.out)
        del batches
        release(device)
    peak_after = matmul_peak_flops(device, matmul_n, inner=10 if device.type == "cuda" else 2)
    peak = max(peak_before, peak_after)  # a slow moment (clocks, a neighbour) must not flatter the MFU
    report["bf16_matmul_peak_tflops"].update(after=round(peak_after / 1e12, 3), used=round(peak / 1e12, 3))
    for entry in report["models"].values():
        relate(entry, peak, sheet)
    write(report, args.out)

    if args.train_steps > 0 and args.variants:
        kernels, compile_ = args.variants[0]
        for model in args.train_models:
            print(f"{model}: aiayn train, {args.train_steps} updates ...", flush=True)
            loop = lightning_loop(model, kernels, compile_, args.train_steps, device, args.train_timeout)
            # The bare step of the loop's own model (Multi30k's vocabulary), on synthetic batches of the rows' shape.
            cfg = load_config([*MODELS[model], f"model.vocab_size={MULTI30K_VOCAB}"])
            shape = SMOKE["fixed_shape"] if smoke else FIXED_SHAPE
            target_tokens = SMOKE["target_tokens"] if smoke else TARGET_TOKENS
            host_batches = make_batches(args.lengths, args.batches, MULTI30K_VOCAB, shape, target_tokens, args.seed)
            batches = [to_device(b, device) for b in host_batches]
            try:
                bare = measure(
                    partial(project_row, cfg, kernels, compile_, device),
                    batches,
                    flops_per_token(cfg, host_batches),
                    args.warmup,
                    args.steps,
                    device,
                    args.seed,
                )
            except Exception as e:  # noqa: BLE001
                bare = {"error": f"{type(e).__name__}: {e}"}
            del batches
            release(device)
            loop["bare_step_vocab_size"] = MULTI30K_VOCAB
            if "target_tokens_per_sec" in loop and "target_tokens_per_sec" in bare:
                loop["bare_step_target_tokens_per_sec"] = bare["target_tokens_per_sec"]
                loop["ratio_to_bare_step"] = round(loop["target_tokens_per_sec"] / bare["target_tokens_per_sec"], 3)
                loop["within_10_percent"] = loop["ratio_to_bare_step"] >= 0.9
                loop["note"] = (
                    "different batches: Multi30k's (see batches) vs the synthetic ones of the rows; the ratio "
                    "includes what the shapes change"
                )
            failed |= "error" in loop
            report["models"][model]["lightning_loop"] = loop
            write(report, args.out)

    print(json.dumps(report, indent=2) if args.out is None else f"wrote {args.out}")
    print_table(report)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
