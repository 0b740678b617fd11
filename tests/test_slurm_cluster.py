"""submitit on a real single-node SLURM cluster (scripts/slurm_local.sh): multi-task jobs and requeue."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit
from slurm_fixture import slurm_cluster  # noqa: F401  (session fixture, used through usefixtures)

pytestmark = pytest.mark.usefixtures("slurm_cluster")

# Jobs cannot import this test module (tests/ is not on their sys.path): ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

PARTITION = "debug"
SIGNAL = "USR1"
SIGNAL_DELAY_S = 30
# > 10 min, so that submitit treats the signal as a preemption, not as a time-out (see SignalHandler).
TIMEOUT_MIN = 20
# Upper bounds only, for a loaded machine: on an idle one each job is done in a few seconds.
JOB_TIMEOUT_S = 120


@pytest.fixture(autouse=True)
def _preempt_signal(monkeypatch: pytest.MonkeyPatch) -> None:
    """submitit 1.5.4 defaults to USR2; use USR1 both in the sbatch script and in the job's handler."""
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", SIGNAL)  # read by submitit when the job imports it
    monkeypatch.setattr(submitit.JobEnvironment, "USR_SIG", SIGNAL)  # already imported here


def _executor(folder: Path, **parameters: object) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")
    executor.update_parameters(
        slurm_partition=PARTITION,
        nodes=1,
        cpus_per_task=1,
        timeout_min=TIMEOUT_MIN,
        slurm_signal_delay_s=SIGNAL_DELAY_S,  # -> #SBATCH --signal=USR1@30
        slurm_additional_parameters={"requeue": True},  # -> #SBATCH --requeue
        **parameters,
    )
    return executor


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text().splitlines()[-lines:]) if path.exists() else f"({path} missing)"


def _diagnose(job: submitit.Job) -> str:
    cmd = ["scontrol", "show", "job", job.job_id]
    show = subprocess.run(cmd, capture_output=True, text=True, check=False)
    jobs = job._sub_jobs or [job]
    logs = "\n".join(f"--- {p} ---\n{_tail(p)}" for j in jobs for p in (j.paths.stdout, j.paths.stderr))
    return f"--- scontrol show job ---\n{show.stdout}{show.stderr}\n{logs}"


def _wait(job: submitit.Job, timeout_s: float) -> None:
    """job.results() would wait forever for a job that died without a result (no sacct here): bound it."""
    deadline = time.monotonic() + timeout_s
    while not job.done():
        if time.monotonic() > deadline:
            pytest.fail(f"job {job.job_id} not done after {timeout_s}s\n{_diagnose(job)}")
        time.sleep(0.25)


def _task_info() -> dict[str, object]:
    return {
        "procid": int(os.environ["SLURM_PROCID"]),
        "ntasks": int(os.environ["SLURM_NTASKS"]),
        "localid": int(os.environ["SLURM_LOCALID"]),
        "job_id": os.environ["SLURM_JOB_ID"],
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "rank": submitit.JobEnvironment().global_rank,
    }


def test_two_tasks_on_one_node(tmp_path: Path) -> None:
    job = _executor(tmp_path, tasks_per_node=2).submit(_task_info)
    script = job.paths.submission_file.read_text()
    for line in (
        "#SBATCH --ntasks-per-node=2",
        "#SBATCH --nodes=1",
        "#SBATCH --cpus-per-task=1",
        f"#SBATCH --partition={PARTITION}",
        f"#SBATCH --signal={SIGNAL}@{SIGNAL_DELAY_S}",
        "#SBATCH --requeue",
    ):
        assert line in script.splitlines(), f"{line!r} missing from\n{script}"
    _wait(job, JOB_TIMEOUT_S)

    results = job.results()
    assert isinstance(results, list) and len(results) == 2, results
    assert sorted(r["procid"] for r in results) == [0, 1]
    assert [r["rank"] for r in results] == [0, 1]  # submitit orders results by task
    assert sorted(r["localid"] for r in results) == [0, 1]
    assert {r["ntasks"] for r in results} == {2}
    assert {r["job_id"] for r in results} == {job.job_id}
    assert {r["host"] for r in results} == {socket.gethostname()}
    assert len({r["pid"] for r in results}) == 2  # two processes, not one function called twice


