"""Raw parallel text -> a prepared dataset folder: the joint BPE model plus every split encoded into shards.

    <output_dir>/data/<name>-<fingerprint[:10]>/
        spm.model, spm.vocab          the joint BPE vocabulary (section 5.1)
        train/shard-00000.*.npy ...   encoded pairs (data/shards.py)
        valid/..., test/...
        manifest.json                 written last: its presence means the folder is complete

The fingerprint hashes everything that changes the folder's content (the input files' sha256, or a Hub dataset's
name/config/split/revision; the vocabulary size, max_len, the cleaning steps, ...), so every DDP rank computes the
same folder name on its own, a changed setting gets a new folder beside the old one, and preparing twice with the
same inputs does nothing the second time.

Shards are encoded in parallel, one per worker process (data/pool.py, data/encode.py; data.num_prepare_workers),
and collected in shard order, so the folder is byte for byte the same whatever the number of workers.

A run that is killed resumes where it stopped: spm.model and every shard appear only when whole (written under a
temporary name, then renamed; a shard's record last), so the next run with the same config reuses them and
encodes only the shards still missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm
from filelock import FileLock  # a dependency of `datasets` and torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from data.clean import Cleaner, resolve_clean_config
from data.corpus import ParallelCorpus
from data.dedup import Deduplicator
from data.encode import ENCODE_BATCH, ShardJob
from data.manifest import FORMAT_VERSION, MANIFEST_NAME, file_sha256, is_complete, write_json_atomic
from data.pool import ShardPool, resolve_workers
from data.shards import finished_shard, load_shard, remove_shard, write_shard
from data.sources import READER_VERSION, Source, describe, parse_split
from data.tokenizer import Tokenizer, train_sentencepiece

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("name", "splits", "vocab_size", "spm_sample_lines", "max_len", "max_tokens", "shard_lines")
# The keys that change what ends up in the folder. max_tokens and num_workers only change batching,
# num_prepare_workers only how fast the folder is written (its content is the same for any number).
CONTENT_KEYS = ("src_lang", "tgt_lang", "vocab_size", "spm_sample_lines", "max_len", "shard_lines")
PENDING = ".pending"  # candidate shards awaiting de-duplication (data/dedup.py), under the dataset folder
CLEAN_COUNTS = ("changed", "removed")
SPM_SEED = 1


def resolve_data_config(data_cfg: DictConfig | dict) -> dict[str, Any]:
    """The data config as a plain dict with interpolations resolved, after checking the keys we need."""
    cfg = OmegaConf.to_container(data_cfg, resolve=True) if isinstance(data_cfg, DictConfig) else dict(data_cfg)
    missing = [k for k in REQUIRED_KEYS if cfg.get(k) is None]
    if missing:
        raise KeyError(f"data config lacks {', '.join('data.' + k for k in missing)} (see conf/data/*.yaml)")
    if "train" not in cfg["splits"]:
        raise KeyError(f"data.splits has no 'train' split (it has {sorted(cfg['splits'])}): BPE is trained on it")
    return cfg


def split_sources(cfg: dict[str, Any]) -> dict[str, list[Source]]:
    """{split: [Source, ...]} from data.splits (layouts in data/sources.py); files are checked to exist."""
    return {split: parse_split(split, spec, cfg) for split, spec in cfg["splits"].items()}


def dataset_fingerprint(data_cfg: DictConfig | dict) -> tuple[str, dict[str, Any]]:
    """sha256 over the input files' CONTENT (not path or mtime: a copied corpus keeps its folder) + content keys.

    A Hub source counts by its name, config, split and revision (pin `revision` for a fixed fingerprint).
    Returns (fingerprint hex, the input description stored in the manifest as "source").
    """
    cfg = resolve_data_config(data_cfg)
    sources = [s for group in split_sources(cfg).values() for s in group]
    sha = {path: file_sha256(path) for s in sources for path in s.files.values()}
    source = {key: entry for s in sources for key, entry in describe(s, sha).items()}
    identity = {
        "format_version": FORMAT_VERSION,
        "reader_version": READER_VERSION,
        "sentencepiece": spm.__version__,
        "config": {k: cfg.get(k) for k in CONTENT_KEYS},
        "clean": resolve_clean_config(cfg.get("clean")),
        # what identifies each input: its bytes' sha256 and read options, never its path
        "inputs": {
            key: {k: v for k, v in entry.items() if k not in ("path", "bytes")} for key, entry in source.items()
        },
    }
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return fingerprint, source


def dataset_dir_for(data_cfg: DictConfig | dict, output_dir: str | os.PathLike) -> Path:
    """The folder that prepare_dataset fills for this config; the same on every rank and every run."""
    fingerprint, _ = dataset_fingerprint(data_cfg)
    return Path(output_dir) / "data" / f"{resolve_data_config(data_cfg)['name']}-{fingerprint[:10]}"


def prepare_dataset(data_cfg: DictConfig | dict, output_dir: str | os.PathLike) -> Path:
    """Train the joint BPE model and encode every split into shards, unless already done. Returns the folder."""
    cfg = resolve_data_config(data_cfg)
    output_dir = Path(output_dir)
    fingerprint, source = dataset_fingerprint(cfg)
    dataset_dir = output_dir / "data" / f"{cfg['name']}-{fingerprint[:10]}"
    if is_complete(dataset_dir):
        log.info("already prepared: %s", dataset_dir)
        return dataset_dir

    dataset_dir.mkdir(parents=True, exist_ok=True)
    # Two processes preparing the same folder (e.g. one per node on a shared filesystem) take turns;
    # the second one then finds the manifest and returns.
    with FileLock(str(dataset_dir / ".prepare.lock")):
        if is_complete(dataset_dir):
            log.info("already prepared: %s", dataset_dir)
            return dataset_dir
        log.info("preparing %s in %s", cfg["name"], dataset_dir)
        cache_dir = output_dir / ".cache" / "huggingface" / "datasets"
        clean = resolve_clean_config(cfg.get("clean"))
        # Read every split first: a missing or broken file, a bad line or a line-count mismatch fails now, not
        # after BPE training. Bad lines may be skipped (and counted) in train only: see ParallelCorpus.check.
        corpora = {split: ParallelCorpus(split, sources, cache_dir) for split, sources in split_sources(cfg).items()}
        for split, corpus in corpora.items():
            corpus.check(clean["on_bad_line"] if split == "train" else "error")

        model_path = dataset_dir / "spm.model"
        if model_path.is_file():  # renamed into place only when whole: an interrupted run got this far
            log.info("resuming: reusing the BPE model %s", model_path)
        else:
            model_path = _train_bpe(corpora["train"], dataset_dir, cfg, clean)
        tokenizer = Tokenizer(model_path)
        with ShardPool(resolve_workers(cfg.get("num_prepare_workers"))) as pool:
            splits = {
                split: _encode_split(corpus, split, tokenizer, dataset_dir, cfg, clean, pool)
                for split, corpus in corpora.items()
            }
        shutil.rmtree(dataset_dir / PENDING, ignore_errors=True)

        manifest = {
            "format_version": FORMAT_VERSION,
            "name": cfg["name"],
            "fingerprint": fingerprint,
            "source": {
                "fingerprint_method": "sha256 of each input file's bytes (Hub: name, config, split, revision)",
                "files": source,
            },
            "spm_model": {"file": model_path.name, "sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size},
            "special_ids": {
                "pad": tokenizer.pad_id,
                "unk": tokenizer.unk_id,
                "bos": tokenizer.bos_id,
                "eos": tokenizer.eos_id,
            },
            "token_dtype": tokenizer.id_dtype.name,
            "config": {**cfg, "clean": clean},
            "splits": splits,
        }
        write_json_atomic(dataset_dir / MANIFEST_NAME, manifest)  # last: the folder is now complete
    log.info("prepared %s", dataset_dir)
    return dataset_dir


def _train_bpe(train: ParallelCorpus, dataset_dir: Path, cfg: dict[str, Any], clean: dict[str, Any]) -> Path:
    """One BPE model over the source AND target side of the cleaned training split (shared vocabulary, section 5.1).

    It sees a uniform random sample of spm_sample_lines / 2 pairs (both sides: spm_sample_lines lines), drawn
    here from (SPM_SEED, corpus size) so only the sample is read and cleaned: time and memory stay bounded
    however large the corpus is.
    """
    cleaner = Cleaner(clean, filters=True)  # drops what the encoding pass will drop
    n_pairs = min(len(train), max(1, cfg["spm_sample_lines"] // 2))
    pairs = np.random.default_rng(SPM_SEED).choice(len(train), n_pairs, replace=False)
    pairs.sort()  # file order: a sequential read of the memory-mapped table

    def both_sides() -> Iterator[str]:
        with tqdm(total=n_pairs, desc="BPE: reading a sample of train", unit="pairs") as bar:
            for src, tgt, issues in train.batches_at(pairs, ENCODE_BATCH):
                kept_src, kept_tgt = cleaner(src, tgt, issues)
                yield from kept_src
                yield from kept_tgt
                bar.update(len(src))

    log.info(
        "training the joint BPE model: vocab_size=%d on a sample of at most %d lines",
        cfg["vocab_size"],
        cfg["spm_sample_lines"],
    )
    # Train under a temporary prefix, then rename: spm.model exists only once it is whole.
    tmp_prefix = dataset_dir / f".spm.tmp-{os.getpid()}"
    tmp_model = train_sentencepiece(both_sides(), tmp_prefix, cfg["vocab_size"], cfg["spm_sample_lines"], seed=SPM_SEED)
    os.replace(tmp_prefix.with_name(tmp_prefix.name + ".vocab"), dataset_dir / "spm.vocab")
    os.replace(tmp_model, dataset_dir / "spm.model")
    return dataset_dir / "spm.model"


def _encode_split(
    corpus: ParallelCorpus,
    split: str,
    tokenizer: Tokenizer,
    dataset_dir: Path,
    cfg: dict[str, Any],
    clean: dict[str, Any],
    pool: ShardPool,
) -> dict[str, Any]:
    """Clean and encode one split, shard by shard on the pool; shards an interrupted run finished are kept.

    Shard k holds what cleaning kept of input lines [k * shard_lines, (k + 1) * shard_lines). With
    de-duplication on (train only), workers write candidate shards under .pending/ and this process turns them
    into the final shards in shard order (data/dedup.py).
    """
    filters = split == "train"
    dedup = Deduplicator() if filters and clean["dedup"] else None
    pending = dataset_dir / PENDING
    template = {
        "arrow_files": tuple(str(Path(f).resolve()) for f in corpus.arrow_files()),  # workers may run elsewhere
        "rows": len(corpus),
        "split": split,
        "spm_model": str(tokenizer.model_path.resolve()),
        "spm_sha256": tokenizer.sha256,
        "clean": clean,
        "filters": filters,
        "max_len": cfg["max_len"],
        "candidate": dedup is not None,
        "out_dir": str((pending if dedup else dataset_dir).resolve()),
    }

    def current(record: dict | None, start: int, stop: int) -> bool:
        return record is not None and (record["lines"], record["spm_sha256"]) == ([start, stop], tokenizer.sha256)

    # Per shard, in order: ("final", record) if a previous run finished it, ("candidate", record) if its
    # candidate awaits de-duplication, else a job for the pool (which comes back as its record).
    items: list[tuple[str, dict] | ShardJob] = []
    for index, start in enumerate(range(0, len(corpus), cfg["shard_lines"])):
        stop = min(start + cfg["shard_lines"], len(corpus))
        record = finished_shard(dataset_dir, split, index)
        if current(record, start, stop) and (not dedup or "keys" in record["files"]):  # keys: data/dedup.py
            log.info("resuming: %s/%s is complete", split, record["name"])
            items.append(("final", record))
        elif dedup and current(record := finished_shard(pending, split, index), start, stop):
            items.append(("candidate", record))
        else:
            items.append(ShardJob(index=index, start=start, stop=stop, **template))

    n_jobs = sum(isinstance(item, ShardJob) for item in items)
    shards = []
    with tqdm(total=len(corpus), desc=f"encoding {split}", unit="pairs") as bar:
        for item in pool.run(items, n_jobs):
            kind, record = item if isinstance(item, tuple) else ("candidate" if dedup else "final", item)
            if dedup and kind == "final":
                dedup.replay(load_shard(dataset_dir, record)["keys"])
            elif dedup:
                src, tgt, keys, info = dedup.filter(load_shard(pending, record), record)
                final = write_shard(dataset_dir, split, record_index(record), src, tgt, extra={"keys": keys}, **info)
                remove_shard(pending, record)
                record = final
            shards.append(record)
            bar.update(record["lines"][1] - record["lines"][0])

    report = {group: dict(sum((Counter(r["clean"][group]) for r in shards), Counter())) for group in CLEAN_COUNTS}
    too_long, empty = sum(r["dropped_too_long"] for r in shards), sum(r["dropped_empty"] for r in shards)
    if too_long + empty + sum(report["removed"].values()):
        log.info(
            "%s: removed %s; dropped %d pairs longer than max_len=%d and %d with an empty side",
            split,
            report["removed"],
            too_long,
            cfg["max_len"],
            empty,
        )
    return {
        "sources": [s.key for s in corpus.sources],
        "lines": len(corpus),
        "crlf_lines": corpus.crlf_lines(),
        "clean": report,
        "pairs": sum(r["pairs"] for r in shards),
        "dropped_too_long": too_long,
        "dropped_empty": empty,
        "src_tokens": sum(r["src_tokens"] for r in shards),
        "tgt_tokens": sum(r["tgt_tokens"] for r in shards),
        "shards": shards,
    }


def record_index(record: dict[str, Any]) -> int:
    """shard-00012 -> 12."""
    return int(record["name"].rsplit("-", 1)[1])
