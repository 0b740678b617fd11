"""Run folders: where a run lives, what later stages find in it (its checkpoints, averaged.ckpt, config.yaml), and
which checkpoint a command or a resumed run starts from. Every command and stage resolves run folders here."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline.config import output_dir
from pipeline.errors import RunFolderError

AVERAGED_NAME = "averaged.ckpt"  # `aiayn average`'s output, in the run folder
LAST_NAME = "last.ckpt"  # in <run>/checkpoints/: a copy of the newest checkpoint
CONFIG_NAME = "config.yaml"  # the run's resolved configuration

# The config sections whose values shape the trained model: the fingerprint of `aiayn run`'s run folder covers
# exactly these (not run.*, paths.output_dir, logger.*, cluster.* scheduling knobs, plan.*, device.*).
TRAINING_KEYS = ("seed", "model", "data", "optim", "train", "trainer", "strategy", "checkpoint")


def new_run_dir(cfg: DictConfig) -> Path:
    """run.dir if given, else <output_dir>/runs/<run.name>-<timestamp>: the folder a new training run writes to
    (not created here)."""
    if cfg.run.dir:
        return Path(cfg.run.dir).expanduser().resolve()
    return output_dir(cfg) / "runs" / f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def fingerprint(cfg: DictConfig) -> str:
    """sha256 (first 10 hex digits) of the resolved TRAINING_KEYS sections."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    picked = {k: resolved.get(k) for k in TRAINING_KEYS}
    return hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()[:10]


def graph_run_dir(cfg: DictConfig) -> Path:
    """`aiayn run`'s folder: run.dir if set, else <output_dir>/runs/<run.name>-<fingerprint>, the same folder for
    the same config, so that running the same command again resumes or skips."""
    if cfg.run.dir:
        return Path(cfg.run.dir).expanduser().resolve()
    return output_dir(cfg) / "runs" / f"{cfg.run.name}-{fingerprint(cfg)}"


def require_run_dir(cfg: DictConfig, command: str) -> Path:
    """run.dir as an existing folder, or an error naming the key."""
    if not cfg.run.get("dir"):
        raise RunFolderError(
            f"run.dir is not set: `aiayn {command}` works on a training run's folder; "
            f"pass run.dir=<output_dir>/runs/<run> (the folder `aiayn train` printed)"
        )
    path = Path(cfg.run.dir).expanduser().resolve()
    if not path.is_dir():
        raise RunFolderError(f"run.dir={cfg.run.dir}: no such folder ({path})")
    return path


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def resolve_checkpoint(cfg: DictConfig, run_dir: Path | None, section: str = "evaluate") -> Path:
    """The checkpoint a command reads: <section>.checkpoint (a path; a relative one not found here is looked up
    inside run.dir), else run.dir's averaged.ckpt, else its checkpoints/last.ckpt. section: the command's config
    section (evaluate, translate)."""
    key, chosen = f"{section}.checkpoint", cfg[section].get("checkpoint")
    if chosen:
        path = Path(chosen).expanduser()
        if not path.is_absolute() and not path.exists() and run_dir is not None:
            path = run_dir / path
        if not path.exists():
            where = f" (also not in {run_dir})" if run_dir is not None else ""
            raise RunFolderError(f"{key}={chosen}: not found{where}")
        return path.resolve()
    if run_dir is None:
        raise RunFolderError(
            f"run.dir is not set and no {key}: pass run.dir=<output_dir>/runs/<run> (its averaged.ckpt, else "
            f"checkpoints/last.ckpt is used) or {key}=<checkpoint file>"
        )
    for path in (run_dir / AVERAGED_NAME, checkpoints_dir(run_dir) / LAST_NAME):
        if path.exists():
            return path
    raise RunFolderError(
        f"no {AVERAGED_NAME} and no checkpoints/{LAST_NAME} in run.dir={run_dir}: train (and `aiayn average`) "
        f"first, or name one with {key}=<path>"
    )


def resume_path(cfg: DictConfig, run_dir: Path) -> str | None:
    """The checkpoint training starts from: run.resume (a path), "last" (checkpoints/last.ckpt), or "auto":
    last.ckpt if it exists, else none (what a job runs with, so that its first attempt starts fresh and a
    requeued one resumes)."""
    resume = cfg.run.resume
    last = checkpoints_dir(run_dir) / LAST_NAME
    if resume == "auto":
        return str(last) if last.is_file() else None
    if resume == "last":
        return str(last)
    return resume


def job_resume(cfg: DictConfig, command: str) -> str | None:
    """run.resume for a stage run as a job (SLURM or `aiayn run`): training continues an interrupted run
    ("auto", unless run.resume names one); other stages leave it as the user set it (None)."""
    return (cfg.run.resume or "auto") if command == "train" else None


def save_config(cfg: DictConfig, run_dir: Path) -> Path:
    """The run's resolved configuration, <run>/config.yaml."""
    path = run_dir / CONFIG_NAME
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return path
