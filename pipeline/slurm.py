"""SLURM batch jobs through submitit: the sbatch parameters of a pipeline stage, its exact script, its submission.

`aiayn submit cluster=slurm ...` submits one training job; `aiayn run cluster=slurm ...` (pipeline/stages.py) one job
per stage, chained with `--dependency=afterok:<job>`. A job runs `python -u -m submitit.core._submit <folder>` under
`srun`, once per task; that unpickles `pipeline.jobs.run_stage(<command>, <overrides>)` and calls it, which is
`aiayn <command> <overrides>` in-process. For training that means one task per GPU
(`--ntasks-per-node=cluster.gpus_per_node`, `--nodes=cluster.nodes`), and Lightning's `SLURMEnvironment` takes each
task's rank from SLURM_PROCID/SLURM_LOCALID (pipeline/train.py).

Requeue: the training job asks SLURM for SIGUSR1 `cluster.signal_delay_s` seconds before its time limit
(`--signal=USR1@120`) and may be requeued (`--requeue`); on that signal it writes last.ckpt and requeues itself
(pipeline/preemption.py explains why neither Lightning's nor submitit's own handler does it), and the requeued job
resumes from it (`run.resume=auto`). So the run folder is fixed when the job is submitted (`run.dir=...` is added
to the job's overrides), never recomputed by a later attempt; submitit's logs go under `<run.dir>/slurm/<job id>/`.

The other stages (prepare, average, evaluate) keep submitit's defaults: its handler on SUBMITIT_PREEMPT_SIGNAL
(USR2, `--signal=USR2@<s>`) requeues a preempted stage, which then runs again from the start (prepare reuses the
shards it finished).
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pipeline.cluster import time_minutes
from pipeline.config import PROJECT_ROOT
from pipeline.errors import RunFolderError
from pipeline.jobs import run_stage
from pipeline.preemption import REQUEUE_SIGNAL
from pipeline.runs import job_resume
from pipeline.secrets import redact_args

_RUN_KEYS = re.compile(r"^[+~]*run\.(dir|resume)=")


@dataclass
class Job:
    """One sbatch job: `aiayn <command> <overrides>` on `tasks_per_node` x `nodes` tasks."""

    command: str  # an aiayn command: prepare, train, average, evaluate
    overrides: list[str]  # Hydra overrides the job's command is run with (run.dir already fixed)
    folder: Path  # submitit's folder: logs, pickles and the sbatch script, `%j` is the job id
    parameters: dict[str, Any] = field(default_factory=dict)  # submitit SlurmExecutor parameters (sbatch options)

    @property
    def aiayn_command(self) -> str:
        """The command the job runs, as printed and written into its script: secrets redacted (pipeline/loggers.py);
        the job itself gets the overrides whole, in submitit's pickle."""
        return shlex.join(["aiayn", self.command, *redact_args(self.overrides)])

    @property
    def submitit_command(self) -> str:
        """What the script runs under srun: exactly `SlurmExecutor._submitit_command_str`, for the same folder."""
        return " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(self.folder))])


def job_overrides(overrides: list[str], run_dir: Path, resume: str | None) -> list[str]:
    """The user's overrides with run.dir fixed, so that every attempt of the job uses one folder, and run.resume
    set ("auto" for training: a requeued attempt resumes from last.ckpt; None: left as the user set it).

    run.dir is quoted for Hydra's grammar, so a folder named `out (copy)` or holding `$(...)` is taken as it is."""
    replaced = ("dir", "resume") if resume is not None else ("dir",)
    kept = [o for o in overrides if not ((m := _RUN_KEYS.match(o)) and m.group(1) in replaced)]
    return [*kept, f"run.dir={hydra_quoted(str(run_dir))}"] + ([f"run.resume={resume}"] if resume is not None else [])


def hydra_quoted(value: str) -> str:
    """value as one Hydra override value: single-quoted; its single quotes escaped, and the backslashes before a
    quote or at the end doubled (Hydra's grammar reads a backslash as an escape only there)."""
    escaped = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
    return "'" + re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped) + "'"


CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def refuse_control_characters(values: dict[str, Any]) -> None:
    """Every value that reaches a job's script or command line, as `key: value`: none may hold a control character
    (a newline would end the sbatch directive or comment it is in and start a shell line of its own)."""
    for key, value in values.items():
        if isinstance(value, str) and CONTROL.search(value):
            raise RunFolderError(
                f"{key}={value!r}: control characters (newlines, tabs, ...) cannot go into a job script"
            )


