"""aiayn's own jobs on a real single-node SLURM cluster (scripts/slurm_local.sh): `aiayn run` / `aiayn submit`.

One stage graph is run for the whole module (fixture `graph`): prepare (a CPU job) -> train (2 tasks = 2 CPU
processes under srun, DDP over gloo) -> average -> evaluate, chained by afterok. The training job is sent SIGUSR1
while it trains, as SLURM does before a time limit, so the same job also shows the checkpoint -> requeue -> resume
path.
"""

from __future__ import annotations

import json
import re
import shlex
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from slurm_fixture import slurm_cluster  # noqa: F401  (session fixture, used through usefixtures)
from submitit.core.utils import JobPaths, pickle_load
from tiny_run import TINY_MODEL

from pipeline import cli
from pipeline.cluster import ClusterConfigError
from pipeline.config import load_config
from pipeline.runs import graph_run_dir
from pipeline.slurm import make_job, sbatch_script
from pipeline.stages import STAGES, run_graph

pytestmark = pytest.mark.usefixtures("slurm_cluster")

MAX_STEPS = 20  # leaves 15 steps after the first checkpoint for the SIGUSR1 to land in training
EVERY = 5  # periodic checkpoints: the signal is sent once the first one exists, i.e. after step 5
# Upper bound for the whole graph on a loaded 2-core machine (on an idle one it takes about 2 minutes).
GRAPH_TIMEOUT_S = 3 * 3600


def _overrides(tmp: Path, corpora_dir: Path) -> list[str]:
    return [
        *TINY_MODEL,
        "data=tiny",
        f"paths.output_dir={tmp / 'outputs'}",
        f"paths.corpora_dir={corpora_dir}",
        f"run.dir={tmp / 'run'}",
        "cluster=slurm",
        "cluster.gpus_per_node=2",  # 2 tasks, each one CPU process (trainer.accelerator stays cpu: no GPU request)
        "cluster.cpus_per_task=1",  # the node has 2 CPUs
        "cluster.time=04:00:00",  # an upper bound: on a loaded 2-core host one start-up can take 15 minutes
        "strategy=ddp",
        "trainer.precision=32-true",
        f"trainer.max_steps={MAX_STEPS}",
        f"trainer.val_check_interval={MAX_STEPS}",
        f"checkpoint.every_n_train_steps={EVERY}",
        "trainer.enable_progress_bar=false",
        "logger.wandb.enabled=false",
        "run.val_bleu_sentences=8",  # greedy decoding at validation, kept short
        "evaluate.max_extra=10",  # short outputs: the tiny model's greedy search stops early on this slow CPU
        "evaluate.beam=1",  # greedy: the stage graph is what is tested here, beam search in test_average_evaluate
    ]


def _scontrol(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, check=True)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def _queued() -> list[str]:
    return subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout.split()


# Pending reasons that never clear by themselves: the job asks for more than the cluster has (e.g. a node with
# fewer CPUs than the tasks need), or a dependency failed. Waiting for GRAPH_TIMEOUT_S would only hide the cause.
NEVER_STARTS = {"PartitionConfig", "BadConstraints", "PartitionNodeLimit", "PartitionTimeLimit"}
NEVER_STARTS |= {"DependencyNeverSatisfied"}


def _check_startable(jobs: dict) -> None:
    queued = set(_queued())
    for stage, job in jobs.items():
        if job.job_id not in queued:
            continue
        info = _scontrol(job.job_id)
        if info.get("JobState") == "PENDING" and info.get("Reason") in NEVER_STARTS:
            nodes = subprocess.run(["scontrol", "-o", "show", "node"], capture_output=True, text=True).stdout
            pytest.fail(f"{stage} job {job.job_id} can never start (Reason={info['Reason']}): {info}\nnodes: {nodes}")


def _logs(job) -> str:
    folder = Path(str(job.paths.folder))
    return "\n".join(f"--- {p.name} ---\n{p.read_text()[-3000:]}" for p in sorted(folder.glob("*_log.*")))


@dataclass
class Graph:
    cfg: object
    overrides: list[str]
    run_dir: Path
    jobs: dict  # stage -> submitit Job
    report: list
    signalled_at: float


