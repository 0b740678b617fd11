"""Training throughput on this machine's CPU: 1 process vs 2-process DDP vs 2-process DeepSpeed ZeRO-2.

    .venv/bin/python bench/strategy_throughput.py [--rounds 2] [--steps 20] [--warmup 5] [--model small]

Each configuration trains the same model in bf16-mixed (the fast CPU path) on Multi30k token batches of max_tokens
per process, through `pipeline.train.build_run`, i.e. with the strategies `aiayn train` uses. All of them use
every core: the single process as intra-op threads, the 2-process runs (torchrun, gloo) one thread per rank. A
run's throughput is the target tokens of all ranks over the same steps divided by the slowest rank's time for them
(after `--warmup` steps). Configurations alternate within each round, so machine noise hits them alike; the medians
and every run go to bench/strategy_throughput.json with the machine's load averages.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "1 process": {"nprocs": 1, "overrides": []},
    "DDP, 2 processes": {"nprocs": 2, "overrides": ["trainer.devices=2", "strategy=ddp"]},
    "ZeRO-2, 2 processes": {"nprocs": 2, "overrides": ["trainer.devices=2", "strategy=deepspeed", "strategy.stage=2"]},
}


def child(config: str, model: str, max_tokens: int, steps: int, warmup: int, out: Path) -> None:
    """One rank: fit warmup + steps optimizer steps, write this rank's target tokens and seconds after warmup."""
    sys.path.insert(0, str(ROOT))
    import lightning as L

    from pipeline.config import load_config
    from pipeline.train import build_run

    class StepTimer(L.Callback):
        """Target tokens and wall time of this rank's training batches after the first `warmup` steps."""

        def __init__(self) -> None:
            self.tokens, self.seconds, self._last = 0, 0.0, None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            now = time.perf_counter()
            if self._last is not None and trainer.global_step > warmup:
                self.tokens += int(batch["tgt_out"].ne(0).sum())
                self.seconds += now - self._last
            self._last = now

    overrides = [
        f"model={model}",
        f"data.max_tokens={max_tokens}",
        "trainer.precision=bf16-mixed",
        f"trainer.max_steps={warmup + steps}",
        "trainer.limit_val_batches=0",
        "trainer.enable_progress_bar=false",
        "checkpoint.every_n_train_steps=1000000",
        "logger.wandb.enabled=false",
        "run.n_samples=0",
        "run.val_bleu_sentences=0",
        *CONFIGS[config]["overrides"],
    ]
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as run_dir:
        run = build_run(load_config(overrides), directory=Path(run_dir))  # what `aiayn train` fits
        run.trainer.callbacks.append(timer)
        run.trainer.fit(run.module, datamodule=run.datamodule)
    rank = int(os.environ.get("RANK", 0))
    (out / f"rank{rank}.json").write_text(json.dumps({"tokens": timer.tokens, "seconds": timer.seconds}))
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run(config: str, args: argparse.Namespace) -> float:
    """Start one configuration as its own process(es); the run's target tokens/s over all ranks."""
    nprocs = CONFIGS[config]["nprocs"]
    sys.path.insert(0, str(ROOT))
    from pipeline.slurm import LAUNCHER_VARIABLES  # an enclosing launcher's world is not the children's

    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS=str((os.cpu_count() or 1) // nprocs), DS_ACCELERATOR="cpu", WANDB_MODE="disabled")
    with tempfile.TemporaryDirectory() as out:
        argv = [__file__, "--child", config, "--child-out", out, "--model", args.model]
        argv += ["--max-tokens", str(args.max_tokens), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nprocs}"] if nprocs > 1 else []
        proc = subprocess.run([sys.executable, *launcher, *argv], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{config} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        ranks = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(nprocs)]
    return sum(r["tokens"] for r in ranks) / max(r["seconds"] for r in ranks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--model", default="small")
    parser.add_argument("--max-tokens", type=int, default=2048, help="padded tokens per batch per process")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("strategy_throughput.json"))
    parser.add_argument("--from-log", type=Path, help="write the report from an interrupted run's printed output")
    parser.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.model, args.max_tokens, args.steps, args.warmup, args.child_out)

    runs: dict[str, list[float]] = {config: [] for config in CONFIGS}
    loads: list[float] = []
    if args.from_log:  # an interrupted run: its printed results, in the order they were measured
        for line in args.from_log.read_text().splitlines():
            if match := ROUND_LINE.match(line):
                runs[match["config"].strip()].append(float(match["tps"]))
        return write_report(runs, loads, args)
    for round_ in range(args.rounds):
        for config in CONFIGS:
            loads.append(os.getloadavg()[0])
            runs[config].append(run(config, args))
            print(f"round {round_}: {config:20s} {runs[config][-1]:8.0f} target tokens/s", flush=True)
            write_report(runs, loads, args)  # after every run: an interrupted benchmark keeps what it measured


# What main prints per run; --from-log reads it back.
ROUND_LINE = re.compile(r"round (?P<round>\d+): (?P<config>.{20}) +(?P<tps>[0-9.]+) target tokens/s")


def write_report(runs: dict[str, list[float]], loads: list[float], args: argparse.Namespace) -> None:
    """Medians over the runs so far, and each complete round's ratios to its own 1-process run (the ratios
    within a round are what the shared machine's noise disturbs least)."""
    done = {config: values for config, values in runs.items() if values}
    table = {config: round(statistics.median(values)) for config, values in done.items()}
    rounds = min(len(values) for values in runs.values())
    per_round = [{c: round(runs[c][r] / runs["1 process"][r], 2) for c in CONFIGS} for r in range(rounds)]
    report = {
        "what": "target tokens/s of a training run, all ranks together (median over runs), bf16-mixed",
        "command": f"python bench/strategy_throughput.py --rounds {args.rounds} --steps {args.steps} "
        f"--warmup {args.warmup} --model {args.model} --max-tokens {args.max_tokens}",
        "complete_rounds": rounds,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "max_tokens_per_process": args.max_tokens,
        "tokens_per_sec": table,
        "vs_1_process": {c: round(v / table["1 process"], 2) for c, v in table.items()} if "1 process" in table else {},
        "vs_1_process_per_complete_round": per_round,
        "load_average_1min_at_each_start": loads,
        "runs": runs,
    }
    if args.from_log:
        report["from_log"] = f"rebuilt with --from-log from the printed results of an interrupted run: {args.from_log}"
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["tokens_per_sec"], indent=2), "\nvs 1 process:", report["vs_1_process"])


if __name__ == "__main__":
    main()
