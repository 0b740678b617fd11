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
import mmap
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from data.clean import Cleaner, pair_hash
from data.shards import ShardWriter
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
    candidate: bool  # dedup on: write hashes and fates beside the pairs for data/dedup.py


@contextlib.contextmanager
def mapped_table(files: Sequence[str]) -> Iterator[tuple[pa.Table, Callable[[], None]]]:
    """The split's rows, memory-mapped (zero copy) for the length of the `with` block, and a function that drops
    the pages read so far from this process's resident set (they stay in the page cache, shared).

    Dropping matters for memory: every page of the files a process reads stays in its resident set while they are
    mapped, so a worker would grow with the rows it reads (a 250k-line shard: ~45 MB). The caller must keep no
    Arrow object of the table past the block (to_pylist copies are fine); the files are unmapped when the last one
    is gone.
    """
    maps = []
    for file in files:
        with open(file, "rb") as f:
            maps.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))

    def drop_pages() -> None:
        for m in maps:
            m.madvise(mmap.MADV_DONTNEED)

    try:
        yield pa.concat_tables([pa.ipc.open_stream(pa.py_buffer(m)).read_all() for m in maps]), drop_pages
    finally:
        for m in maps:
            with contextlib.suppress(BufferError):  # an Arrow buffer still refers to it: unmapped when freed
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
    with mapped_table(files) as (table, drop_pages):
        if table.num_rows != rows:
            raise RuntimeError(f"the Arrow files {files} hold {table.num_rows} rows, not the split's {rows}")
        for i in range(start, stop, batch):
            part = table.slice(i, min(batch, stop - i))
            columns = part.column("src").to_pylist(), part.column("tgt").to_pylist(), part.column("issue").to_pylist()
            del part
            drop_pages()
            yield columns
        del table


def _fates(src_lengths: np.ndarray, tgt_lengths: np.ndarray, max_len: int, filters: bool) -> np.ndarray:
    """(N,) int8: EMPTY if a side encodes to nothing, TOO_LONG if a side is over max_len tokens, else WRITTEN."""
    fates = np.zeros(len(src_lengths), dtype=np.int8)
    if filters:
        fates[(src_lengths > max_len) | (tgt_lengths > max_len)] = TOO_LONG
        fates[(src_lengths == 0) | (tgt_lengths == 0)] = EMPTY
    return fates


def _keep(ids: np.ndarray, lengths: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(flat ids, lengths) of the sentences where `keep` is True."""
    return ids[np.repeat(keep, lengths)], lengths[keep]


def encode_shard(job: ShardJob) -> dict[str, Any]:
    """Input lines [job.start, job.stop) -> one shard (or candidate) on disk, written atomically; returns its record.

    Training pairs with an empty side or a side over max_len tokens are dropped (they would blow up a batch's
    padding or teach nothing); valid/test keep every line so that pair i is still line i of the reference file.
    """
    cleaner = Cleaner({**job.clean, "dedup": False}, filters=job.filters)  # dedup: data/dedup.py, in shard order
    tokenizer = _tokenizer(job.spm_model)
    hashes, fates = [], []
    with ShardWriter(Path(job.out_dir), job.split, job.index, tokenizer.id_dtype) as writer:
        for raw_src, raw_tgt, issues in read_rows(job.arrow_files, job.rows, job.start, job.stop):
            src_text, tgt_text = cleaner(raw_src, raw_tgt, issues)
            src_ids, src_lengths = tokenizer.encode_flat(src_text)
            tgt_ids, tgt_lengths = tokenizer.encode_flat(tgt_text)
            fate = _fates(src_lengths, tgt_lengths, job.max_len, job.filters)
            written = fate == WRITTEN
            writer.add(_keep(src_ids, src_lengths, written), _keep(tgt_ids, tgt_lengths, written))
            fates.append(fate)
            if job.candidate:
                keys = map(pair_hash, src_text, tgt_text)
                hashes.append(np.fromiter(keys, dtype=np.uint64, count=len(src_text)))
        fate = np.concatenate(fates) if fates else np.zeros(0, dtype=np.int8)
        extra = None
        if job.candidate:
            extra = {"hash": np.concatenate(hashes) if hashes else np.zeros(0, dtype=np.uint64), "fate": fate}
        return writer.finish(
            extra,
            lines=[job.start, job.stop],
            spm_sha256=job.spm_sha256,
            clean=cleaner.take_report(),
            dropped_too_long=int((fate == TOO_LONG).sum()),
            dropped_empty=int((fate == EMPTY).sum()),
        )