@pytest.fixture(scope="module")
def graph(tmp_path_factory, corpora_dir) -> Graph:
    tmp = tmp_path_factory.mktemp("slurm_graph")
    overrides = _overrides(tmp, corpora_dir)
    cfg = load_config(overrides)
    # Submitted from a shell where a launcher's variables point at a busy port (as Lightning leaves MASTER_PORT in a
    # process that trained): the jobs must take their world from SLURM, not from the submitting environment.
    with socket.socket() as busy, pytest.MonkeyPatch.context() as mp:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        mp.setenv("MASTER_ADDR", "127.0.0.1")
        mp.setenv("MASTER_PORT", str(busy.getsockname()[1]))
        mp.setenv("RANK", "5")
        report = run_graph(cfg, overrides)
        return _wait_for_graph(cfg, overrides, report)


def _wait_for_graph(cfg, overrides: list[str], report: list) -> Graph:
    jobs = {stage: job for stage, _, job in report}
    assert [s for s, _, _ in report] == [s.name for s in STAGES], report
    train = jobs["train"]
    # Preempt the training job once it has trained a few steps: SIGUSR1 to every task, as --signal=USR1@<s> does.
    checkpoints = graph_run_dir(cfg) / "checkpoints"
    deadline = time.monotonic() + GRAPH_TIMEOUT_S
    polls = 0
    while not any(checkpoints.glob("step*.ckpt")):
        if time.monotonic() > deadline or train.job_id not in _queued():
            pytest.fail(f"training job {train.job_id} wrote no checkpoint\n{_logs(train)}")
        polls += 1
        if polls % 50 == 0:
            _check_startable(jobs)
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", train.job_id], check=True, timeout=60)
    signalled_at = time.time()
    ids = {job.job_id for job in jobs.values()}
    while ids & set(_queued()):
        polls += 1
        if polls % 10 == 0:
            _check_startable(jobs)
        if time.monotonic() > deadline:
            pytest.fail(f"jobs {ids & set(_queued())} still queued after {GRAPH_TIMEOUT_S}s\n{_logs(train)}")
        time.sleep(1)
    for stage, job in jobs.items():
        state = _scontrol(job.job_id)["JobState"]
        assert state == "COMPLETED", f"{stage} job {job.job_id} is {state}\n{_logs(job)}"
    return Graph(cfg, overrides, graph_run_dir(cfg), jobs, report, signalled_at)


def test_stage_graph_runs_in_dependency_order(graph: Graph) -> None:
    """Each stage is its own job, started by SLURM only after the previous one ended (afterok)."""
    jobs = [graph.jobs[s.name] for s in STAGES]
    info = [_scontrol(j.job_id) for j in jobs]
    for i in range(1, len(jobs)):
        prev, prev_info, job, job_info = jobs[i - 1], info[i - 1], jobs[i], info[i]
        assert f"--dependency=afterok:{prev.job_id}" in job.paths.submission_file.read_text()
        assert job_info["StartTime"] >= prev_info["EndTime"], (prev_info, job_info)  # ISO times sort as text
    # prepare was a one-task CPU job; its output is what train read
    assert info[0]["NumTasks"] == "1" and "gres/gpu" not in info[0].get("TRES", "")
    assert (graph.run_dir / "summary.json").is_file()
    # average, then evaluate, used the finished run: the averaged model of its last checkpoints was scored
    assert (graph.run_dir / "averaged.ckpt").is_file()
    scores = json.loads((graph.run_dir / "eval-test.json").read_text())
    assert scores["checkpoint"] == str(graph.run_dir / "averaged.ckpt") and scores["global_step"] == MAX_STEPS
    assert scores["sentences"] > 0
    # The same config again: every stage's outputs exist, nothing is submitted.
    queued = _queued()
    again = run_graph(load_config(graph.overrides), graph.overrides)
    assert [(s, status) for s, status, _ in again] == [(s.name, "skipped") for s in STAGES]
    assert _queued() == queued


def test_training_job_is_one_ddp_world_of_two_tasks(graph: Graph) -> None:
    """Both srun tasks trained as ranks 0 and 1 of one world of size 2 in Lightning's SLURMEnvironment."""
    train = graph.jobs["train"]
    results = [pickle_load(JobPaths(train.paths.folder, train.job_id, task).result_pickle) for task in (0, 1)]
    assert [status for status, _ in results] == ["success", "success"], results
    summaries = [r for _, r in results]
    assert [s["global_rank"] for s in summaries] == [0, 1]
    assert {s["world_size"] for s in summaries} == {2}
    assert {s["cluster_environment"] for s in summaries} == {"SLURMEnvironment"}
    assert {s["steps"] for s in summaries} == {MAX_STEPS}
    script = train.paths.submission_file.read_text().splitlines()
    for line in ("#SBATCH --ntasks-per-node=2", "#SBATCH --nodes=1", "#SBATCH --cpus-per-task=1"):
        assert line in script
    assert not any(line.startswith("#SBATCH --gpus") for line in script)  # accelerator cpu: no GPU request
    assert any(line.startswith("srun ") for line in script)
    saved = json.loads((graph.run_dir / "summary.json").read_text())
    assert saved["steps"] == MAX_STEPS and saved["world_size"] == 2


