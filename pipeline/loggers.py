"""Where metrics go: a CSV file in the run folder always, and Weights & Biases when enabled.

W&B mode: `WANDB_MODE` always wins; otherwise online when an API key is configured (WANDB_API_KEY or a
~/.netrc entry for the W&B host), offline when not. Offline runs are written under the run folder and can be
uploaded later from a machine with internet: `wandb sync <run folder>/wandb/offline-run-*`.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger
from omegaconf import DictConfig, OmegaConf

# Keys whose values never reach W&B's config panel.
SECRET_MARKERS = ("key", "token", "secret", "password")


def wandb_mode() -> str:
    """'online', 'offline' or 'disabled', following WANDB_MODE, else whether an API key is configured."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1]
        if netrc.netrc().authenticators(host):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError):
        pass
    return "offline"


def redact(value):
    """The config with secret-looking values replaced, safe to log."""
    if isinstance(value, dict):
        return {
            k: "<redacted>" if any(m in str(k).lower() for m in SECRET_MARKERS) else redact(v) for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def build_loggers(cfg: DictConfig, run_dir: Path) -> list[Logger]:
    loggers: list[Logger] = [CSVLogger(save_dir=str(run_dir), name="logs", version="")]
    wb = cfg.logger.wandb
    mode = wandb_mode()
    if wb.enabled and mode != "disabled":
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(
            WandbLogger(
                project=wb.project,
                group=wb.group,
                name=wb.name or run_dir.name,
                tags=list(wb.tags or []),
                save_dir=str(run_dir),
                offline=mode == "offline",
                # One W&B run per training run: a requeued job resumes into the same run id.
                id=wb.id or run_dir.name,
                resume="allow",
                config=redact(OmegaConf.to_container(cfg, resolve=True)),
            )
        )
    return loggers
