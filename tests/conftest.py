"""Shared test settings: no network, W&B offline, everything generated under a temporary folder."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CORPORA_DIR = Path(os.environ.get("CORPORA_DIR", PROJECT_ROOT.parent / "shared" / "data")).resolve()

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# One intra-op thread per process, here and in every process a test starts (DDP ranks, SLURM tasks, CLI runs):
# the models are tiny, and with 2 threads per process on a shared 2-core machine OpenMP's spinning threads of
# concurrent processes wait on each other far longer than the work takes.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _no_wandb_run_outlives_its_test():
    """A W&B run left open by a test (a Trainer built with W&B on, but never finished) would be reused by the next
    WandbLogger in this process, which would then log into the wrong run folder."""
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


@pytest.fixture(scope="session")
def corpora_dir() -> Path:
    if not (CORPORA_DIR / "multi30k" / "train.en.gz").exists():
        raise FileNotFoundError(f"Multi30k not found under {CORPORA_DIR}: set CORPORA_DIR to the corpora folder")
    return CORPORA_DIR


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory, corpora_dir: Path) -> dict:
    """data=tiny with a 40-pair test split, prepared (tests/tiny_run.py). Shared by the test files of the stages
    after training: a test that changes its folders restores them or works on a copy."""
    from tiny_run import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny_run"), corpora_dir)


@pytest.fixture(scope="session")
def hand_made_run(tiny: dict) -> dict:
    """{"run": a run folder with checkpoints/step{100,200,300}.ckpt and last.ckpt, "states": their weights}."""
    from tiny_run import make_hand_made_run

    return make_hand_made_run(tiny, tiny["root"] / "run")


# --- The test process must end when the session ends. -----------------------------------------------------------
# A CI run once printed "118 passed" and then sat until the CI's time limit killed it: something kept the
# interpreter alive after the last test (a non-daemon child, which multiprocessing joins at exit, or a non-daemon
# thread, which the interpreter joins). What is still alive is listed and children are killed at the end of the
# session, and a watchdog prints every thread's stack and ends the process if it still has not exited later.
EXIT_WATCHDOG_S = 600


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    import threading
    import traceback

    import psutil

    wandb = sys.modules.get("wandb")
    if wandb is not None:
        wandb.teardown()  # W&B's own service process ends through W&B, not as a leftover below
    # multiprocessing's own helpers (the resource tracker, data/pool.py's forkserver) end when this process does.
    helpers = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")
    children = [c for c in psutil.Process().children(recursive=True) if not _cmdline_has(c, helpers)]
    threads = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if not children and not threads:
        return
    # stderr, not the terminal reporter: pytest-xdist workers have none, and their stderr reaches the output.
    write = functools.partial(print, file=sys.__stderr__, flush=True)
    write("\nstill alive at the end of the test session (a test did not clean up after itself):")
    for child in children:
        try:
            write(f"  child process {child.pid}: {' '.join(child.cmdline()) or child.name()}")
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=30)
    for thread in threads:
        frame = sys._current_frames().get(thread.ident)
        stack = traceback.format_stack(frame, limit=-4) if frame is not None else []
        target = getattr(thread, "_target", None) or thread.run
        write(f"  non-daemon thread {thread.name!r} running {target!r}:\n{''.join(stack)}")


def _cmdline_has(process, words: tuple[str, ...]) -> bool:
    import psutil

    try:
        cmdline = " ".join(process.cmdline())
    except psutil.Error:
        return False
    return any(word in cmdline for word in words)


def pytest_unconfigure(config: pytest.Config) -> None:
    import faulthandler

    # Ends (exit status 1) with every thread's Python stack on stderr if the interpreter is still running then.
    faulthandler.dump_traceback_later(EXIT_WATCHDOG_S, exit=True)
