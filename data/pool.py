"""Parallel encoding on all cores: shard jobs (data/encode.py) run in a process pool, results come back in order.

sentencepiece's own C++ threads scale poorly (cleaning is Python, and the text crosses the GIL), so `aiayn
prepare` runs whole shards in separate processes instead: `data.num_prepare_workers` of them (null: one per core).
Each worker reads its line range from the memory-mapped Arrow files, cleans, encodes and writes its shard itself;
only the shard's record (a small dict) comes back. At most 2 x workers shards are in flight, and results are
consumed in shard order, so memory stays flat however many shards the corpus has.

Workers are forked from a forkserver that imported data.encode once (not `spawn`: each worker would import
pyarrow and sentencepiece again; not `fork`: the preparing process may hold threads and locks). With one worker,
or one shard to do, jobs run in this process: no start-up cost for small corpora.

Workers end with the process that started the pool, however it ends (kill -9 included): each watches it
(`_exit_with`). Without that, a killed `aiayn prepare` left its workers running, still writing shards, and with them
the forkserver and the resource tracker, which live as long as any worker does.
"""

from __future__ import annotations

import multiprocessing
import os
import select
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

from data.atomic import pid_alive
from data.encode import ShardJob, encode_shard
from data.errors import SourceConfigError

POLL_S = 1.0  # how often a worker looks whether the preparing process still runs, where it cannot wait for it


def _exit_with(parent: int) -> None:
    """Worker initializer: end this worker as soon as process `parent` (the one that started the pool) has ended.

    A worker's own parent is the forkserver, not the preparing process, and the forkserver itself lives as long as
    a worker does, so PR_SET_PDEATHSIG would not fire. The worker watches the preparing process instead, on a daemon
    thread: a pidfd (Linux >= 5.3) becomes readable when it ends; elsewhere the thread looks every POLL_S seconds.
    A shard being written is left as a temporary file, which the next run removes (data/atomic.py)."""
    try:
        pidfd = os.pidfd_open(parent)
    except ProcessLookupError:
        os._exit(1)  # ended before this worker started
    except (AttributeError, OSError):  # not Linux, or an older kernel
        pidfd = None
    threading.Thread(target=_wait_then_exit, args=(parent, pidfd), name="exit-with-parent", daemon=True).start()


def _wait_then_exit(parent: int, pidfd: int | None) -> None:
    if pidfd is not None:
        select.select([pidfd], [], [])
    else:
        while pid_alive(parent):
            time.sleep(POLL_S)
    os._exit(1)  # the whole process, at once: no shard record is written after this


def resolve_workers(value: Any) -> int:
    """data.num_prepare_workers: null -> os.cpu_count(); otherwise a positive int."""
    if value is None:
        return os.cpu_count() or 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SourceConfigError(
            f"data.num_prepare_workers={value!r}: use a positive number of processes, or null for one per core"
        )
    return value


class _Inline:
    """A job run in this process when its result is asked for (keeps the sequential order of work)."""

    def __init__(self, job: ShardJob):
        self.job = job

    def result(self) -> dict[str, Any]:
        return encode_shard(self.job)


class ShardPool:
    """Runs ShardJobs on `workers` processes (started on first need, reused across splits); a context manager."""

    def __init__(self, workers: int):
        self.workers = workers
        self._executor: ProcessPoolExecutor | None = None

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["data.encode", "data.pool"])  # imported once; workers fork from it
            self._executor = ProcessPoolExecutor(
                self.workers, mp_context=context, initializer=_exit_with, initargs=(os.getpid(),)
            )
        return self._executor

    def parallel(self, n_jobs: int) -> bool:
        """Whether `n_jobs` jobs run on worker processes (else here, one after the other)."""
        return self.workers > 1 and n_jobs > 1

    def run(self, items: Iterable[ShardJob | Any], n_jobs: int) -> Iterator[Any]:
        """For each item in order: a ShardJob's record once its shard is written, anything else as it is.

        `n_jobs` (how many items are jobs) decides whether a pool is worth starting.
        """
        parallel = self.parallel(n_jobs)
        window = 2 * self.workers if parallel else 1
        in_flight: deque[Future | _Inline | Any] = deque()
        for item in items:
            if isinstance(item, ShardJob):
                item = self._pool().submit(encode_shard, item) if parallel else _Inline(item)
            in_flight.append(item)
            while len(in_flight) > window:
                yield _result(in_flight.popleft())
        while in_flight:
            yield _result(in_flight.popleft())

    def close(self) -> None:
        """Stop the workers: shards not started are cancelled, running ones finish writing (atomically)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> ShardPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _result(item: Any) -> Any:
    return item.result() if isinstance(item, Future | _Inline) else item
