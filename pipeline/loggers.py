"""Where metrics go: a CSV file in the run folder always, and Weights & Biases when enabled.

W&B mode: `WANDB_MODE` always wins; otherwise online when an API key is configured (WANDB_API_KEY or a netrc
entry for the W&B host, which `wandb login` writes), offline when not. Offline runs are written under
<run folder>/wandb/offline-run-<time>-<id>/ and uploaded later from a machine with internet:
`wandb sync <run folder>/wandb/` (every segment of a resumed run, in order, into one W&B run).

One W&B run per training run: Lightning's WandbLogger creates it on global rank 0 only (its `experiment` is
`rank_zero_experiment`, its log_* methods `rank_zero_only`; other ranks get a dummy and write nothing). A run that
continues (a requeued SLURM job, `run.resume=last`) reopens the same run id with resume="allow", so its metrics
append to the same W&B run; offline, each start writes one more offline-run folder with that id.

A dashboard never costs the run: wandb.init waits at most INIT_TIMEOUT_S seconds for the server ($WANDB_INIT_TIMEOUT
wins), and an online start that fails (no network, a server that refuses, WANDB_MODE=online without an API key) is
said in one line and retried offline, into the same place an offline run goes (`wandb sync` uploads it later).

Secrets: the values of keys that name one (SECRET_WORDS, by key pattern) are replaced by REDACTED wherever a config or
a command line is written: W&B's config panel (redact), the command line W&B records (redacted_argv), and the run's
config.yaml (pipeline/runs.py save_config).

The CSV file of a run that continues (run.resume) is appended to, not replaced: its earlier segments' rows stay.

wandb is a dependency of the package; where it is missing all the same (an environment installed without it), W&B
logging is skipped with a one-line warning and the run goes on with the CSV file.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import importlib.util
import netrc
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from data.atomic import write_bytes_atomic
from pipeline.runs import LAST_NAME, checkpoints_dir
from pipeline.secrets import redact, redact_args

# The longest wandb.init waits for the W&B server before the run goes on offline: wandb's own default, with its
# retries, would hold the run far longer; $WANDB_INIT_TIMEOUT, wandb's own variable, wins.
INIT_TIMEOUT_S = 20.0
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


@contextlib.contextmanager
def redacted_argv() -> Iterator[None]:
    """sys.argv with its secrets redacted (redact_args) for as long as the block runs: wandb.init records the
    command line (sys.argv[1:], in the run's metadata) and has no public setting to leave it out."""
    saved = sys.argv
    sys.argv = [*saved[:1], *redact_args(saved[1:])]
    try:
        yield
    finally:
        sys.argv = saved


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
    settings = wandb_settings(mode=mode, console="off")  # console off: no capture of this process's output
    init = functools.partial(
        wandb.init, project=wb.project, id=run_id, resume="allow", dir=str(run_dir), settings=settings, **new_run
    )
    try:
        run = start_wandb(init, settings, online=mode == "online", run_dir=run_dir)
        run.summary.update(values)
    finally:
        finish_wandb()
    return run_id


def wandb_settings(**settings: Any):
    """wandb.Settings for a run of this pipeline: init_timeout INIT_TIMEOUT_S unless $WANDB_INIT_TIMEOUT sets it."""
    import wandb

    if not os.environ.get("WANDB_INIT_TIMEOUT"):
        settings.setdefault("init_timeout", INIT_TIMEOUT_S)
    return wandb.Settings(**settings)


Started = TypeVar("Started")


def start_wandb(init: Callable[[], Started], settings, online: bool, run_dir: Path) -> Started:
    """init() (a wandb.init with `settings`), seeing a command line without secrets (redacted_argv). An online start
    that fails, whatever the cause (the server unreachable or refusing, no API key), costs the run nothing: one line
    says why, and init() runs again with settings.mode offline. An offline start that fails raises."""
    with redacted_argv():
        try:
            return init()
        except Exception as error:  # wandb.errors.CommError, UsageError, ...: whatever it is, offline is the cure
            if not online:
                raise
            _say_offline(error, run_dir)
            import wandb

            # The failed run's stream stays registered in wandb's service ("run ID ... is in use" for the same id
            # offline): a new service starts with the offline run.
            wandb.teardown()
            settings.mode = "offline"
            return init()


@rank_zero_only
def _say_offline(error: Exception, run_dir: Path) -> None:
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    print(
        f"aiayn: W&B could not start online ({reason}); logging offline to {run_dir / 'wandb'} instead: upload it "
        f"later with `wandb sync {run_dir / 'wandb'}/`",
        file=sys.stderr,
        flush=True,
    )


class RunWandbLogger(WandbLogger):
    """Lightning's WandbLogger, whose run (started on first use, on global rank 0 only) never costs the training
    run: it starts through start_wandb (no secrets in the recorded command line, at most INIT_TIMEOUT_S of waiting
    for the server, offline after one line if the online start fails)."""

    def __init__(self, *, online: bool, **kwargs: Any) -> None:
        self.wandb_settings = wandb_settings()  # the settings object wandb.init gets: start_wandb may set its mode
        super().__init__(settings=self.wandb_settings, **kwargs)
        self.online = online
        self._run_started = False

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._run_started:
            return super().experiment
        run = start_wandb(
            lambda: WandbLogger.experiment.fget(self), self.wandb_settings, self.online, Path(self.save_dir)
        )
        self._run_started = True
        return run


class ContinuedExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer, continuing the metrics.csv that a run's earlier segments wrote: their rows and columns
    stay, new rows are appended (new columns rewrite the file with the wider header, as Lightning's writer does).

    Lightning's writer deletes an existing metrics.csv when it starts (in `_check_log_dir_exists`, the one hook it
    has for that); here that hook keeps the file and reads its columns instead. A last row cut short (the process
    killed while writing it) is dropped, so that the next row starts on a line of its own."""

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        data = path.read_bytes()
        if not data.endswith(b"\n"):
            data = data[: data.rfind(b"\n") + 1]
            write_bytes_atomic(path, data)
        self.metrics_keys = next(csv.reader(data.decode("utf-8", "replace").splitlines()[:1]), [])


class ContinuedCSVLogger(CSVLogger):
    """Lightning's CSVLogger for a run that continues (a resume, a requeued job): logs/metrics.csv is appended to
    (ContinuedExperimentWriter), where Lightning's CSVLogger would start it anew and lose the earlier steps' rows."""

    def __init__(self, save_dir: Path) -> None:
        super().__init__(save_dir=str(save_dir), name="logs", version="")
        self.writer: ContinuedExperimentWriter | None = None

    @property
    @rank_zero_experiment
    def experiment(self) -> ContinuedExperimentWriter:
        if self.writer is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self.writer = ContinuedExperimentWriter(log_dir=self.log_dir)
        return self.writer

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self.writer is not None:
            self.save()


def continues(cfg: DictConfig, run_dir: Path) -> bool:
    """Whether training continues a run in run_dir (what pipeline/runs.py resume_path decides, without reading
    checkpoints): run.resume names a checkpoint or "last", or is "auto" and the run folder has a last.ckpt."""

    resume = cfg.run.get("resume")
    if resume == "auto":
        return (checkpoints_dir(run_dir) / LAST_NAME).exists()
    return bool(resume)


def build_loggers(cfg: DictConfig, run_dir: Path) -> list[Logger]:
    """The run's loggers: the CSV file (appended to when the run continues), and W&B when enabled."""
    csv_logger = ContinuedCSVLogger(run_dir) if continues(cfg, run_dir) else CSVLogger(str(run_dir), "logs", "")
    loggers: list[Logger] = [csv_logger]
    wb = cfg.logger.wandb
    mode = wandb_mode()
    if wb.enabled and mode != "disabled" and wandb_available():
        loggers.append(
            RunWandbLogger(
                online=mode == "online",
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
