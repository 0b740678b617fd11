"""W&B settings without training: the mode, the run's id and group, redaction, and rank 0 as the only writer.

What a training run logs is read back from its offline run in tests/test_train.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import OmegaConf

from pipeline.config import load_config
from pipeline.loggers import build_loggers, wandb_group, wandb_mode, wandb_run_id
from pipeline.secrets import redact


@pytest.fixture
def no_wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No WANDB_* variables, no SLURM job, and a home folder without a .netrc."""
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "NETRC", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_mode_offline_without_key_online_with_one_and_wandb_mode_wins(no_wandb_env, monkeypatch):
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_mode() == "online"
    for set_mode, mode in (("offline", "offline"), ("disabled", "disabled"), ("dryrun", "offline")):
        monkeypatch.setenv("WANDB_MODE", set_mode)
        assert wandb_mode() == mode
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_MODE", "online")
    assert wandb_mode() == "online"


def test_mode_online_with_a_netrc_entry_for_the_wandb_host(no_wandb_env, monkeypatch):
    """What `wandb login` writes: a netrc entry for the API host (WANDB_BASE_URL's, else api.wandb.ai)."""
    netrc = no_wandb_env / ".netrc"
    netrc.write_text("machine wandb.example.org\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    assert wandb_mode() == "offline"  # an entry for another host
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert wandb_mode() == "online"


def test_group_and_id_follow_the_slurm_job_and_the_run_folder(no_wandb_env, monkeypatch):
    cfg = load_config()
    stamped = Path("/runs/multi30k-20250101-120000")
    assert wandb_group(cfg) is None and wandb_run_id(cfg, stamped) == "multi30k-20250101-120000"
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    # A requeued job starts again with a new timestamped folder, but the same job id.
    assert wandb_group(cfg) == "777" and wandb_run_id(cfg, stamped) == "multi30k-slurm777"
    # An explicit run.dir (a resubmitted job continuing a run) names the run, whatever the job.
    explicit = load_config(["run.dir=/runs/base: 2 nodes"])
    assert wandb_run_id(explicit, Path("/runs/base: 2 nodes")) == "base--2-nodes"  # no ':' or ' ' in W&B ids
    chosen = load_config(["logger.wandb.group=sweep", "logger.wandb.id=abc"])
    assert wandb_group(chosen) == "sweep" and wandb_run_id(chosen, stamped) == "abc"


def test_redact_hides_secret_values_at_any_depth_and_nothing_else():
    config = {
        "a": 1,
        "hf_token": "x",
        "nested": [{"WANDB_API_KEY": "y", "keep": 2, "apiKey": "z"}],
        "db": {"password": "z"},
        "data": {"max_tokens": 4096, "vocab_size": 37000},
        "train": {"tokens_per_update": 25000},
        "secrets": {"token": "t", "note": "n"},
    }
    assert redact(config) == {
        "a": 1,
        "hf_token": "<redacted>",
        "nested": [{"WANDB_API_KEY": "<redacted>", "keep": 2, "apiKey": "<redacted>"}],
        "db": {"password": "<redacted>"},
        "data": {"max_tokens": 4096, "vocab_size": 37000},
        "train": {"tokens_per_update": 25000},
        "secrets": {"token": "<redacted>", "note": "n"},
    }
    # The real config keeps every value: none of its keys names a secret.
    resolved = OmegaConf.to_container(load_config(), resolve=True)
    assert redact(resolved) == resolved


def test_only_global_rank_zero_writes_a_wandb_run(no_wandb_env, monkeypatch):
    """Lightning's WandbLogger on a rank other than 0: every call is a no-op and no run folder appears."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    run_dir = no_wandb_env / "run"
    (logger,) = [lg for lg in build_loggers(load_config(), run_dir) if isinstance(lg, WandbLogger)]
    logger.log_hyperparams({"a": 1})
    logger.log_metrics({"train/loss": 1.0}, step=1)
    logger.log_table(key="val/samples", columns=["src", "ref", "hyp", "step"], data=[["a", "b", "c", 1]], step=1)
    logger.experiment.log({"x": 1})
    logger.finalize("success")
    assert not (run_dir / "wandb").exists()


def test_without_wandb_installed_training_logs_to_csv_and_says_so_in_one_line(no_wandb_env, monkeypatch, capsys):
    """wandb is a dependency, but an environment without it still trains (W&B on by default): the CSV logger only,
    and one line saying why and how to turn W&B on or the message off."""
    import importlib.util

    from lightning.pytorch.loggers import CSVLogger

    from pipeline.loggers import log_run_summary

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    cfg = load_config()
    assert cfg.logger.wandb.enabled
    loggers = build_loggers(cfg, no_wandb_env / "run")
    assert [type(lg) for lg in loggers] == [CSVLogger]
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "wandb is not installed" in line and "pip install wandb" in line and "logger.wandb.enabled=false" in line
    assert log_run_summary(cfg, no_wandb_env / "run", {"test/bleu": 1.0}) is None  # aiayn evaluate: the same
