"""`aiayn prepare`: the configured corpus cleaned, BPE-encoded and sharded into its dataset folder (data/prepare.py),
unless that folder is already complete, and checked (every shard file against the manifest's sha256 and counts).

A folder an interrupted run left is continued: `resuming: ...` lines say what is reused."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from data.manifest import is_complete
from data.prepare import dataset_dir_for, prepare_dataset, verify_prepared
from pipeline.config import output_dir
from pipeline.progress import Progress


def main(cfg: DictConfig) -> Path:
    dataset_dir = dataset_dir_for(cfg.data, output_dir(cfg))
    if is_complete(dataset_dir):
        # a corrupted shard or an edited manifest is a one-line error naming the file, not "already prepared"
        verify_prepared(dataset_dir)
        print(f"already prepared: {dataset_dir}")
        return dataset_dir
    # Pairs read for the BPE sample and encoded per split: a bar on a terminal, else a line every few seconds.
    dataset_dir = prepare_dataset(cfg.data, output_dir(cfg), progress=Progress, say=_say)
    print(dataset_dir)
    return dataset_dir


def _say(line: str) -> None:
    print(line, flush=True)
