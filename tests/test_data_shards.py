"""data/shards.ShardWriter (a shard written batch by batch) against np.save, and data/encode.read_rows keeping the
memory-mapped rows it has read out of the resident set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from data import encode
from data.shards import ShardWriter, write_shard


def batch(rng: np.random.Generator, pairs: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(flat ids, lengths) of `pairs` random sentences."""
    lengths = rng.integers(0, 30, size=pairs)
    return rng.integers(0, 37000, size=int(lengths.sum())).astype(dtype), lengths


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
@pytest.mark.parametrize("n_batches", [0, 1, 7])
def test_a_shard_written_batch_by_batch_is_np_save_of_the_whole(tmp_path: Path, dtype, n_batches: int) -> None:
    rng = np.random.default_rng(n_batches)
    pairs = rng.integers(0, 50, size=n_batches)
    src, tgt = ([batch(rng, int(n), np.dtype(dtype)) for n in pairs] for _ in range(2))
    with ShardWriter(tmp_path / "stream", "train", 3, np.dtype(dtype)) as writer:
        for s, t in zip(src, tgt, strict=True):
            writer.add(s, t)
        record = writer.finish({"hash": np.arange(4, dtype=np.uint64)}, lines=[0, 9])

    def whole(parts):
        if not parts:
            return np.zeros(0, dtype), np.zeros(0, np.int64)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    src_all, tgt_all = whole(src), whole(tgt)
    offsets = np.zeros((len(src_all[1]) + 1, 2), dtype=np.int64)
    offsets[1:, 0], offsets[1:, 1] = np.cumsum(src_all[1]), np.cumsum(tgt_all[1])
    expected = {"src": src_all[0], "tgt": tgt_all[0], "idx": offsets, "hash": np.arange(4, dtype=np.uint64)}
    for kind, array in expected.items():
        reference = tmp_path / f"{kind}.npy"
        np.save(reference, array)
        assert (tmp_path / "stream" / record["files"][kind]["file"]).read_bytes() == reference.read_bytes(), kind
    assert record["pairs"] == len(src_all[1]) and record["src_tokens"] == len(src_all[0]) and record["lines"] == [0, 9]
    assert json.loads((tmp_path / "stream" / "train" / "shard-00003.json").read_text()) == record
    assert sorted(p.name for p in (tmp_path / "stream" / "train").iterdir()) == sorted(
        [f"shard-00003.{k}.npy" for k in expected] + ["shard-00003.json"]
    )


def test_an_interrupted_shard_leaves_no_file(tmp_path: Path) -> None:
    ids = (np.arange(5, dtype=np.uint16), np.array([2, 3]))
    with pytest.raises(KeyboardInterrupt), ShardWriter(tmp_path, "train", 0, np.dtype(np.uint16)) as writer:
        writer.add(ids, ids)
        raise KeyboardInterrupt
    assert list((tmp_path / "train").iterdir()) == []
    record = write_shard(tmp_path, "train", 0, ids, ids)  # the one-call form writes the same shard
    assert record["pairs"] == 2 and len(list((tmp_path / "train").iterdir())) == 4


def rss_file_kib() -> int:
    """This process's resident pages that belong to files (e.g. memory-mapped ones), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


@pytest.mark.parametrize("drop", [True, False])
def test_reading_rows_keeps_the_mapped_pages_out_of_memory(tmp_path: Path, monkeypatch, drop: bool) -> None:
    """32 MiB of rows read 2,000 at a time: the resident file pages grow by about one batch, not by the file.
    With the page dropping turned off (drop=False) the same read keeps the whole file resident: the test's
    measurement can tell the two apart."""
    rows = 64_000
    text = pa.array([f"{i:08d} " + "x" * 247 for i in range(rows)])  # 256 bytes per side
    table = pa.table({"src": text, "tgt": text, "issue": pa.nulls(rows, pa.string())})
    path = tmp_path / "rows.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=8192)
    if not drop:
        monkeypatch.setattr(encode.mmap, "MADV_DONTNEED", encode.mmap.MADV_NORMAL)  # advice that drops nothing
    before, peak, seen = rss_file_kib(), 0, 0
    for src, tgt, _ in encode.read_rows((str(path),), rows, 0, rows, batch=2000):
        assert src[0] == tgt[0] == f"{seen:08d} " + "x" * 247
        seen += len(src)
        peak = max(peak, rss_file_kib() - before)
    assert seen == rows
    if drop:
        assert peak < 4 * 1024, f"{peak} KiB of the 32 MiB file stayed resident"
    else:
        assert peak > 24 * 1024, f"only {peak} KiB resident without dropping pages"