class CountTo(submitit.helpers.Checkpointable):
    """Counts to `total` (one step per `step_s`), saving its progress to `workdir/state.json` on checkpoint.

    Each attempt appends (SLURM_RESTART_COUNT, count it resumed from) to the saved state, so the result
    shows how many times the job ran and where each run started.
    """

    def __init__(self, workdir: str, total: int, step_s: float) -> None:
        self.workdir = Path(workdir)
        self.total = total
        self.step_s = step_s
        self.count = 0
        self.attempts: list[list[int]] = []

    def _log(self, message: str) -> None:
        with open(self.workdir / "events.log", "a") as f:
            f.write(f"{message}\n")

    def __call__(self) -> dict[str, object]:
        state = self.workdir / "state.json"
        if state.exists():  # resume from the saved progress, as a trainer resumes from its checkpoint
            saved = json.loads(state.read_text())
            self.count, self.attempts = saved["count"], saved["attempts"]
        self.attempts.append([int(os.environ.get("SLURM_RESTART_COUNT", "0")), self.count])
        self._log(f"start restart={self.attempts[-1][0]} from={self.count}")
        while self.count < self.total:
            time.sleep(self.step_s)
            self.count += 1
            (self.workdir / "progress").write_text(str(self.count))
        self._log(f"finished count={self.count}")
        return {"count": self.count, "attempts": self.attempts}

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        state = {"count": self.count, "attempts": self.attempts}
        (self.workdir / "state.json.tmp").write_text(json.dumps(state))
        os.replace(self.workdir / "state.json.tmp", self.workdir / "state.json")
        self._log(f"checkpoint count={self.count}")
        return super().checkpoint()


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def test_preempted_job_is_requeued_and_resumes(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    total = 12
    job = _executor(tmp_path).submit(CountTo(str(workdir), total=total, step_s=0.25))

    # Preempt mid-run: what slurm sends at --signal=USR1@N, delivered now to every task of the job's steps.
    # (`scancel --batch` would only signal the batch shell, which does not forward it to the srun'd task.)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while _read_int(workdir / "progress") < 2:
        if job.done() or time.monotonic() > deadline:
            pytest.fail(f"job {job.job_id} did not start counting\n{_diagnose(job)}")
        time.sleep(0.05)
    subprocess.run(["scancel", f"--signal={SIGNAL}", job.job_id], check=True, timeout=30)

    _wait(job, JOB_TIMEOUT_S)
    result = job.result()
    events = (workdir / "events.log").read_text().splitlines()
    checkpoints = [int(e.split("=")[1]) for e in events if e.startswith("checkpoint count=")]
    assert len(checkpoints) == 1, events
    saved = checkpoints[0]
    assert 2 <= saved < total, events

    assert result["count"] == total
    # Two attempts: the first from zero, the requeued one (SLURM_RESTART_COUNT=1) from the checkpoint.
    assert result["attempts"] == [[0, 0], [1, saved]], events
    assert events == [
        "start restart=0 from=0",
        f"checkpoint count={saved}",
        f"start restart=1 from={saved}",
        f"finished count={total}",
    ]
    log = (job.stdout() or "") + (job.stderr() or "")
    assert f"Caught signal SIG{SIGNAL} on {socket.gethostname()}: this job is preempted" in log, log
    assert f"Requeued job {job.job_id}" in log, log
    show = subprocess.run(["scontrol", "show", "job", job.job_id], capture_output=True, text=True, check=True)
    assert "Restarts=1" in show.stdout and "Requeue=1" in show.stdout, show.stdout
