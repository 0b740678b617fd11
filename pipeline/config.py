"""Loading the Hydra config tree in conf/ with command-line overrides."""

from __future__ import annotations

import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from pipeline.cluster import check_cluster

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = Path(os.environ.get("AIAYN_CONF_DIR", PROJECT_ROOT / "conf"))

if not OmegaConf.has_resolver("aiayn.root"):
    OmegaConf.register_new_resolver("aiayn.root", lambda: str(PROJECT_ROOT))


def machine_accelerator() -> str:
    """`${aiayn.accelerator:}`: "gpu" where torch sees a CUDA device, else "cpu" (conf/trainer/local.yaml).

    The check is Lightning's own (NVML-based, so that a process forked afterwards can still start CUDA)."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # as lightning.fabric sets it on import
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


if not OmegaConf.has_resolver("aiayn.accelerator"):
    OmegaConf.register_new_resolver("aiayn.accelerator", machine_accelerator)


def load_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose conf/config.yaml with Hydra overrides such as `model=base` or `trainer.max_steps=50`.

    Composition only: `aiayn` loads through pipeline/validate.py (load_checked, then validate for the command),
    which turns a bad override or value into one line naming the key and the fix."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="aiayn"):
        cfg = compose(config_name="config", overrides=list(overrides))
    check_cluster(cfg)  # under a scheduler, trainer.devices/num_nodes must match the job's tasks
    return cfg


def output_dir(cfg: DictConfig) -> Path:
    """The one folder every generated file goes under (paths.output_dir, or $AIAYN_OUTPUT_DIR)."""
    path = Path(cfg.paths.output_dir).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path