def test_preempted_training_job_requeues_and_resumes_from_its_checkpoint(graph: Graph) -> None:
    train = graph.jobs["train"]
    log = "\n".join(Path(p).read_text() for p in sorted(Path(str(train.paths.folder)).glob("*_0_log.*")))
    saved = [int(s) for s in re.findall(r"preempted: saved \S+last\.ckpt at step (\d+)", log)]
    assert len(saved) == 1, log[-4000:]
    step = saved[0]
    assert EVERY <= step < MAX_STEPS, log[-4000:]
    assert f"requeued SLURM job {train.job_id}" in log
    starts = re.findall(r"training starts at step (\d+): (.*)", log)
    assert starts[0] == ("0", f"fresh (SLURM job {train.job_id}, restart 0)"), starts
    last = graph.run_dir / "checkpoints" / "last.ckpt"
    assert starts[1] == (str(step), f"resumed from {last} (SLURM job {train.job_id}, restart 1)"), starts
    assert len(starts) == 2
    info = _scontrol(train.job_id)
    assert info["Restarts"] == "1" and info["Requeue"] == "1", info
    summary = json.loads((graph.run_dir / "summary.json").read_text())
    assert summary["start_step"] == step and summary["resumed_from"] == str(last)
    assert summary["steps"] == MAX_STEPS


def test_dry_run_prints_the_submitted_script(graph: Graph, tmp_path, capsys) -> None:
    """--dry-run prints the script submitit writes (the same text as the training job's submission file) and
    submits nothing."""
    train = graph.jobs["train"]
    dependency = f"afterok:{graph.jobs['prepare'].job_id}"
    dry = sbatch_script(make_job(graph.cfg, "train", graph.overrides, graph.run_dir, dependency))
    assert dry == train.paths.submission_file.read_text()

    queued = _queued()
    # 2 x 8 GPUs: data.max_tokens 1562 keeps the update at train.tokens_per_update=25000 (pipeline/validate.py)
    paper = ["experiment=wmt14_base", "cluster=slurm", "cluster.nodes=2", "cluster.gpus_per_node=8"]
    paper.append("data.max_tokens=1562")
    cli.main(["submit", "--dry-run", *paper, f"paths.output_dir={tmp_path}"])
    script = capsys.readouterr().out.splitlines()
    assert _queued() == queued
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --signal=USR1@120",
        "#SBATCH --requeue",
        "#SBATCH --time=1440",
        "#SBATCH --job-name=wmt14_base.train",
    ):
        assert line in script, "\n".join(script)
    srun = [line for line in script if line.startswith("srun ")]
    assert len(srun) == 1 and srun[0].endswith(" -u -m submitit.core._submit " + srun[0].split()[-1])
    runs = [line for line in script if line.startswith("# runs: aiayn train experiment=wmt14_base")]
    words = shlex.split(runs[0].removeprefix("# runs: "))  # the command as the shell would split it
    assert len(runs) == 1 and "run.resume=auto" in words
    assert any(w.startswith("run.dir='/") and w.endswith("'") for w in words)  # quoted for Hydra


def test_cluster_layout_links_trainer_and_planner() -> None:
    cfg = load_config(["experiment=wmt14_base", "cluster=slurm", "cluster.nodes=2", "cluster.gpus_per_node=4"])
    assert (cfg.trainer.num_nodes, cfg.trainer.devices, cfg.cluster.gpus) == (2, 4, 4)
    for bad in ("trainer.devices=2", "trainer.num_nodes=3", "cluster.gpus=2"):
        with pytest.raises(ClusterConfigError, match=bad.split("=")[0]):
            load_config(["cluster=slurm", bad])


def test_run_folder_is_keyed_by_the_training_config(tmp_path) -> None:
    """`aiayn run` without run.dir: the same training settings find the same folder, a changed one a new folder;
    scheduling knobs (partition, time) do not count."""
    base = [f"paths.output_dir={tmp_path}", "cluster=slurm"]
    folder = graph_run_dir(load_config(base))
    assert folder.parent == tmp_path / "runs" and folder.name.startswith("multi30k-")
    assert graph_run_dir(load_config([*base, "cluster.partition=gpu", "cluster.time=1:00:00"])) == folder
    assert graph_run_dir(load_config([*base, "model.dropout=0.3"])) != folder
