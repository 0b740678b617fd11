"""Training throughput (target tokens/s) of the small and base models in 32-true vs bf16-mixed.

Runs real Lightning training steps (forward, label-smoothed loss, backward, Adam, Eq. 3 schedule) on real
Multi30k token batches, interleaving the configurations over several rounds so machine noise hits them all alike,
and writes the medians to bench/train_throughput.json. The base model keeps the paper's 37k vocabulary: the 8k
Multi30k ids are valid inputs for it, and its embedding and softmax cost what they would on WMT14.

    .venv/bin/python bench/train_throughput.py [--rounds 3] [--steps 30] [--warmup 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from pipeline.host import reuse_freed_memory, set_torch_environment

set_torch_environment()  # as `aiayn` does, before torch is imported (pipeline/host.py)

import lightning as L  # noqa: E402
import torch  # noqa: E402

from data import TranslationDataModule  # noqa: E402
from pipeline.config import load_config, output_dir  # noqa: E402
from pipeline.train import build_module  # noqa: E402

CONFIGS = {
    "small": ["model=small"],
    "base": ["model=base", "model.vocab_size=37000"],
}
# Padded tokens per batch. The base model gets a quarter of the default: a 4096-token fp32 step of a 63M
# parameter model takes tens of seconds on 2 cores; tokens/s barely depends on it once matmuls are this large.
MAX_TOKENS = {"small": 4096, "base": 1024}
PRECISIONS = ["32-true", "bf16-mixed"]


class StepTimer(L.Callback):
    """Target tokens and wall time of every training step after the first `warmup` ones."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.tokens, self.seconds, self._last = warmup, 0, 0.0, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last is not None and trainer.global_step > self.warmup:
            self.tokens += int(batch["tgt_out"].ne(0).sum())
            self.seconds += now - self._last
        self._last = now


def measure(model_name: str, precision: str, datamodule: TranslationDataModule, steps: int, warmup: int) -> float:
    datamodule.cfg["max_tokens"] = MAX_TOKENS[model_name]
    reuse_freed_memory()  # as `aiayn train` does on CPU
    cfg = load_config(CONFIGS[model_name])
    module = build_module(cfg)  # as `aiayn train` builds it (pipeline/train.py)
    timer = StepTimer(warmup)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=precision,
        max_steps=warmup + steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        use_distributed_sampler=False,
        callbacks=[timer],
    )
    trainer.fit(module, datamodule=datamodule)
    return timer.tokens / timer.seconds


def matmul_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 50) -> float:
    """Best-of-`repeats` GFLOP/s of one n x n x n matmul: this machine's ceiling, measured in the same run.

    One such bf16 matmul takes about 7 ms here, short enough for a neighbour's load to slow any single one: best of
    10 ranged from 2.08 to 2.49 TFLOP/s over five calls in a row, best of 50 reached 2.71."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):  # warm-up: oneDNN/AMX kernel selection; one call measured 1.37 TFLOP/s where later ones 2.3
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("train_throughput.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)

    cfg = load_config(["model=small"])
    datamodule = TranslationDataModule(cfg.data, output_dir(cfg), seed=cfg.seed)
    datamodule.prepare_data()
    datamodule.setup("fit")

    results: dict[str, list[float]] = {f"{m}/{p}": [] for m in CONFIGS for p in PRECISIONS}
    for round_ in range(args.rounds):
        for model_name in CONFIGS:
            for precision in PRECISIONS:
                tps = measure(model_name, precision, datamodule, args.steps, args.warmup)
                results[f"{model_name}/{precision}"].append(tps)
                print(f"round {round_}: {model_name:5s} {precision:10s} {tps:8.0f} target tokens/s", flush=True)

    table = {key: round(statistics.median(values)) for key, values in results.items()}
    peak = {"32-true": round(matmul_gflops(torch.float32)), "bf16-mixed": round(matmul_gflops(torch.bfloat16))}
    report = {
        "what": "median target tokens/s of training steps on Multi30k token batches (max_tokens per model below)",
        "command": "python bench/train_throughput.py " + f"--rounds {args.rounds} --steps {args.steps}",
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "max_tokens": MAX_TOKENS,
        "tokens_per_sec": table,
        "bf16_speedup": {m: round(table[f"{m}/bf16-mixed"] / table[f"{m}/32-true"], 2) for m in CONFIGS},
        "matmul_2048_gflops": peak,
        "runs": results,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["tokens_per_sec"], indent=2), "\nbf16 speed-up:", report["bf16_speedup"])


if __name__ == "__main__":
    main()
