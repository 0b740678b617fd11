"""One shard of `aiayn prepare`: read input lines [start, stop), clean, BPE-encode and write them. The unit of work
of the process pool (data/pool.py); with one worker it runs in the preparing process itself.

A worker needs nothing from the process that sent the job but the job: the split's rows are read straight from
the memory-mapped Arrow files data/sources.py wrote (pyarrow, no `datasets`), the BPE model from its file. Imports
stay light (pyarrow, numpy, sentencepiece; never torch or `datasets`) because the pool's forkserver imports this
module once and forks every worker from it.

With de-duplication on (data.clean.dedup) a shard cannot know on its own which of its pairs an EARLIER shard
already kept, so the worker writes a *candidate* shard instead (in <dataset>/.pending/, see data/prepare.py) with,
for every pair that passed the other filters, its hash and fate (written, too long, empty side). The preparing
process then de-duplicates the candidates in shard order (data/dedup.py), exactly as a sequential pass would.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from data.clean import Cleaner, pair_hash
from data.shards import flatten, write_shard
from data.tokenizer import Tokenizer

# Sentences per sentencepiece.encode call: one batch of text and ids in memory at a time per worker.
ENCODE_BATCH = 10_000
# What became of a pair that passed the cleaning filters (train only; valid/test keep every pair).
WRITTEN, TOO_LONG, EMPTY = 0, 1, 2


@dataclass(frozen=True)
class ShardJob:
    """Everything a worker needs to produce shard `index` of `split`: small, so it pickles in microseconds."""

    arrow_files: tuple[str, ...]  # the split's rows (data.sources.FEATURES), these files concatenated in order
    rows: int  # how many rows they hold together (checked)
    out_dir: str  # the dataset folder (a final shard) or its .pending/ folder (a candidate, dedup on)
    split: str
    index: int
    start: int  # input lines [start, stop)
    stop: int
    spm_model: str
    spm_sha256: str
    clean: dict[str, Any]  # data.clean, resolved
    filters: bool  # pair filters and max_len: train only
    max_len: int
    dtype: str  # token dtype name (data.shards.token_dtype)
    candidate: bool  # dedup on: write hashes and fates beside the pairs for data/dedup.py
    num_threads: int  # sentencepiece threads: 1 in a pool worker, all cores without a pool


@contextlib.contextmanager
def mapped_table(files: Sequence[str]) -> Iterator[pa.Table]:
    """The split's rows, memory-mapped (zero copy) for the length of the `with` block, then unmapped.

    Unmapping matters for memory: every page of the files a process reads stays in its resident set while the
    files are mapped, so a worker that kept them mapped across shards would grow with the corpus. The caller must
    keep no Arrow object of the table past the block (to_pylist copies are fine).
    """
    maps = [pa.memory_map(f) for f in files]
    try:
        yield pa.concat_tables([pa.ipc.open_stream(m).read_all() for m in maps])
    finally:
        for m in maps:
            m.close()


def read_record_batches(files: Sequence[str]) -> Iterator[pa.RecordBatch]:
    """The split's rows as record batches read from the files in order (not memory-mapped: see mapped_table)."""
    for file in files:
        with pa.OSFile(file) as source:
            yield from pa.ipc.open_stream(source)


@functools.lru_cache(maxsize=2)
def _tokenizer(model: str) -> Tokenizer:
    return Tokenizer(model)


def read_rows(
    files: tuple[str, ...], rows: int, start: int, stop: int, batch: int = ENCODE_BATCH
) -> Iterator[tuple[list[str], list[str], list[str | None]]]:
    """(sources, targets, issues) of rows [start, stop), `batch` rows at a time, in file order."""
    with mapped_table(files) as table:
        if table.num_rows != rows:
            raise RuntimeError(f"the Arrow files {files} hold {table.num_rows} rows, not the split's {rows}")
        for i in range(start, stop, batch):
            part = table.slice(i, min(batch, stop - i))
            yield part.column("src").to_pylist(), part.column("tgt").to_pylist(), part.column("issue").to_pylist()
            del part
        del table


def _fates(src_ids: list[list[int]], tgt_ids: list[list[int]], max_len: int, filters: bool) -> np.ndarray:
    """(N,) int8: EMPTY if a side encodes to nothing, TOO_LONG if a side is over max_len tokens, else WRITTEN."""
    fates = np.zeros(len(src_ids), dtype=np.int8)
    if filters:
        for i, (s, t) in enumerate(zip(src_ids, tgt_ids, strict=True)):
            if not s or not t:
                fates[i] = EMPTY
            elif len(s) > max_len or len(t) > max_len:
                fates[i] = TOO_LONG
    return fates


def _concat(parts: list[tuple[np.ndarray, np.ndarray]], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    if not parts:
        return np.zeros(0, dtype=dtype), np.zeros(0, dtype=np.int64)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def encode_shard(job: ShardJob) -> dict[str, Any]:
    """Input lines [job.start, job.stop) -> one shard (or candidate) on disk, written atomically; returns its record.

    Training pairs with an empty side or a side over max_len tokens are dropped (they would blow up a batch's
    padding or teach nothing); valid/test keep every line so that pair i is still line i of the reference file.
    """
    cleaner = Cleaner({**job.clean, "dedup": False}, filters=job.filters)  # dedup: data/dedup.py, in shard order
    tokenizer, dtype = _tokenizer(job.spm_model), np.dtype(job.dtype)
    src_parts, tgt_parts, hashes, fates = [], [], [], []
    for raw_src, raw_tgt, issues in read_rows(job.arrow_files, job.rows, job.start, job.stop):
        src_text, tgt_text = cleaner(raw_src, raw_tgt, issues)
        src_ids = tokenizer.encode(src_text, num_threads=job.num_threads)
        tgt_ids = tokenizer.encode(tgt_text, num_threads=job.num_threads)
        fate = _fates(src_ids, tgt_ids, job.max_len, job.filters)
        written = np.flatnonzero(fate == WRITTEN).tolist()
        src_parts.append(flatten([src_ids[i] for i in written], dtype))
        tgt_parts.append(flatten([tgt_ids[i] for i in written], dtype))
        fates.append(fate)
        if job.candidate:
            keys = map(pair_hash, src_text, tgt_text)
            hashes.append(np.fromiter(keys, dtype=np.uint64, count=len(src_text)))
    fate = np.concatenate(fates) if fates else np.zeros(0, dtype=np.int8)
    extra = None
    if job.candidate:
        extra = {"hash": np.concatenate(hashes) if hashes else np.zeros(0, dtype=np.uint64), "fate": fate}
    return write_shard(
        Path(job.out_dir),
        job.split,
        job.index,
        _concat(src_parts, dtype),
        _concat(tgt_parts, dtype),
        extra=extra,
        lines=[job.start, job.stop],
        spm_sha256=job.spm_sha256,
        clean=cleaner.take_report(),
        dropped_too_long=int((fate == TOO_LONG).sum()),
        dropped_empty=int((fate == EMPTY).sum()),
    )
