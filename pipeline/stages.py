"""`aiayn run`: the pipeline as a stage graph, prepare -> train -> average -> evaluate.

Each stage is an `aiayn` command run with the same overrides and one run folder. With cluster=slurm every stage that
still has work is one SLURM job, submitted at once and started by SLURM after the previous one succeeded
(`--dependency=afterok:<job>`; pipeline/slurm.py): prepare and average on one CPU task, train on the job's GPUs,
evaluate on one GPU. With cluster=local the same stages run here, one after the other, each as its own process.

A stage whose outputs already exist for the same config is skipped (and the next one does not wait for it):
prepare when the dataset folder's manifest is complete, train when summary.json reports the final step, average
when averaged.ckpt exists, evaluate when eval-<evaluate.split>.json exists; a stage after one that runs is never
skipped (its inputs change). "The same config" is the run folder: unless run.dir
is given, it is <output_dir>/runs/<run.name>-<fingerprint>, the fingerprint being a hash of everything that shapes
the trained model (pipeline/runs.py), so that a changed setting gets a new folder and an unchanged one finds its
finished stages.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from data.manifest import is_complete
from data.prepare import find_dataset_dir
from pipeline.cluster import scheduler
from pipeline.config import output_dir
from pipeline.runs import AVERAGED_NAME, graph_run_dir, job_resume
from pipeline.slurm import job_overrides, make_job, submit


def _prepared(cfg, run_dir: Path) -> bool:
    """The dataset folder's manifest is complete; found from its record of the corpus files, without reading them."""
    return is_complete(find_dataset_dir(cfg.data, output_dir(cfg)))


def _trained(cfg, run_dir: Path) -> bool:
    """summary.json is written when fit ends (not when a job is requeued); it counts as done at the final step, or
    when trainer.max_time ended the run (a time-limited run never reaches max_steps)."""
    summary = run_dir / "summary.json"
    if not summary.is_file():
        return False
    steps = json.loads(summary.read_text()).get("steps", 0)
    max_steps = cfg.trainer.max_steps
    return max_steps is None or max_steps < 0 or steps >= max_steps or bool(cfg.trainer.get("max_time"))


def _averaged(cfg, run_dir: Path) -> bool:
    return (run_dir / AVERAGED_NAME).is_file()


def _evaluated(cfg, run_dir: Path) -> bool:
    return (run_dir / f"eval-{cfg.evaluate.split}.json").is_file()


@dataclass(frozen=True)
class Stage:
    """One node of the graph: the aiayn command it runs, and the test of whether its outputs exist."""

    name: str
    done: Callable[..., bool]  # (cfg, run_dir) -> True when the stage's outputs exist
    outputs: str  # what `done` looks at, for the messages


STAGES = (
    Stage("prepare", _prepared, "the dataset folder's manifest.json"),
    Stage("train", _trained, "summary.json at the final step"),
    Stage("average", _averaged, "averaged.ckpt"),
    Stage("evaluate", _evaluated, "eval-<evaluate.split>.json"),
)


def run_graph(cfg, overrides: list[str], stages: tuple[Stage, ...] = STAGES) -> list[tuple[str, str, object]]:
    """Run or submit every stage with work left, in order. Returns [(stage, status, submitit job or None)], status
    being "skipped", "ran" (local) or "submitted" (slurm); also printed."""
    run_dir = graph_run_dir(cfg)
    print(f"run folder: {run_dir}")
    report: list[tuple[str, str, object]] = []
    previous_job = None
    upstream_ran = False  # a stage after one that runs runs too: its inputs are about to change
    for stage in stages:
        if not upstream_ran and stage.done(cfg, run_dir):
            report.append((stage.name, "skipped", None))
            print(f"{stage.name:>8}: skipped, done ({stage.outputs} exists)", flush=True)
            continue
        upstream_ran = True
        if scheduler(cfg) == "slurm":
            dependency = f"afterok:{previous_job.job_id}" if previous_job is not None else None
            previous_job = submit(make_job(cfg, stage.name, overrides, run_dir, dependency))
            report.append((stage.name, "submitted", previous_job))
            print(
                f"{stage.name:>8}: submitted job {previous_job.job_id}"
                + (f" ({dependency})" if dependency else "")
                + f", log {previous_job.paths.stdout}",
                flush=True,
            )
        else:
            args = job_overrides(overrides, run_dir, job_resume(cfg, stage.name))  # an interrupted run continues
            print(f"{stage.name:>8}: running aiayn {stage.name} {' '.join(args)}", flush=True)
            subprocess.run([sys.executable, "-m", "pipeline", stage.name, *args], check=True)
            report.append((stage.name, "ran", None))
    return report
