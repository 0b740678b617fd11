"""Test BLEU against training minutes: the default experiment's quality on this machine (issue 5's target).

Trains the default experiment (`aiayn train`, conf/experiment/multi30k.yaml) for --minutes' largest value of wall
time, saving a checkpoint every minute (checkpoint.every_n_minutes=1, all kept), then decodes the test split
(Multi30k test_2016_flickr, 1,000 sentences) the way `aiayn evaluate` does (section 6.1: beam 4, α 0.6, output up
to input + 50) with:
  - the newest checkpoint written by each of --minutes (5, 10, 15, 25): the curve;
  - the average of the last --average checkpoints (section 6.1's checkpoint averaging, over one-minute intervals
    instead of ten), the run's final number.
Training minutes are Lightning's own clock of the fit (its Timer callback, the one trainer.max_time stops; saved in
every checkpoint): they start with the first batch and include the validations. Preparing the data is not counted
(fairseq's preprocessing is not counted in its figure either). Writes bench/quality_curve.json (or --out), with
sacreBLEU, chrF, the paper's tokenized BLEU, their signatures, the steps and the target tokens/s of the run.

    .venv/bin/python bench/quality_curve.py [--minutes 5 10 15 25] [--average 5] [hydra overrides ...]
    .venv/bin/python bench/quality_curve.py --run-dir outputs/runs/<run>   # score a finished run again
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's packages first (see bench/decode_speed.py)

from pipeline.host import set_torch_environment  # noqa: E402

set_torch_environment()  # as `aiayn` does, before torch is imported (pipeline/host.py)

import torch  # noqa: E402

from pipeline import evaluate  # noqa: E402
from pipeline.average import average_run  # noqa: E402
from pipeline.checkpoints import load_checkpoint  # noqa: E402
from pipeline.config import load_config, output_dir  # noqa: E402


def train(run_dir: Path, minutes: float, overrides: list[str]) -> float:
    """`aiayn train` for `minutes` of training time with a checkpoint every minute; returns its wall seconds."""
    hh, mm = divmod(int(round(minutes)), 60)
    command = [
        sys.executable, "-m", "pipeline", "train", f"run.dir={run_dir}",
        f"trainer.max_time=00:{hh:02d}:{mm:02d}:00", "trainer.max_steps=-1",
        "checkpoint.every_n_minutes=1", "checkpoint.every_n_train_steps=null", "checkpoint.save_top_k=-1",
        *overrides,
    ]  # fmt: skip
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    with open(run_dir.parent / f"{run_dir.name}.train.log", "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    return time.perf_counter() - started


def checkpoint_times(run_dir: Path) -> list[dict]:
    """Every saved checkpoint with its step and the fit's elapsed seconds when it was written, oldest first."""
    found = []
    for path in (run_dir / "checkpoints").glob("*.ckpt"):
        state = load_checkpoint(path)
        timers = [s for key, s in state.get("callbacks", {}).items() if key.startswith("Timer")]
        if not timers:
            raise SystemExit(f"{path}: no Timer state; was it trained with trainer.max_time?")
        found.append({"path": path, "step": state["global_step"], "seconds": timers[0]["time_elapsed"]["train"]})
    return sorted(found, key=lambda c: (c["seconds"], c["path"].name != "last.ckpt"))


def logged_throughput(run_dir: Path) -> float | None:
    """Median of the target tokens/s the run logged (pipeline/callbacks.TokenThroughput, in logs/metrics.csv)."""
    metrics = run_dir / "logs" / "metrics.csv"
    if not metrics.is_file():
        return None
    with open(metrics, newline="") as f:
        values = [
            float(row["train/tgt_tokens_per_sec"]) for row in csv.DictReader(f) if row.get("train/tgt_tokens_per_sec")
        ]
    return round(statistics.median(values)) if values else None


def score(cfg_overrides: list[str], run_dir: Path, checkpoint: Path) -> dict:
    cfg = load_config(
        [*cfg_overrides, f"run.dir={run_dir}", f"evaluate.checkpoint={checkpoint}", "logger.wandb.enabled=false"]
    )
    result = evaluate.main(cfg)
    keep = ("bleu", "chrf", "tok_bleu", "bleu_text", "chrf_text", "tok_bleu_text", "signatures", "global_step")
    return {key: result[key] for key in keep} | {"translate_seconds": result["translate_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[5, 10, 15, 25])
    parser.add_argument("--average", type=int, default=5, help="checkpoints averaged at the end (section 6.1: 5)")
    parser.add_argument("--run-dir", type=Path, help="score this finished run instead of training a new one")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("quality_curve.json"))
    parser.add_argument("overrides", nargs="*", help="hydra overrides of the training run (and of its evaluation)")
    args = parser.parse_args()

    cfg = load_config(args.overrides)
    wall = None
    run_dir = args.run_dir
    if run_dir is None:
        run_dir = output_dir(cfg) / "runs" / f"quality-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir.mkdir(parents=True)
        wall = train(run_dir, max(args.minutes), args.overrides)
    run_dir = run_dir.resolve()

    saved = checkpoint_times(run_dir)
    curve = []
    for minute in args.minutes:
        # The fit's end (max_time) lands a few seconds past the last full minute: allow 30 s.
        written = [c for c in saved if c["seconds"] <= minute * 60 + 30]
        if not written:
            raise SystemExit(f"no checkpoint of {run_dir} was written within {minute} minutes")
        chosen = written[-1]
        point = {"minutes": minute, "checkpoint": chosen["path"].name, "train_seconds": round(chosen["seconds"])}
        curve.append(point | score(args.overrides, run_dir, chosen["path"]))
        print(f"{minute:g} min (step {chosen['step']}): sacreBLEU {curve[-1]['bleu']:.2f}", flush=True)

    averaged = average_run(run_dir, args.average)
    final = {"averaged_last": args.average} | score(args.overrides, run_dir, averaged)
    print(f"average of the last {args.average}: sacreBLEU {final['bleu']:.2f}", flush=True)

    last = saved[-1]
    tokens = logged_throughput(run_dir)
    report = {
        "what": "sacreBLEU / chrF / tokenized BLEU on the test split against training minutes (beam 4, α 0.6)",
        "command": "python bench/quality_curve.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "load_avg_1_5_15": [round(x, 1) for x in os.getloadavg()],
        "run_dir": str(run_dir.relative_to(ROOT)) if run_dir.is_relative_to(ROOT) else str(run_dir),
        "overrides": args.overrides,
        "train_wall_seconds": round(wall) if wall else None,
        "steps": last["step"],
        "target_tokens_per_second": tokens,
        "curve": curve,
        "final": final,
    }
    args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps({"curve": [(p["minutes"], round(p["bleu"], 2)) for p in curve], "final": final["bleu"]}))


if __name__ == "__main__":
    main()
