"""`aiayn params`: the model's trainable parameter count, as one JSON line."""

from __future__ import annotations

import json

import torch
from omegaconf import DictConfig, OmegaConf

from modules.config import TransformerConfig
from modules.transformer import Transformer


def count_parameters(cfg: DictConfig) -> dict[str, int]:
    """Build the model on the meta device (no memory, no init time) and count its parameters."""
    model_cfg = TransformerConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    with torch.device("meta"):
        model = Transformer(model_cfg)
    return model.parameter_counts()


def main(cfg: DictConfig) -> None:
    print(json.dumps(count_parameters(cfg)))
