"""Processes for the tests, started by forking the test process instead of starting a new interpreter.

A new `python -m pipeline train` re-imports torch, Lightning and DeepSpeed, which took 1.5-4 minutes per process on
the loaded 2-core machines CI runs on (`python -c "import lightning"`: 154 s wall). A forked child shares the
imports already done here, and is still a process of its own: its own session (so a SIGKILL to its group is a
node failure), environment, log file, exit status and, for a distributed run, its own rank in a gloo world.

`torchrun_fork` is torchrun without the re-exec: it sets each rank's variables exactly as torchrun does
(`RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `TORCHELASTIC_RUN_ID`, ...), so Lightning takes the world from
its `TorchElasticEnvironment` and DeepSpeed from the same variables, and no launcher starts further processes.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pipeline.slurm import LAUNCHER_VARIABLES

_FORK = multiprocessing.get_context("fork")
# Variables that would make a child join some other job's process group or cluster environment.
_FOREIGN_PREFIXES = ("SLURM_", "TORCHELASTIC_", "PMI_", "OMPI_", "LSB_", "KUBERNETES_")
_FOREIGN = {*LAUNCHER_VARIABLES, "PL_DEEPSPEED_CONFIG_PATH"}


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any launcher's or scheduler's variables, one intra-op thread, W&B off."""
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN and not k.startswith(_FOREIGN_PREFIXES)}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="disabled", **extra)
    return env


def _child_main(target: Callable, args: tuple, env: dict[str, str], log: Path) -> None:
    os.setsid()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    old = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    sys.stdout = sys.__stdout__ = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = sys.__stderr__ = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    # Logging handlers made while pytest captured output hold its streams: point them at the log file too.
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for lg in loggers:
        for handler in lg.handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream in old:
                handler.setStream(sys.stderr)
    os.environ.clear()
    os.environ.update(env)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    target(*args)
    # The child ends with os._exit (multiprocessing), skipping interpreter finalization, where a process group
    # that is still alive would be destroyed with its worker threads running: ZeRO-3's second gloo group made
    # that abort ("terminate called without an active exception", exit 134). So what finalization would
    # trip over is checked here instead: the code under test must have torn the world down itself.
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        raise SystemExit(
            "the process group is still initialized at the end of the process: destroy it before exiting "
            "(torch.distributed.destroy_process_group(), as pipeline/train.py does)"
        )


class Child:
    """One forked process running `target(*args)`; exit status 0 on return, 1 on an exception (traceback in log)."""

    def __init__(self, target: Callable, args: Sequence, env: dict[str, str], log: Path) -> None:
        self.log = Path(log)
        self.process = _FORK.Process(target=_child_main, args=(target, tuple(args), env, self.log), daemon=False)
        self.process.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> int | None:
        return self.process.exitcode

    def send_kill(self) -> None:
        """SIGKILL the child's whole session, as a node failure or `scancel` would; does not wait for it."""
        if self.process.exitcode is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def kill_all(children: Sequence[Child]) -> None:
    """SIGKILL every child, then wait for them. Signalled one by one with a wait between, a rank could see its
    killed peer's connection drop and exit with an error of its own before its SIGKILL arrives."""
    for child in children:
        child.send_kill()
    for child in children:
        child.process.join()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_fork(
    target: Callable, args: Sequence, nprocs: int, log_dir: Path, env: dict[str, str] | None = None
) -> list[Child]:
    """`nprocs` forked ranks of one standalone gloo world, each running `target(*args)` with torchrun's variables.

    Rank r logs to `log_dir/rank<r>.log`.
    """
    base = env or clean_env()
    port, run_id = str(free_port()), f"fork-{os.getpid()}-{time.monotonic_ns()}"
    children = []
    for rank in range(nprocs):
        rank_env = dict(base)
        rank_env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            GROUP_RANK="0",
            WORLD_SIZE=str(nprocs),
            LOCAL_WORLD_SIZE=str(nprocs),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            TORCHELASTIC_RUN_ID=run_id,
        )
        children.append(Child(target, args, rank_env, Path(log_dir) / f"rank{rank}.log"))
    return children


def wait_all(children: Sequence[Child], timeout: float) -> list[int]:
    """Wait for every child; on the first failure or the deadline, kill the rest (a rank waiting for a dead peer
    in a collective would otherwise wait for gloo's 30-minute timeout)."""
    deadline = time.monotonic() + timeout
    while any(c.poll() is None for c in children):
        failed = any(c.poll() not in (None, 0) for c in children)
        if failed or time.monotonic() > deadline:
            kill_all(children)
            break
        time.sleep(0.05)
    return [c.process.exitcode for c in children]


def aiayn(argv: Sequence[str]) -> None:
    """`aiayn <argv>` (what `python -m pipeline <argv>` runs), in this process."""
    from pipeline import cli

    cli.main(list(argv))
