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

Hashing a large corpus is slow, so it is done by `aiayn prepare` (`dataset_dir_for`, `prepare_dataset`), and the
manifest records under "lookup" the config part of the identity and each input file's path, size, mtime, ctime and
inode. A reader (the data module on every rank: train, evaluate, translate, attention; `aiayn run`'s "prepared?")
finds the folder with `find_dataset_dir`, which compares those with what `stat` says now and hashes the files only
when they differ (a file written, touched, copied or moved since). Writing a file changes its mtime and ctime, so an
edited corpus is still noticed; `check_corpus` (`aiayn data check`) reads every byte again for the case stat cannot
see.

Shards are encoded in parallel, one per worker process (data/pool.py, data/encode.py; data.num_prepare_workers),
and collected in shard order, so the folder is byte for byte the same whatever the number of workers.

A run that is killed resumes where it stopped: spm.model and every shard appear only when whole (written under a
temporary name, then renamed; a shard's record last), so the next run with the same config reuses them, says
`resuming: ...`, and encodes only the shards still missing; the temporary files of the killed run are removed.
A folder already complete is checked before it is called prepared: every shard file against its sha256 and its
counts (`verify_prepared`).
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm
from filelock import FileLock  # a dependency of `datasets` and torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from data.atomic import disk_full, is_disk_full, remove_stale_temp_files, write_json_atomic
from data.clean import Cleaner, resolve_clean_config
from data.corpus import ParallelCorpus
from data.dedup import Deduplicator
from data.encode import ENCODE_BATCH, ShardJob
from data.errors import (
    DataConfigError,
    DataError,
    DatasetNotPreparedError,
    NoTrainingTextError,
    OutputNotWritableError,
)
from data.manifest import FORMAT_VERSION, MANIFEST_NAME, file_sha256, is_complete, read_manifest, verify_spm_model
from data.pool import ShardPool, resolve_workers
from data.shards import ShardedPairs, finished_shard, load_shard, remove_shard, write_shard
from data.sources import READER_VERSION, Source, arrow_cache_dir, describe, parse_split
from data.tokenizer import Tokenizer, train_sentencepiece

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("name", "splits", "vocab_size", "spm_sample_lines", "max_len", "max_tokens", "shard_lines")
POSITIVE_KEYS = ("vocab_size", "spm_sample_lines", "max_len", "max_tokens", "shard_lines")
# A temporary file in the Arrow cache is another machine's write in progress (a shared output folder) until it has
# not been written for this long; the dataset folder needs no such wait: its lock holder is its only writer.
STALE_CACHE_TEMP_S = 60.0
# The keys that change what ends up in the folder. max_tokens and num_workers only change batching,
# num_prepare_workers only how fast the folder is written (its content is the same for any number).
CONTENT_KEYS = ("src_lang", "tgt_lang", "vocab_size", "spm_sample_lines", "max_len", "shard_lines")
PENDING = ".pending"  # candidate shards awaiting de-duplication (data/dedup.py), under the dataset folder
CLEAN_COUNTS = ("changed", "removed")
SPM_SEED = 1
LOOKUP = "lookup"  # the manifest's entry that lets find_dataset_dir skip hashing the corpus
# How a pass over sentence pairs reports its progress: called as tqdm is, progress(total=, desc=, unit=), it gives a
# context manager whose value has update(n) (n pairs more done). tqdm itself is one.
ProgressFactory = Callable[..., AbstractContextManager[Any]]
# The sha256 of each corpus file this process hashed, by its stat: `aiayn prepare` asks for the folder's name, then
# prepares it, and reads each file once.
_SHA256_BY_STAT: dict[tuple, str] = {}


class CorpusChangedError(DataError, ValueError):
    """A corpus file's bytes are not those the prepared dataset of this config was made from."""


def resolve_data_config(data_cfg: DictConfig | dict) -> dict[str, Any]:
    """The data config as a plain dict with interpolations resolved, after checking the keys we need."""
    cfg = OmegaConf.to_container(data_cfg, resolve=True) if isinstance(data_cfg, DictConfig) else dict(data_cfg)
    missing = [k for k in REQUIRED_KEYS if cfg.get(k) is None]
    if missing:
        raise KeyError(f"data config lacks {', '.join('data.' + k for k in missing)} (see conf/data/*.yaml)")
    if "train" not in cfg["splits"]:
        raise KeyError(f"data.splits has no 'train' split (it has {sorted(cfg['splits'])}): BPE is trained on it")
    for key in POSITIVE_KEYS:
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DataConfigError(f"data.{key}={value!r}: out of range; set data.{key} to a positive integer")
    src, tgt = cfg.get("src_lang"), cfg.get("tgt_lang")
    if src is not None and tgt is not None and str(src).casefold() == str(tgt).casefold():
        raise DataConfigError(
            f"data.src_lang and data.tgt_lang are both {src!r}: a translation needs two languages; set them to the "
            "source and target language (e.g. data.src_lang=en data.tgt_lang=de)"
        )
    return cfg


def split_sources(cfg: dict[str, Any]) -> dict[str, list[Source]]:
    """{split: [Source, ...]} from data.splits (layouts in data/sources.py); files are checked to exist."""
    return {split: parse_split(split, spec, cfg) for split, spec in cfg["splits"].items()}


def _sources(cfg: dict[str, Any]) -> list[Source]:
    return [s for group in split_sources(cfg).values() for s in group]


def _file_stat(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {
        "path": str(path.resolve()),
        "bytes": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,  # set by the kernel on every write: unlike mtime, no tool puts it back
        "inode": st.st_ino,  # a file replaced by another (written beside it, then renamed)
    }


def corpus_sha256(path: Path, reuse: bool = True) -> str:
    """sha256 of a corpus file; with `reuse`, the one this process computed before if the file's stat is the same."""
    key = tuple(_file_stat(path).values())  # taken before reading: a file written meanwhile gets hashed again
    if not reuse or key not in _SHA256_BY_STAT:
        _SHA256_BY_STAT[key] = file_sha256(path)
    return _SHA256_BY_STAT[key]


def _identity(cfg: dict[str, Any], source: dict[str, dict], without: tuple[str, ...]) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "reader_version": READER_VERSION,
        "sentencepiece": spm.__version__,
        "config": {k: cfg.get(k) for k in CONTENT_KEYS},
        "clean": resolve_clean_config(cfg.get("clean")),
        "inputs": {key: {k: v for k, v in entry.items() if k not in without} for key, entry in source.items()},
    }


def _digest(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _fingerprint(cfg: dict[str, Any], sources: list[Source], reuse: bool = True) -> tuple[str, dict[str, Any]]:
    sha = {path: corpus_sha256(path, reuse) for s in sources for path in s.files.values()}
    source = {key: entry for s in sources for key, entry in describe(s, sha).items()}
    # what identifies each input: its bytes' sha256 and read options, never its path
    return _digest(_identity(cfg, source, without=("path", "bytes"))), source


def dataset_fingerprint(data_cfg: DictConfig | dict) -> tuple[str, dict[str, Any]]:
    """sha256 over the input files' CONTENT (not path or mtime: a copied corpus keeps its folder) + content keys.

    A Hub source counts by its name, config, split and revision (pin `revision` for a fixed fingerprint).
    Returns (fingerprint hex, the input description stored in the manifest as "source").
    """
    cfg = resolve_data_config(data_cfg)
    return _fingerprint(cfg, _sources(cfg))


def _lookup(cfg: dict[str, Any], sources: list[Source]) -> dict[str, Any]:
    """The manifest's "lookup": the fingerprint's config part (all of it but the inputs' bytes) and each input
    file's stat, which together stand for the fingerprint while no file is written, replaced or moved."""
    unhashed = {path: None for s in sources for path in s.files.values()}
    source = {key: entry for s in sources for key, entry in describe(s, unhashed).items()}
    return {
        "config_key": _digest(_identity(cfg, source, without=("path", "bytes", "sha256"))),
        "corpus_stat": {f"{s.label}.{role}": _file_stat(path) for s in sources for role, path in s.files.items()},
    }


def _folder(cfg: dict[str, Any], output_dir: str | os.PathLike, fingerprint: str) -> Path:
    return Path(output_dir) / "data" / f"{cfg['name']}-{fingerprint[:10]}"


def _prepared_folders(cfg: dict[str, Any], output_dir: str | os.PathLike) -> list[tuple[Path, dict[str, Any]]]:
    """(folder, its manifest) of every prepared folder of this data config's name under <output_dir>/data."""
    found = []
    for path in sorted((Path(output_dir) / "data").glob(f"{glob.escape(cfg['name'])}-*/{MANIFEST_NAME}")):
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if path.parent == _folder(cfg, output_dir, str(manifest.get("fingerprint"))):
            found.append((path.parent, manifest))
    return found


def _locate(cfg: dict[str, Any], output_dir: str | os.PathLike, reuse: bool = True) -> tuple[Path, str, dict, dict]:
    """(folder, fingerprint, source, lookup) by hashing the corpus; a complete folder whose manifest records
    another lookup (the files were copied, touched or moved, but their bytes are the same) gets this one, so that
    readers find it without hashing again. That is best effort: a read-only folder keeps its manifest."""
    sources = _sources(cfg)
    lookup = _lookup(cfg, sources)  # before hashing: a file written meanwhile no longer matches it
    fingerprint, source = _fingerprint(cfg, sources, reuse)
    dataset_dir = _folder(cfg, output_dir, fingerprint)
    if is_complete(dataset_dir) and read_manifest(dataset_dir).get(LOOKUP) != lookup:
        try:
            with FileLock(str(dataset_dir / ".prepare.lock"), timeout=60):  # one writer, the DDP ranks of any node
                manifest = read_manifest(dataset_dir)
                if manifest.get(LOOKUP) != lookup:
                    write_json_atomic(dataset_dir / MANIFEST_NAME, {**manifest, LOOKUP: lookup})
        except OSError as err:  # a read-only folder, or the lock held too long (filelock.Timeout)
            log.warning("could not record the corpus files' stat in %s (%s)", dataset_dir / MANIFEST_NAME, err)
    return dataset_dir, fingerprint, source, lookup


def dataset_dir_for(data_cfg: DictConfig | dict, output_dir: str | os.PathLike) -> Path:
    """The folder that prepare_dataset fills for this config; the same on every rank and every run.

    It hashes the corpus files (once per process while they are unchanged): readers use find_dataset_dir.
    """
    return _locate(resolve_data_config(data_cfg), output_dir)[0]


def find_dataset_dir(data_cfg: DictConfig | dict, output_dir: str | os.PathLike) -> Path:
    """dataset_dir_for without reading the corpus when it was prepared: the complete folder whose manifest records
    this config and the corpus files as `stat` sees them now. Only when no folder does, or more than one (a file
    changed in a way stat missed, then prepared again), are the files hashed, as dataset_dir_for does."""
    cfg = resolve_data_config(data_cfg)
    lookup = _lookup(cfg, _sources(cfg))
    found = [folder for folder, manifest in _prepared_folders(cfg, output_dir) if manifest.get(LOOKUP) == lookup]
    if len(found) == 1 and is_complete(found[0]):
        return found[0]
    log.info("the corpus files of %s are not those of a prepared folder by stat: hashing them", cfg["name"])
    return _locate(cfg, output_dir)[0]


def check_corpus(data_cfg: DictConfig | dict, output_dir: str | os.PathLike) -> Path:
    """`aiayn data check`: hash every corpus file again (no stat, no earlier hash) and return the prepared folder
    made from exactly these bytes. Raises CorpusChangedError naming the files whose bytes differ from those of the
    folder prepared before for this config, or DatasetNotPreparedError if there is none."""
    cfg = resolve_data_config(data_cfg)
    dataset_dir, _, source, lookup = _locate(cfg, output_dir, reuse=False)
    if is_complete(dataset_dir):
        return dataset_dir
    same_config = [
        (folder, manifest)
        for folder, manifest in _prepared_folders(cfg, output_dir)
        if (manifest.get(LOOKUP) or {}).get("config_key") == lookup["config_key"] and is_complete(folder)
    ]
    if not same_config:
        raise DatasetNotPreparedError(
            f"{cfg['name']} is not prepared from these corpus files ({dataset_dir}); run `aiayn prepare` with the "
            "same overrides"
        )
    # the one readers would use (its recorded stat is today's), else the newest
    same_config.sort(key=lambda fm: (fm[1][LOOKUP] == lookup, (fm[0] / MANIFEST_NAME).stat().st_mtime_ns))
    folder, manifest = same_config[-1]
    before = manifest["source"]["files"]
    changed = [
        f"{entry['path']} (sha256 {before[key]['sha256'][:12]}... then, {entry['sha256'][:12]}... now)"
        for key, entry in source.items()
        if "sha256" in entry and before.get(key, {}).get("sha256") != entry["sha256"]
    ]
    raise CorpusChangedError(
        f"the corpus changed since {folder} was prepared: {'; '.join(changed) or 'its inputs differ'}; run "
        "`aiayn prepare` with the same overrides to prepare it again (into a new folder)"
    )


def verify_prepared(dataset_dir: Path) -> dict[str, Any]:
    """A complete folder checked before it is used as prepared: the manifest's counts (against themselves and each
    shard's files' lengths), the BPE model's and every shard file's sha256. Returns the manifest; raises a DataError
    naming the file that differs and the fix (delete the folder, prepare again)."""
    manifest = read_manifest(dataset_dir)
    verify_spm_model(dataset_dir, manifest)
    for split in manifest["splits"]:
        ShardedPairs(dataset_dir, split, verify=True)  # sha256 of each shard file, then its counts
    return manifest


@contextmanager
def _write_errors_named(folder: Path) -> Iterator[None]:
    """A full disk or a folder that cannot be written, met anywhere in preparing `folder`: one line naming it."""
    try:
        yield
    except OSError as err:
        if isinstance(err, DataError):
            raise
        if is_disk_full(err):
            raise disk_full(folder, err) from err
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise OutputNotWritableError(
                f"cannot write {err.filename or folder} ({err.strerror}): set the output folder (paths.output_dir or "
                "AIAYN_OUTPUT_DIR) to one this user can write, or make it writable"
            ) from err
        raise


def _left_by_a_killed_run(dataset_dir: Path) -> str | None:
    """What an interrupted preparation of this folder left that the next run reuses, in words; None if nothing."""
    shards = len(list(dataset_dir.glob("*/shard-*.json"))) + len(list(dataset_dir.glob(f"{PENDING}/*/shard-*.json")))
    parts = ["the BPE model"] * (dataset_dir / "spm.model").is_file() + [f"{shards} finished shard(s)"] * bool(shards)
    return " and ".join(parts) or None


def prepare_dataset(
    data_cfg: DictConfig | dict,
    output_dir: str | os.PathLike,
    progress: ProgressFactory = tqdm,
    say: Callable[[str], None] | None = None,
) -> Path:
    """Train the joint BPE model and encode every split into shards, unless already done. Returns the folder.

    progress: how each pass over the pairs (the BPE sample, each split's encoding) shows how far it is
    (ProgressFactory; tqdm's bar by default, `aiayn prepare` gives pipeline/progress.py's, which writes plain lines
    off a terminal). say: where the lines for the user go, `resuming: ...` (an interrupted run is continued);
    the log by default, `aiayn prepare` prints them."""
    say = say or log.info
    cfg = resolve_data_config(data_cfg)
    output_dir = Path(output_dir)
    dataset_dir, fingerprint, source, lookup = _locate(cfg, output_dir)
    if is_complete(dataset_dir):
        verify_prepared(dataset_dir)
        log.info("already prepared: %s", dataset_dir)
        return dataset_dir

    with _write_errors_named(dataset_dir):
        dataset_dir.mkdir(parents=True, exist_ok=True)
        # Two processes preparing the same folder (e.g. one per node on a shared filesystem) take turns;
        # the second one then finds the manifest and returns.
        with FileLock(str(dataset_dir / ".prepare.lock")):
            if is_complete(dataset_dir):
                verify_prepared(dataset_dir)
                log.info("already prepared: %s", dataset_dir)
                return dataset_dir
            _prepare(cfg, output_dir, dataset_dir, fingerprint, source, lookup, progress, say)
    log.info("prepared %s", dataset_dir)
    return dataset_dir


def _prepare(
    cfg: dict[str, Any],
    output_dir: Path,
    dataset_dir: Path,
    fingerprint: str,
    source: dict[str, dict],
    lookup: dict[str, Any],
    progress: ProgressFactory,
    say: Callable[[str], None],
) -> None:
    """prepare_dataset's work, holding the folder's lock."""
    cache_dir = output_dir / ".cache" / "huggingface" / "datasets"
    # What a killed run (its workers too) was writing: temporary files no running process owns.
    for stale in [
        *remove_stale_temp_files(dataset_dir),
        *remove_stale_temp_files(arrow_cache_dir(cache_dir), STALE_CACHE_TEMP_S),
    ]:
        log.info("removed %s, left by a killed run", stale)
    if left := _left_by_a_killed_run(dataset_dir):
        say(f"resuming: {dataset_dir}: an interrupted run left {left}, reused where their sha256 still match")
    log.info("preparing %s in %s", cfg["name"], dataset_dir)
    clean = resolve_clean_config(cfg.get("clean"))
    # Read every split first: a missing or broken file, a bad line or a line-count mismatch fails now, not
    # after BPE training. Bad lines may be skipped (and counted) in train only: see ParallelCorpus.check.
    # Each source's Arrow file is found by its files' sha256, computed above for the fingerprint: a corpus edited
    # in place is read again, even where it kept its size and mtime.
    sha256 = {key: entry["sha256"] for key, entry in source.items() if entry.get("sha256")}
    corpora = {
        split: ParallelCorpus(split, sources, cache_dir, sha256) for split, sources in split_sources(cfg).items()
    }
    for split, corpus in corpora.items():
        corpus.check(clean["on_bad_line"] if split == "train" else "error")

    model_path = dataset_dir / "spm.model"
    if model_path.is_file():  # renamed into place only when whole: an interrupted run got this far
        log.info("resuming: reusing the BPE model %s", model_path)
    else:
        model_path = train_bpe(corpora["train"], dataset_dir, cfg, clean, progress)
    tokenizer = Tokenizer(model_path)
    with ShardPool(resolve_workers(cfg.get("num_prepare_workers"))) as pool:
        splits = {
            split: encode_split(corpus, split, tokenizer, dataset_dir, cfg, clean, pool, progress, say)
            for split, corpus in corpora.items()
        }
    shutil.rmtree(dataset_dir / PENDING, ignore_errors=True)
    if not splits["train"]["pairs"]:
        train = splits["train"]
        raise NoTrainingTextError(
            f"data.splits.train ({_files(corpora['train'])}): no training pair is left of its {train['lines']} "
            f"lines: {train['dropped_too_long']} longer than data.max_len={cfg['max_len']} tokens, "
            f"{train['dropped_empty']} with an empty side, removed by cleaning {train['clean']['removed'] or 'none'}; "
            "raise data.max_len or point data.splits.train at the training text"
        )

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
        LOOKUP: lookup,
    }
    write_json_atomic(dataset_dir / MANIFEST_NAME, manifest)  # last: the folder is now complete


def _files(corpus: ParallelCorpus) -> str:
    """A split's input files, for a message."""
    return ", ".join(str(path) for source in corpus.sources for path in source.files.values()) or corpus.split


def train_bpe(
    train: ParallelCorpus,
    dataset_dir: Path,
    cfg: dict[str, Any],
    clean: dict[str, Any],
    progress: ProgressFactory = tqdm,
) -> Path:
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
        with progress(total=n_pairs, desc="BPE: reading a sample of train", unit="pairs") as bar:
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
    # Trained in memory, then written whole (spm.vocab first): spm.model exists only once it is complete, and holds
    # no path, so the same text gives the same bytes.
    try:
        return train_sentencepiece(
            both_sides(), dataset_dir / "spm", cfg["vocab_size"], cfg["spm_sample_lines"], seed=SPM_SEED
        )
    except NoTrainingTextError:
        removed = cleaner.report()["removed"]
        raise NoTrainingTextError(
            f"data.splits.train ({_files(train)}): no text to train the BPE model on: the {n_pairs} pairs read of "
            f"its {len(train)} lines are all empty{f' or removed by cleaning {removed}' if removed else ''}; point "
            "data.splits.train at the training text"
        ) from None


def encode_split(
    corpus: ParallelCorpus,
    split: str,
    tokenizer: Tokenizer,
    dataset_dir: Path,
    cfg: dict[str, Any],
    clean: dict[str, Any],
    pool: ShardPool,
    progress: ProgressFactory = tqdm,
    say: Callable[[str], None] = log.info,
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
            log.debug("resuming: %s/%s is complete", split, record["name"])
            items.append(("final", record))
        elif dedup and current(record := finished_shard(pending, split, index), start, stop):
            items.append(("candidate", record))
        else:
            items.append(ShardJob(index=index, start=start, stop=stop, **template))

    n_jobs = sum(isinstance(item, ShardJob) for item in items)
    if kept := len(items) - n_jobs:
        say(f"resuming: {split}: {kept} of {len(items)} shards are done (checked), encoding the other {n_jobs}")
    shards = []
    with progress(total=len(corpus), desc=f"encoding {split}", unit="pairs") as bar:
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
