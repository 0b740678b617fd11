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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sentencepiece as spm
from filelock import FileLock  # a dependency of `datasets` and torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from data.clean import Cleaner, resolve_clean_config
from data.corpus import ParallelCorpus, file_sha256
from data.manifest import FORMAT_VERSION, MANIFEST_NAME, is_complete, write_json_atomic
from data.shards import ShardWriter, token_dtype
from data.sources import READER_VERSION, Source, describe, parse_split
from data.tokenizer import Tokenizer, train_sentencepiece

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("name", "splits", "vocab_size", "spm_sample_lines", "max_len", "max_tokens", "shard_pairs")
# The keys that change what ends up in the folder. max_tokens and num_workers only change batching.
CONTENT_KEYS = ("src_lang", "tgt_lang", "vocab_size", "spm_sample_lines", "max_len", "shard_pairs")
# Sentences per sentencepiece.encode call (~0.1 s of work on 2 threads). Each call encodes its batch on all cores
# (num_threads=os.cpu_count(), C++ threads outside the GIL): that is the parallel encoding, with one batch of text
# and ids in memory at a time, so memory stays flat however large the corpus is.
ENCODE_BATCH = 10_000
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

        model_path = _train_bpe(corpora["train"], dataset_dir, cfg, clean)
        tokenizer = Tokenizer(model_path)
        splits = {
            split: _encode_split(corpus, split, tokenizer, dataset_dir, cfg, Cleaner(clean, filters=split == "train"))
            for split, corpus in corpora.items()
        }

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
            "token_dtype": token_dtype(tokenizer.vocab_size).name,
            "config": {**cfg, "clean": clean},
            "splits": splits,
        }
        write_json_atomic(dataset_dir / MANIFEST_NAME, manifest)  # last: the folder is now complete
    log.info("prepared %s", dataset_dir)
    return dataset_dir


def _train_bpe(train: ParallelCorpus, dataset_dir: Path, cfg: dict[str, Any], clean: dict[str, Any]) -> Path:
    """One BPE model over the source AND target side of the cleaned training split (shared vocabulary, section 5.1)."""
    cleaner = Cleaner(clean, filters=True)  # the same pairs the encoding pass will keep

    def both_sides() -> Iterator[str]:
        with tqdm(total=len(train), desc="BPE: reading train text", unit="pairs") as bar:
            for src, tgt, issues in train.batches(ENCODE_BATCH):
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
    corpus: ParallelCorpus, split: str, tokenizer: Tokenizer, dataset_dir: Path, cfg: dict[str, Any], cleaner: Cleaner
) -> dict[str, Any]:
    """Clean and encode one split into shards. Training pairs with a side longer than max_len tokens, or an empty
    side, are dropped (they would blow up a batch's padding or teach nothing); valid/test keep every line so that
    pair i is still line i of the reference file."""
    writer = ShardWriter(dataset_dir, split, token_dtype(tokenizer.vocab_size), cfg["shard_pairs"])
    max_len, drop_long = cfg["max_len"], cleaner.filters
    too_long = empty = 0
    with tqdm(total=len(corpus), desc=f"encoding {split}", unit="pairs") as bar:
        for raw_src, raw_tgt, issues in corpus.batches(ENCODE_BATCH):
            src_text, tgt_text = cleaner(raw_src, raw_tgt, issues)
            src_ids, tgt_ids = tokenizer.encode(src_text), tokenizer.encode(tgt_text)
            if drop_long:
                keep = []
                for i, (s, t) in enumerate(zip(src_ids, tgt_ids, strict=True)):
                    if not s or not t:
                        empty += 1
                    elif len(s) > max_len or len(t) > max_len:
                        too_long += 1
                    else:
                        keep.append(i)
                src_ids, tgt_ids = [src_ids[i] for i in keep], [tgt_ids[i] for i in keep]
            writer.add(src_ids, tgt_ids)
            bar.update(len(raw_src))
    shards = writer.close()
    report = cleaner.report()
    if drop_long and too_long + empty + sum(report["removed"].values()):
        log.info(
            "%s: removed %s; dropped %d pairs longer than max_len=%d and %d with an empty side",
            split,
            report["removed"],
            too_long,
            max_len,
            empty,
        )
    return {
        "sources": [s.key for s in corpus.sources],
        "lines": len(corpus),
        "crlf_lines": corpus.crlf_lines(),
        "clean": report,
        "pairs": sum(s["pairs"] for s in shards),
        "dropped_too_long": too_long,
        "dropped_empty": empty,
        "src_tokens": sum(s["src_tokens"] for s in shards),
        "tgt_tokens": sum(s["tgt_tokens"] for s in shards),
        "shards": shards,
    }