# Variables of torchrun / Lightning launches: Lightning's SLURMEnvironment takes MASTER_PORT from the environment
# if it is set, and would then try the submitting process's port.
LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
LAUNCHER_VARIABLES += ("GROUP_RANK", "NODE_RANK", "TORCHELASTIC_RUN_ID")


def make_job(cfg: DictConfig, command: str, overrides: list[str], run_dir: Path, dependency: str | None = None) -> Job:
    """The job that runs `aiayn <command> <overrides>` for run folder `run_dir` (logs in <run_dir>/slurm/<job id>)."""
    given = dict(o.lstrip("+~").split("=", 1) if "=" in o else (o, o) for o in overrides)
    refuse_control_characters(given | {"run.dir": str(run_dir)})
    job = Job(command, job_overrides(overrides, run_dir, job_resume(cfg, command)), run_dir / "slurm" / "%j")
    job.parameters = job_parameters(cfg, command, dependency)
    job.parameters["setup"].insert(0, f"# runs: {job.aiayn_command}")  # the overrides travel in the pickle
    return job


def job_parameters(cfg: DictConfig, command: str, dependency: str | None = None) -> dict[str, Any]:
    """submitit SlurmExecutor parameters (= sbatch options) for stage `command` from the cluster config.

    train: cluster.nodes x cluster.gpus_per_node tasks, as many GPUs (none if trainer.accelerator is cpu), SIGUSR1
    signal_delay_s before the limit; evaluate: one task (and one GPU unless on cpu); prepare and average: one CPU task.
    """
    cluster = cfg.cluster
    on_gpu = cfg.trainer.accelerator != "cpu"
    train = command == "train"
    params: dict[str, Any] = {
        "job_name": f"{cfg.run.name}.{command}",
        "time": time_minutes(cluster.time),
        "nodes": int(cluster.nodes) if train else 1,
        "ntasks_per_node": int(cluster.gpus_per_node) if train else 1,
        "cpus_per_task": int(cluster.cpus_per_task),
        "signal_delay_s": int(cluster.signal_delay_s),
        "setup": [
            f"export PYTHONPATH={shlex.quote(str(PROJECT_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}",
            # sbatch passes the submitting shell's environment on: a launcher's variables there (torchrun's, or the
            # MASTER_PORT Lightning sets in a process that trained) would override the world SLURM describes.
            f"unset {' '.join(LAUNCHER_VARIABLES)}",
        ],
    }
    if on_gpu and command in ("train", "evaluate"):
        params["gpus_per_node"] = int(cluster.gpus_per_node) if train else 1
    for key in ("partition", "account", "qos", "constraint", "mem"):
        if cluster.get(key) is not None:
            params[key] = str(cluster[key])
    refuse_control_characters({f"cluster.{k}": params[k] for k in ("partition", "account", "qos", "constraint", "mem")
                               if k in params} | {"run.name": params["job_name"]})  # fmt: skip
    if dependency:
        params["dependency"] = dependency
    additional: dict[str, Any] = {}
    if train:  # submitit would write --signal=<its own signal>@<s>; training handles SIGUSR1 (pipeline/preemption.py)
        additional["signal"] = f"{REQUEUE_SIGNAL.name.removeprefix('SIG')}@{int(cluster.signal_delay_s)}"
    if cluster.requeue:
        additional["requeue"] = True
    if additional:
        params["additional_parameters"] = additional
    return params


def sbatch_script(job: Job) -> str:
    """The exact sbatch script submitit writes for `job` (its own template), without submitting anything."""
    try:
        from submitit.slurm.slurm import _make_sbatch_string
    except ImportError:
        from pipeline.errors import RunFolderError

        raise RunFolderError(
            "SLURM jobs are written and submitted with submitit, which is not installed: pip install 'aiayn[dist]'"
        ) from None

    return _make_sbatch_string(command=job.submitit_command, folder=job.folder, **job.parameters)


def submit(job: Job) -> Any:
    """Submit `job` with submitit; returns the submitit Job (job.job_id, job.paths.stdout, ...)."""
    try:
        import submitit
    except ImportError:
        from pipeline.errors import RunFolderError

        raise RunFolderError(
            "SLURM jobs are submitted with submitit, which is not installed: pip install 'aiayn[dist]'"
        ) from None

    executor = submitit.SlurmExecutor(folder=job.folder)
    executor.update_parameters(**job.parameters)
    return executor.submit(run_stage, job.command, job.overrides)
