"""Session fixture `slurm_cluster`: a real single-node SLURM cluster started by scripts/slurm_local.sh.

Not collected by pytest (no test_ prefix). Use it from a test module with
`from slurm_fixture import slurm_cluster  # noqa: F401` and `@pytest.mark.usefixtures("slurm_cluster")`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = PROJECT_ROOT / "scripts" / "slurm_local.sh"
START_TIMEOUT_S = 1800  # a fresh machine installs slurm + munge with apt first (~3 min here)
STOP_TIMEOUT_S = 120
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])


def _run(action: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), action],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _describe(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit code {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[Path]:
    """Start (or reuse) the local cluster, export SLURM_CONF, yield the slurm.conf path.

    The daemons are stopped at the end of the session only if this fixture started them.
    """
    if os.geteuid() != 0 and shutil.which("slurmctld", path=SBIN_PATH) is None:
        pytest.fail(
            "SLURM is not installed and these tests are not running as root, so scripts/slurm_local.sh "
            "cannot install it: run `sudo apt-get install slurmctld slurmd slurm-client munge` "
            "(or `sudo scripts/slurm_local.sh start`) first",
            pytrace=False,
        )
    try:
        started = _run("start", START_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{SCRIPT} start did not finish in {START_TIMEOUT_S}s: {exc}", pytrace=False)
    if started.returncode != 0:
        pytest.fail(f"{SCRIPT} start failed: {_describe(started)}", pytrace=False)
    lines = started.stdout.strip().splitlines()
    if not lines or not lines[-1].startswith("export SLURM_CONF="):
        pytest.fail(f"{SCRIPT} start printed no `export SLURM_CONF=...` line: {_describe(started)}", False)
    conf = Path(lines[-1].split("=", 1)[1].strip())
    started_here = "# started" in lines
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", str(conf))
        mp.setenv("PATH", SBIN_PATH)
        try:
            yield conf
        finally:
            if started_here:
                stopped = _run("stop", STOP_TIMEOUT_S)
                if stopped.returncode != 0:
                    print(f"warning: {SCRIPT} stop failed: {_describe(stopped)}")
