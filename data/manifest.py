"""manifest.json: what a prepared dataset folder contains, and the proof that its preparation finished.

The manifest is written last, to a temporary name and then renamed (data/atomic.py), so its presence means every
shard and the BPE model next to it are complete. It records where the data came from (sha256 of each input file),
the BPE model's sha256, the resolved data config, per shard its pair/token counts and file checksums, and under
"lookup" what lets a later process find the folder without reading the corpus again (data/prepare.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from data.errors import DatasetNotPreparedError, ManifestMismatchError, SpmModelMismatchError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1  # bump when the shard layout changes: the dataset fingerprint includes it


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks so a multi-GB corpus never sits in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(dataset_dir: Path) -> dict:
    path = Path(dataset_dir) / MANIFEST_NAME
    if not path.is_file():
        raise DatasetNotPreparedError(
            f"no {MANIFEST_NAME} in {dataset_dir}: the dataset is not prepared (or its preparation was "
            "interrupted); run `aiayn prepare` with the same overrides (or data.prepare_dataset(...)) first"
        )
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version={manifest.get('format_version')}, this code reads {FORMAT_VERSION}; "
            "delete the folder and prepare the dataset again"
        )
    check_totals(manifest, path)
    return manifest


TOTALS = ("pairs", "src_tokens", "tgt_tokens")


def check_totals(manifest: dict, path: Path) -> None:
    """Each split's pair and token counts must be the sums of its shards' (a manifest edited by hand is not trusted
    any further: ShardedPairs then checks each shard's counts against its files)."""
    for split, entry in (manifest.get("splits") or {}).items():
        for key in TOTALS:
            if key not in entry:
                continue
            total = sum(shard.get(key, 0) for shard in entry.get("shards", []))
            if entry[key] != total:
                raise ManifestMismatchError(
                    f"{path} says split {split!r} has {entry[key]} {key}, but its shards add up to {total}: the "
                    f"manifest was edited; delete {Path(path).parent} and run `aiayn prepare` again"
                )


def is_complete(dataset_dir: Path) -> bool:
    """True when the manifest exists and every file it lists is present (checksums are checked on load)."""
    try:
        manifest = read_manifest(dataset_dir)
    except (FileNotFoundError, ValueError, json.JSONDecodeError):
        return False
    files = [manifest["spm_model"]["file"]]
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            files += [f["file"] for f in shard["files"].values()]
    return all((Path(dataset_dir) / f).is_file() for f in files)


def verify_spm_model(dataset_dir: Path, manifest: dict, sha256: str | None = None) -> None:
    """The sentencepiece model beside the manifest must be the one its shards were encoded with.

    Ids from one BPE model read with another are silently wrong text, so a mismatch is an error naming the
    manifest, the model file and both sha256s. `sha256` may be passed if the caller already hashed the model.
    """
    model = Path(dataset_dir) / manifest["spm_model"]["file"]
    if sha256 is None:
        sha256 = file_sha256(model) if model.is_file() else "missing"
    expected = manifest["spm_model"]["sha256"]
    if sha256 != expected:
        raise SpmModelMismatchError(
            f"{Path(dataset_dir) / MANIFEST_NAME} was written with the sentencepiece model sha256 {expected}, but "
            f"{model} has sha256 {sha256}; its token ids belong to another vocabulary: delete {dataset_dir} "
            "and prepare it again"
        )
