"""What a job runs: one stage of the pipeline (prepare, train, average, evaluate) as its own process's work, as a
SLURM task unpickles it (pipeline/slurm.py submits it through submitit). Every stage command has a module
pipeline/<stage>.py whose `main(cfg)` runs it, as `aiayn <stage>` does."""

from __future__ import annotations

import importlib
import os

from pipeline import preemption
from pipeline.config import load_config

STAGE_COMMANDS = ("prepare", "train", "average", "evaluate")


def run_stage(command: str, overrides: list[str]) -> dict:
    """A SLURM job's entry point (one call per task): `aiayn <command> <overrides>`, in-process.

    Returns what the command returns (training: its summary) with this task's rank, for submitit's result files.
    The requeue signal is routed to its flag first (pipeline/preemption.py), and the command's module (torch,
    Lightning) is imported only after, so that a signal arriving while they load is not fatal.
    """
    if command not in STAGE_COMMANDS:
        raise ValueError(f"{command!r} is not a stage: one of {', '.join(STAGE_COMMANDS)}")
    preemption.install()
    main = importlib.import_module(f"pipeline.{command}").main
    result = main(load_config(overrides))
    return {"global_rank": int(os.environ.get("SLURM_PROCID", 0)), **(result if isinstance(result, dict) else {})}
