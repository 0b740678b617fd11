"""Where metrics go: a CSV file in the run folder always, and Weights & Biases when enabled.

W&B mode: `WANDB_MODE` always wins; otherwise online when an API key is configured (WANDB_API_KEY or a netrc
entry for the W&B host, which `wandb login` writes), offline when not. Offline runs are written under
<run folder>/wandb/offline-run-<time>-<id>/ and uploaded later from a machine with internet:
`wandb sync <run folder>/wandb/` (every segment of a resumed run, in order, into one W&B run).

One W&B run per training run: Lightning's WandbLogger creates it on global rank 0 only (its `experiment` is
`rank_zero_experiment`, its log_* methods `rank_zero_only`; other ranks get a dummy and write nothing). A run that
continues (a requeued SLURM job, `run.resume=last`) reopens the same run id with resume="allow", so its metrics
append to the same W&B run; offline, each start writes one more offline-run folder with that id.

wandb is a dependency of the package; where it is missing all the same (an environment installed without it), W&B
logging is skipped with a one-line warning and the run goes on with the CSV file.
"""

from __future__ import annotations

import importlib.util
import netrc
import os
import re
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

# A key naming a secret, by its words ("hf_token", "WANDB_API_KEY", "apiKey", "db.password"), whose value never
# reaches W&B's config panel. Whole words only: "max_tokens" and "tokens_per_update" are no secrets.
SECRET_WORDS = {"key", "apikey", "token", "secret", "password", "passwd", "credential", "credentials"}
# WANDB_MODE's legacy spellings (Lightning's WandbLogger itself sets WANDB_MODE=dryrun for offline runs).
MODE_ALIASES = {"dryrun": "offline", "run": "online"}


def wandb_mode() -> str:
    """'online', 'offline' or 'disabled', following WANDB_MODE, else whether an API key is configured."""
    if os.environ.get("WANDB_MODE"):
        return MODE_ALIASES.get(os.environ["WANDB_MODE"], os.environ["WANDB_MODE"])
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1].rstrip("/")
    try:
        if netrc.netrc(os.environ.get("NETRC")).authenticators(host):  # None: ~/.netrc
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError):
        pass
    return "offline"


def wandb_available() -> bool:
    """Whether wandb can be imported; if not, says once (rank 0) that W&B is off and how to turn it on."""
    if importlib.util.find_spec("wandb") is not None:
        return True
    _say_no_wandb()
    return False


@rank_zero_only
def _say_no_wandb() -> None:
    print(
        "aiayn: W&B logging skipped: logger.wandb.enabled is true but wandb is not installed "
        "(pip install wandb; logger.wandb.enabled=false silences this); metrics go to <run>/logs/metrics.csv",
        file=sys.stderr,
        flush=True,
    )


def is_secret(key: object) -> bool:
    return bool(SECRET_WORDS.intersection(re.split(r"[^a-z0-9]+", str(key).lower())))


def redact(value):
    """The config with the values of secret-naming keys (SECRET_WORDS) replaced, safe to log."""
    if isinstance(value, dict):
        return {k: "<redacted>" if is_secret(k) else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def wandb_group(cfg: DictConfig) -> str | None:
    """logger.wandb.group, else the SLURM job id: a job's ranks and requeues (same id) land in one group."""
    return cfg.logger.wandb.group or os.environ.get("SLURM_JOB_ID")


def wandb_run_id(cfg: DictConfig, run_dir: Path) -> str:
    """logger.wandb.id, else one id per run folder, stable across restarts that reuse it.

    An explicit run.dir names the run (a job resubmitted with the same run.dir continues its W&B run). Without
    one, a SLURM job's folder gets a new timestamp when the job is requeued, so the id comes from the job id,
    which a requeue keeps; outside SLURM the timestamped folder name is unique per run.
    """
    if cfg.logger.wandb.id:
        return str(cfg.logger.wandb.id)
    job = os.environ.get("SLURM_JOB_ID")
    name = run_dir.name if cfg.run.dir or not job else f"{cfg.run.name}-slurm{job}"
    return re.sub(r"[:;,#?/'\s]", "-", name)  # the characters W&B refuses in a run id


# The folders wandb writes under <save dir>/wandb/, one per start of a run: offline-run-<time>-<id> (offline) or
# run-<time>-<id> (online runs keep a local copy too).
RUN_FOLDER = re.compile(r"(?:offline-)?run-(?P<time>\d{8}_\d{6})-(?P<id>.+)")


def logged_run_id(run_dir: Path) -> str | None:
    """The id of the newest W&B run written under <run_dir>/wandb/ (the training run's), or None."""
    found = [m for p in (run_dir / "wandb").glob("*run-*") if p.is_dir() and (m := RUN_FOLDER.fullmatch(p.name))]
    return max(found, key=lambda m: m["time"])["id"] if found else None


def log_run_summary(cfg: DictConfig, run_dir: Path, values: dict[str, Any]) -> str | None:
    """Put values into the W&B summary of a run folder's run, for a stage after training (`aiayn evaluate`).

    The run is the training run when its id can be found: logger.wandb.id, else the newest run under
    <run_dir>/wandb/ (wandb_run_id is not enough: a SLURM job's id depends on the job), else wandb_run_id's; it is
    reopened with resume="allow" (a new run if it never existed). Mode rules as for training (wandb_mode; offline:
    one more offline-run folder with that id, which `wandb sync` merges). Returns the run id, or None when W&B is off.
    """
    wb = cfg.logger.wandb
    mode = wandb_mode()
    if not wb.enabled or mode == "disabled" or not wandb_available():
        return None
    import wandb

    found = None if wb.id else logged_run_id(run_dir)
    run_id = found or wandb_run_id(cfg, run_dir)
    # A run reopened keeps its name, group, tags and config; a new one gets what training would have given it.
    new_run = (
        {}
        if found
        else {
            "name": wb.name or run_dir.name,
            "group": wandb_group(cfg),
            "tags": list(wb.tags or []),
            "config": redact(OmegaConf.to_container(cfg, resolve=True)),
        }
    )
    try:
        run = wandb.init(
            project=wb.project,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            mode=mode,
            settings=wandb.Settings(console="off"),  # no capture of this process's output into the run
            **new_run,
        )
        run.summary.update(values)
    finally:
        finish_wandb()
    return run_id


def build_loggers(cfg: DictConfig, run_dir: Path) -> list[Logger]:
    loggers: list[Logger] = [CSVLogger(save_dir=str(run_dir), name="logs", version="")]
    wb = cfg.logger.wandb
    mode = wandb_mode()
    if wb.enabled and mode != "disabled" and wandb_available():
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(
            WandbLogger(
                project=wb.project,
                group=wandb_group(cfg),
                name=wb.name or run_dir.name,
                tags=list(wb.tags or []),
                save_dir=str(run_dir),
                offline=mode == "offline",
                id=wandb_run_id(cfg, run_dir),
                resume="allow",
                config=redact(OmegaConf.to_container(cfg, resolve=True)),
            )
        )
    return loggers


@rank_zero_only
def finish_wandb() -> None:
    """Close the W&B run at the end of `aiayn train` (Lightning leaves it open until the interpreter exits): its
    summary and exit record are written, and a later run in the same process starts a run of its own.

    wandb.finish() returns before wandb's service process has written the whole run to disk: an offline run's
    .wandb file read right after held 1 of its 4 history rows (wandb 0.31). wandb.teardown() stops the service,
    which flushes and closes the file, so the run is complete when training returns (a later run starts a new
    service)."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()
        wandb.teardown()
