"""`aiayn export run.dir=<run>`: a trained model as a small folder that translates with no Lightning, no pickle and
no dataset: its weights (safetensors), its configuration (JSON), its SentencePiece model, and a README line saying
what it is. `aiayn translate model_dir=<folder>` loads it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_model, save_model

from data.atomic import write_bytes_atomic, write_json_atomic, write_text_atomic
from data.prepare import resolve_data_config
from data.tokenizer import Tokenizer
from modules.config import TransformerConfig
from modules.transformer import Transformer
from pipeline import inference
from pipeline.errors import RunFolderError
from pipeline.runs import require_run_dir, resolve_checkpoint

FORMAT = "aiayn-export/1"
WEIGHTS_NAME, CONFIG_NAME, SPM_NAME = "model.safetensors", "config.json", "spm.model"


def export_model(cfg: DictConfig, checkpoint_path: Path, run_dir: Path, out_dir: Path) -> Path:
    """Write the model of checkpoint_path, with the run's BPE model and text cleaning, into out_dir."""
    model, checkpoint = inference.load_model(checkpoint_path)
    tokenizer = inference.load_tokenizer(cfg, run_dir)
    inference.check_vocabulary(model, tokenizer, checkpoint_path, "export")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{WEIGHTS_NAME}.tmp"
    save_model(model, str(tmp))  # tied weights are stored once and tied again by load_model
    tmp.replace(out_dir / WEIGHTS_NAME)
    write_bytes_atomic(out_dir / SPM_NAME, Path(tokenizer.model_path).read_bytes())
    config = {
        "format": FORMAT,
        "model": dataclasses.asdict(model.cfg),
        "clean": resolve_data_config(cfg.data)["clean"],
        "src_lang": cfg.data.src_lang,
        "tgt_lang": cfg.data.tgt_lang,
        "source": {
            "run": str(run_dir),
            "checkpoint": checkpoint_path.name,
            "global_step": checkpoint.get("global_step"),
        },
    }
    write_json_atomic(out_dir / CONFIG_NAME, config)
    params = model.parameter_counts()["params"]
    write_text_atomic(
        out_dir / "README.md",
        f"aiayn Transformer ({cfg.data.src_lang}->{cfg.data.tgt_lang}, {params:,} parameters, "
        f"{model.cfg.n_layers}+{model.cfg.n_layers} layers, d_model {model.cfg.d_model}, vocabulary "
        f"{model.cfg.vocab_size}) from {checkpoint_path.name} of {run_dir.name} (step {checkpoint.get('global_step')}):"
        f" `aiayn translate model_dir={out_dir}`.\n",
    )
    return out_dir


def load_exported(model_dir: Path) -> tuple[Transformer, Tokenizer, dict[str, Any]]:
    """An exported folder's model (eval mode), its BPE model and its text cleaning settings."""
    config_path = model_dir / CONFIG_NAME
    if not config_path.is_file():
        raise RunFolderError(f"model_dir={model_dir}: no {CONFIG_NAME}; make one with `aiayn export run.dir=<run>`")
    config = json.loads(config_path.read_text())
    if config.get("format") != FORMAT:
        raise RunFolderError(f"{config_path}: format {config.get('format')!r}, not {FORMAT!r}: export it again")
    model = Transformer(TransformerConfig.from_dict(config["model"]))
    load_model(model, str(model_dir / WEIGHTS_NAME))
    return model.eval(), Tokenizer(model_dir / SPM_NAME), config["clean"]


def main(cfg: DictConfig) -> Path:
    run_dir = require_run_dir(cfg, "export")
    checkpoint_path = resolve_checkpoint(cfg, run_dir)
    chosen = OmegaConf.select(cfg, "export.dir")
    out_dir = Path(chosen).expanduser().resolve() if chosen else run_dir / "export"
    export_model(cfg, checkpoint_path, run_dir, out_dir)
    print(out_dir)
    return out_dir
