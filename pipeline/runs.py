"""Run folders: where a run lives, what later stages find in it (its checkpoints, averaged.ckpt, config.yaml), and
which checkpoint a command or a resumed run starts from. Every command and stage resolves run folders here."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from data.atomic import write_bytes_atomic, write_json_atomic, write_text_atomic
from modules.config import TransformerConfig
from pipeline.checkpoints import checkpoint_meta, readable_or_newest
from pipeline.config import output_dir
from pipeline.errors import RunFolderError
from pipeline.secrets import redact

AVERAGED_NAME = "averaged.ckpt"  # `aiayn average`'s output, in the run folder
LAST_NAME = "last.ckpt"  # in <run>/checkpoints/: a copy of the newest checkpoint
CONFIG_NAME = "config.yaml"  # the run's resolved configuration, written once
SPM_NAME = "spm.model"  # a copy of the dataset's SentencePiece model: the run translates without the dataset
DATASET_NAME = "dataset.json"  # the identity of the dataset the run trains on (data/manifest.py)
DATASET_KEY = "aiayn_dataset"  # the same identity, in every checkpoint: {"fingerprint", "spm_sha256"}

# The config sections whose values shape the trained model: the fingerprint of `aiayn run`'s run folder covers
# exactly these (not run.*, paths.output_dir, logger.*, cluster.* scheduling knobs, plan.*, device.*).
TRAINING_KEYS = ("seed", "model", "data", "optim", "train", "trainer", "strategy", "checkpoint")


def new_run_dir(cfg: DictConfig) -> Path:
    """run.dir if given, else <output_dir>/runs/<run.name>-<timestamp>: the folder a new training run writes to
    (not created here)."""
    if cfg.run.dir:
        return Path(cfg.run.dir).expanduser().resolve()
    return output_dir(cfg) / "runs" / f"{run_name(cfg)}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_name(cfg: DictConfig) -> str:
    """run.name as one folder name: no separators, no `..`, no control characters (it names a folder under
    <output_dir>/runs and never one elsewhere)."""
    name = str(cfg.run.name)
    if not name or name in (".", "..") or any(c in name for c in "/\\") or any(ord(c) < 32 for c in name):
        raise RunFolderError(f"run.name={name!r}: a run's name is one folder name (no /, no .., no control characters)")
    return name


def fingerprint(cfg: DictConfig) -> str:
    """sha256 (first 10 hex digits) of the resolved TRAINING_KEYS sections, less where the files are."""
    picked = training_settings(cfg)
    return hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()[:10]


def graph_run_dir(cfg: DictConfig) -> Path:
    """`aiayn run`'s folder: run.dir if set, else <output_dir>/runs/<run.name>-<fingerprint>, the same folder for
    the same config, so that running the same command again resumes or skips."""
    if cfg.run.dir:
        return Path(cfg.run.dir).expanduser().resolve()
    return output_dir(cfg) / "runs" / f"{run_name(cfg)}-{fingerprint(cfg)}"


def require_run_dir(cfg: DictConfig, command: str) -> Path:
    """run.dir as an existing folder, or an error naming the key."""
    if not cfg.run.get("dir"):
        raise RunFolderError(
            f"run.dir is not set: `aiayn {command}` works on a training run's folder; "
            f"pass run.dir=<output_dir>/runs/<run> (the folder `aiayn train` printed)"
        )
    path = Path(cfg.run.dir).expanduser().resolve()
    if path.is_file():
        raise RunFolderError(f"run.dir={cfg.run.dir}: a file, not a run folder; pass the folder `aiayn train` printed")
    if not path.is_dir():
        raise RunFolderError(f"run.dir={cfg.run.dir}: no such folder ({path})")
    return path


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def resolve_checkpoint(cfg: DictConfig, run_dir: Path | None, section: str = "evaluate") -> Path:
    """The checkpoint a command reads: <section>.checkpoint (a path; a relative one not found here is looked up
    inside run.dir), else run.dir's averaged.ckpt, else its checkpoints/last.ckpt. section: the command's config
    section (evaluate, translate)."""
    key, chosen = f"{section}.checkpoint", cfg[section].get("checkpoint")
    if chosen:
        path = Path(chosen).expanduser()
        if not path.is_absolute() and not path.exists() and run_dir is not None:
            path = run_dir / path
        if not path.exists():
            where = f" (also not in {run_dir})" if run_dir is not None else ""
            raise RunFolderError(f"{key}={chosen}: not found{where}")
        return path.resolve()
    if run_dir is None:
        raise RunFolderError(
            f"run.dir is not set and no {key}: pass run.dir=<output_dir>/runs/<run> (its averaged.ckpt, else "
            f"checkpoints/last.ckpt is used) or {key}=<checkpoint file>"
        )
    for path in (run_dir / AVERAGED_NAME, checkpoints_dir(run_dir) / LAST_NAME):
        if path.exists():
            return readable_or_newest(path) if path.name == LAST_NAME and path.is_file() else path
    raise RunFolderError(
        f"no {AVERAGED_NAME} and no checkpoints/{LAST_NAME} in run.dir={run_dir}: train (and `aiayn average`) "
        f"first, or name one with {key}=<path>"
    )


def resume_path(cfg: DictConfig, run_dir: Path) -> str | None:
    """The checkpoint training starts from: run.resume (a path), "last" (checkpoints/last.ckpt), or "auto":
    last.ckpt if it exists, else none (what a job runs with, so that its first attempt starts fresh and a
    requeued one resumes)."""
    resume = cfg.run.resume
    last = checkpoints_dir(run_dir) / LAST_NAME
    if resume == "auto" and not last.exists():
        return None
    if resume in ("auto", "last"):
        if not last.exists():
            raise RunFolderError(f"run.resume=last: no checkpoints/{LAST_NAME} in run.dir={run_dir}")
        return str(readable_or_newest(last) if last.is_file() else last)
    if resume and not Path(resume).expanduser().exists():
        raise RunFolderError(f"run.resume={resume}: no such checkpoint")
    return resume


def check_resume(cfg: DictConfig, checkpoint: str) -> None:
    """Before a run resumes from `checkpoint` (resume_path): it holds the model this config builds, else the model
    keys that differ are named (instead of Lightning's size mismatch per tensor once fit has started); and an
    explicitly chosen checkpoint (run.resume=last or a path; not "auto", nor a requeued SLURM job: a job that had
    finished) is before trainer.max_steps, else nothing would be trained."""
    path, resume = Path(checkpoint), cfg.run.resume
    if path.is_dir() and not (path / "latest").is_file():  # not a DeepSpeed checkpoint folder: a run folder?
        fix = (
            f"to continue that run: run.dir={path} run.resume=last"
            if checkpoints_dir(path).is_dir()
            else "name a checkpoint file (or a DeepSpeed checkpoint folder)"
        )
        raise RunFolderError(f"run.resume={resume}: a folder, not a checkpoint; {fix}")
    meta = checkpoint_meta(path)
    theirs = (meta.get("hyper_parameters") or {}).get("model")
    if isinstance(theirs, dict):
        defaults = {f.name: f.default for f in fields(TransformerConfig)}  # a key an older checkpoint lacks
        ours = {**defaults, **OmegaConf.to_container(cfg.model, resolve=True)}
        theirs = {**defaults, **theirs}
        differ = [key for key in defaults if ours[key] != theirs[key]]
        if differ:
            shown = ", ".join(f"model.{k}={ours[k]} (the checkpoint's: {theirs[k]})" for k in differ)
            raise RunFolderError(
                f"run.resume={resume}: {checkpoint} holds another model than this run's: {shown}; resume from a "
                "checkpoint of this model, or set those keys as the checkpoint has them"
            )
    step, max_steps = meta.get("global_step"), cfg.trainer.get("max_steps")
    requeued = int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0
    chosen = resume != "auto" and not requeued
    if chosen and isinstance(step, int) and isinstance(max_steps, int) and 0 <= max_steps <= step:
        raise RunFolderError(
            f"run.resume={resume}: {checkpoint} is at step {step} and trainer.max_steps={max_steps}, so nothing "
            f"would be trained; set trainer.max_steps above {step}"
        )


def job_resume(cfg: DictConfig, command: str) -> str | None:
    """run.resume for a stage run as a job (SLURM or `aiayn run`): training continues an interrupted run
    ("auto", unless run.resume names one); other stages leave it as the user set it (None)."""
    return (cfg.run.resume or "auto") if command == "train" else None


# Sections of TRAINING_KEYS that say how long and how often rather than what is computed: a resumed run may train
# longer, validate or checkpoint at another cadence. Their keys that change the arithmetic stay the run's.
OPERATIONAL_SECTIONS = ("trainer", "checkpoint")
ARITHMETIC_KEYS = ("trainer.precision", "trainer.accumulate_grad_batches")
OPERATIONAL_KEYS = ("train.max_skipped_updates",)  # when to give up, not what is computed
LOCATION_KEYS = ("data.corpora_dir", "data.download")  # machine paths and mirrors, not settings


def is_run_setting(key: str) -> bool:
    """Whether the dotted key is one of the run's own settings (TRAINING_KEYS, less the operational keys)."""
    top = key.split(".")[0]
    if key in OPERATIONAL_KEYS:
        return False
    if top in OPERATIONAL_SECTIONS:
        return any(key == k or key.startswith(f"{k}.") or k.startswith(f"{key}.") for k in ARITHMETIC_KEYS)
    return top in TRAINING_KEYS and not _is_location(key)


def _is_location(key: str) -> bool:
    """Where the corpora are and where they are fetched from: this machine's, not the run's setting."""
    return any(key == k or key.startswith(f"{k}.") for k in LOCATION_KEYS)


def training_settings(cfg: DictConfig) -> dict[str, Any]:
    """The resolved TRAINING_KEYS sections, less where the files are (paths differ from machine to machine)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    settings = {key: resolved.get(key) for key in TRAINING_KEYS}
    if isinstance(settings.get("data"), dict):
        settings["data"] = {k: v for k, v in settings["data"].items() if not _is_location(f"data.{k}")}
    return settings


def differing_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested containers (a key present in one only differs)."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [k for key in keys for k in differing_keys(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]


def save_config(cfg: DictConfig, run_dir: Path) -> Path:
    """<run>/config.yaml, written once, when the run starts: a later start in the same folder (a resume, a requeued
    job) must have the same training settings, or it is refused with the keys that differ, and the file that other
    commands read is never overwritten by another run's settings.

    The values of keys that name a secret (`+extra.hf_token=...`; pipeline/loggers.py is_secret) are written as
    `<redacted>`: secrets are no settings of the run, and a run folder is copied and shared. A later start is
    compared with its secrets redacted the same way, so a secret given again (or another one) is no difference."""

    path = run_dir / CONFIG_NAME
    plain = redact(OmegaConf.to_container(cfg, resolve=True))
    redacted = OmegaConf.create(plain)
    if path.is_file():
        saved = training_settings(OmegaConf.load(path))
        differ = [key for key in differing_keys(saved, training_settings(redacted)) if is_run_setting(key)]
        if differ:
            shown = ", ".join(f"{k}={_select(plain, k)} (the run's: {_select(saved, k)})" for k in differ[:6])
            more = f" and {len(differ) - 6} more" if len(differ) > 6 else ""
            raise RunFolderError(
                f"run.dir={run_dir} was started with other settings: {shown}{more}; start a new run folder, or "
                f"drop those overrides (its {CONFIG_NAME} holds the run's own)"
            )
        return path
    write_text_atomic(path, OmegaConf.to_yaml(redacted))
    return path


def _select(settings: dict, dotted: str) -> Any:
    node: Any = settings
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


# Sections a command on an existing run folder may set freely: how to decode, score, draw, average, where files
# are and which device computes. Every other section is the run's own (its config.yaml).
FREE_SECTIONS = (
    "run",
    "evaluate",
    "translate",
    "attention",
    "average",
    "export",
    "model_dir",
    "device",
    "paths",
    "logger",
)


def with_run_config(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """For a command on a trained run (evaluate, translate, attention, average): the run folder's config.yaml with
    the command line's free sections on top, so that no training override has to be typed again. An override of a
    training setting must agree with the run's, or it is refused by name. Without run.dir or a saved config (a run
    of an older version), cfg as it is."""
    if not cfg.run.get("dir"):
        return cfg
    path = Path(cfg.run.dir).expanduser() / CONFIG_NAME
    if not path.is_file():
        return cfg
    saved = OmegaConf.load(path)
    conflicts, operational = [], []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key.split(".")[0] not in TRAINING_KEYS:
            continue
        if not is_run_setting(key):
            operational.append(key)  # e.g. trainer.max_steps: a resumed run may go on longer
            continue
        ours, theirs = (_plain(OmegaConf.select(tree, key)) for tree in (cfg, saved))
        if key.split(".")[0] == "data" and isinstance(ours, dict):  # where the corpora are is not a setting
            ours, theirs = ({k: v for k, v in d.items() if not _is_location(f"data.{k}")} for d in (ours, theirs or {}))
        if ours != theirs:
            conflicts.append(f"{override} (the run's: {key}={theirs})")
    if conflicts:
        raise RunFolderError(
            f"run.dir={cfg.run.dir} was trained with other settings than {'; '.join(conflicts)}: drop the override "
            f"(the run folder's {CONFIG_NAME} applies)"
        )
    merged = OmegaConf.merge(saved, {key: cfg[key] for key in FREE_SECTIONS if key in cfg and key != "paths"})
    for key in operational:
        OmegaConf.update(merged, key, _plain(OmegaConf.select(cfg, key)), force_add=True)
    # Where the files are: the run's own folders while they exist here, this machine's where they do not (a copied
    # run folder), or where the command line says.
    for key in ("output_dir", "corpora_dir"):
        chosen = any(o.split("=", 1)[0].lstrip("+~") == f"paths.{key}" for o in overrides)
        if chosen or not Path(str(OmegaConf.select(saved, f"paths.{key}", default=""))).is_dir():
            OmegaConf.update(merged, f"paths.{key}", cfg.paths[key], force_add=True)
    if "data" in merged and not Path(str(merged.data.get("corpora_dir", ""))).is_dir():
        merged.data.corpora_dir = merged.paths.corpora_dir
    if "data" in merged and "download" in cfg.data:  # where missing corpora come from: this machine's setting
        merged.data.download = cfg.data.download
    return merged


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def record_dataset(run_dir: Path, dataset_dir: Path, manifest: dict[str, Any], spm_model: Path) -> None:
    """What the run trains on, kept in its folder: a copy of the SentencePiece model (so the run translates without
    the dataset or the corpora) and the dataset's identity, <run>/dataset.json."""
    if not (run_dir / SPM_NAME).is_file():
        write_bytes_atomic(run_dir / SPM_NAME, Path(spm_model).read_bytes())
    identity = {
        "dataset_dir": str(dataset_dir),
        "fingerprint": manifest.get("fingerprint"),
        "spm_sha256": manifest["spm_model"].get("sha256"),
        "vocab_size": manifest["spm_model"].get("vocab_size"),
    }
    write_json_atomic(run_dir / DATASET_NAME, identity)


def recorded_dataset(run_dir: Path | None) -> dict[str, Any] | None:
    """<run>/dataset.json, or None (no run folder, or a run of an older version)."""
    if run_dir is None or not (run_dir / DATASET_NAME).is_file():
        return None
    return json.loads((run_dir / DATASET_NAME).read_text())
