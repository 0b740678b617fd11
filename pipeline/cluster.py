"""The machines a run uses (conf/cluster/): one consistent layout for the planner, the trainer and the scheduler.

Under a scheduler (cluster=slurm) the job's layout is stated once, in cluster.nodes and cluster.gpus_per_node:
conf/cluster/slurm.yaml makes trainer.num_nodes, trainer.devices and the planner's cluster.gpus follow them.
`check_cluster` refuses a config where one of those was overridden to a different number, since Lightning's world
would then differ from the job's tasks (Lightning stops with a less direct error at the first collective).
"""

from __future__ import annotations

import re

from omegaconf import DictConfig


class ClusterConfigError(ValueError):
    """A cluster.* or linked trainer.* value that cannot be used; the message names the key and the fix."""


def scheduler(cfg: DictConfig) -> str | None:
    """'slurm' under cluster=slurm, None on this machine (cluster=local)."""
    return cfg.cluster.get("scheduler")


def check_cluster(cfg: DictConfig) -> None:
    """Under a scheduler, trainer.devices / trainer.num_nodes / cluster.gpus must equal the job's layout."""
    if scheduler(cfg) is None:
        return
    cluster = cfg.cluster
    linked = (
        ("trainer.devices", cfg.trainer.get("devices"), "cluster.gpus_per_node", cluster.gpus_per_node),
        ("trainer.num_nodes", cfg.trainer.get("num_nodes"), "cluster.nodes", cluster.nodes),
        ("cluster.gpus", cluster.gpus, "cluster.gpus_per_node", cluster.gpus_per_node),
    )
    for key, value, source, expected in linked:
        if value != expected:
            raise ClusterConfigError(
                f"{key}={value} disagrees with {source}={expected}: with cluster={scheduler(cfg)} the job's layout "
                f"is set by cluster.nodes and cluster.gpus_per_node only (conf/cluster/{scheduler(cfg)}.yaml links "
                f"{key} to {source}); drop the {key} override and set {source} instead"
            )


_TIME = re.compile(r"^(?:(\d+)-)?(\d+):(\d{1,2}):(\d{1,2})$")


def time_minutes(value: str) -> int:
    """sbatch's [D-]HH:MM:SS (cluster.time) in whole minutes, rounded up: what submitit's timeout_min takes."""
    match = _TIME.match(str(value).strip())
    if not match:
        raise ClusterConfigError(f"cluster.time={value!r} is not [D-]HH:MM:SS, e.g. cluster.time=24:00:00")
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return days * 24 * 60 + hours * 60 + minutes + (1 if seconds else 0)
