"""Requeue on preemption, the process-level half: a signal handler that only raises a flag, and the requeue call.

SLURM sends the job's tasks SIGUSR1 `cluster.signal_delay_s` seconds before its time limit (`sbatch
--signal=USR1@120`, pipeline/slurm.py), and a scheduler preempting the job can send it too. The flag is read at the
next optimizer step by `pipeline.callbacks.RequeueOnPreemption`, which writes last.ckpt on every rank, then calls
`requeue_job()` on rank 0; the requeued job runs `aiayn train ... run.resume=auto` again and resumes from last.ckpt.

Why a flag, and not Lightning's or submitit's own handler (only one of them may own the signal):

- Lightning's SLURM auto-requeue (`SLURMEnvironment(auto_requeue=True)`) writes the checkpoint *inside* the
  signal handler, i.e. between any two Python bytecodes of any rank. Saving is collective (barriers; ZeRO shards), so
  a rank that takes the signal while another rank is blocked in backward's gradient all-reduce waits in the barrier
  for a rank that waits for it: a deadlock until SLURM kills the job (Lightning issue #21406; #21407 moves the save
  out of the handler, not released in 2.6.6). So it is turned off: `SLURMEnvironment(auto_requeue=False)`.
- submitit's checkpointing (`helpers.Checkpointable`) calls `checkpoint()` on global rank 0 only, also inside the
  handler, then requeues and exits: rank 0 alone cannot write a DDP/ZeRO checkpoint (the other ranks never join), so
  all it could do is requeue and lose the steps since the last periodic checkpoint. submitit's handler stays on its
  own signal (SUBMITIT_PREEMPT_SIGNAL, USR2 by default), which the sbatch script never asks SLURM to send.

Here the handler does nothing but set a flag; the checkpoint is written between two optimizer steps, where every
rank is at the same point and collectives are safe, which is where Lightning's own fix (#21407) moves it too.
This module imports only the standard library, so a job installs the handler before torch is even imported
(`install()` in pipeline/jobs.py): a signal that arrives during start-up is then not fatal either.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

REQUEUE_SIGNAL = signal.SIGUSR1  # what `--signal=USR1@<s>` sends (pipeline/slurm.py)

_received: list[int] = []  # signal numbers received; a list so that the handler only appends


def _handler(signum: int, frame: object) -> None:
    _received.append(signum)


def install(signum: int = REQUEUE_SIGNAL) -> None:
    """Route `signum` to the flag (idempotent). Only the main thread may set handlers; elsewhere this is a no-op."""
    try:
        if signal.getsignal(signum) is not _handler:
            signal.signal(signum, _handler)
    except ValueError:  # not the main thread
        pass


def requested() -> bool:
    """Whether this process received the requeue signal since it started."""
    return bool(_received)


def requeue_job() -> str:
    """`scontrol requeue` this job (an array task: <array job>_<task>); returns the id. SLURM then stops the job's
    tasks and queues it again with the same id, script and environment (SLURM_RESTART_COUNT counts the restarts)."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job_id = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(f"scontrol requeue {job_id} failed ({done.returncode}): {done.stderr.strip()}", file=sys.stderr)
    return job_id
