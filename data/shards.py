"""Encoded sentence pairs on disk, in shards that are memory-mapped instead of loaded.

The 4.5M WMT pairs of section 5.1 are ~150M BPE tokens. Kept as Python lists they would take tens of GB;
as flat uint16 arrays they take ~300 MB on disk and, memory-mapped, almost no RAM: the OS pages in only
what a batch touches, and every DataLoader worker and DDP rank shares the same page cache.

One shard of N pairs is three .npy files:
    shard-00000.src.npy   (total source tokens,)   uint16 (int32 if the vocabulary has more than 65536 ids)
    shard-00000.tgt.npy   (total target tokens,)   same dtype
    shard-00000.idx.npy   (N + 1, 2) int64         offsets: pair i is src[idx[i,0]:idx[i+1,0]], tgt[idx[i,1]:idx[i+1,1]]
"""

from __future__ import annotations

import hashlib
import itertools
import os
from pathlib import Path

import numpy as np

from data.errors import DataError
from data.manifest import read_manifest


class ShardChecksumError(DataError, RuntimeError):
    """A shard file's bytes differ from the sha256 recorded in the manifest (corrupted or edited)."""


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest dtype holding every id: ids run 0..vocab_size-1, uint16 holds 0..65535."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _save_atomic(path: Path, array: np.ndarray) -> str:
    """np.save to a temporary name, then rename: a crash never leaves a half-written shard. Returns sha256."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)
    return _sha256(path)


def _flatten(seqs: list[list[int]], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """[[5, 6], [7]] -> (flat ids [5, 6, 7], lengths [2, 1]) without a Python loop per token."""
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=dtype, count=int(lengths.sum()))
    return flat, lengths


class ShardWriter:
    """Collects encoded pairs of one split and writes them as shards of `shard_pairs` pairs each."""

    def __init__(self, dataset_dir: Path, split: str, dtype: np.dtype, shard_pairs: int):
        self.dataset_dir, self.split, self.dtype, self.shard_pairs = Path(dataset_dir), split, dtype, shard_pairs
        (self.dataset_dir / split).mkdir(parents=True, exist_ok=True)
        self.shards: list[dict] = []  # manifest records of the shards written so far
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending_pairs = 0

    def add(self, src_ids: list[list[int]], tgt_ids: list[list[int]]) -> None:
        start = 0
        while start < len(src_ids):
            # fill the current shard up to shard_pairs, flush it, continue with the rest of the batch
            end = min(len(src_ids), start + self.shard_pairs - self._pending_pairs)
            src, src_len = _flatten(src_ids[start:end], self.dtype)
            tgt, tgt_len = _flatten(tgt_ids[start:end], self.dtype)
            self._pending.append((src, src_len, tgt, tgt_len))
            self._pending_pairs += end - start
            start = end
            if self._pending_pairs == self.shard_pairs:
                self._flush()

    def close(self) -> list[dict]:
        """Write the last, partial shard; returns the manifest records of all shards."""
        if self._pending_pairs:
            self._flush()
        return self.shards

    def _flush(self) -> None:
        src, src_len, tgt, tgt_len = (np.concatenate(parts) for parts in zip(*self._pending, strict=True))
        n = len(src_len)
        offsets = np.zeros((n + 1, 2), dtype=np.int64)  # (N+1, 2)
        offsets[1:, 0] = np.cumsum(src_len)
        offsets[1:, 1] = np.cumsum(tgt_len)
        name = f"shard-{len(self.shards):05d}"
        files = {}
        for kind, array in (("src", src), ("tgt", tgt), ("idx", offsets)):
            rel = f"{self.split}/{name}.{kind}.npy"
            files[kind] = {"file": rel, "sha256": _save_atomic(self.dataset_dir / rel, array)}
        self.shards.append(
            {"name": name, "pairs": n, "src_tokens": int(len(src)), "tgt_tokens": int(len(tgt)), "files": files}
        )
        self._pending, self._pending_pairs = [], 0


class ShardedPairs:
    """A map-style dataset over one prepared split: pairs[i] -> (source ids, target ids), memory-mapped.

    Token counts exclude the eos/bos that collation adds; the batch sampler reads `src_lengths`/`tgt_lengths`
    to group pairs of similar length (section 5.1) without touching the token arrays.
    """

    def __init__(self, dataset_dir: str | os.PathLike, split: str, verify: bool = True):
        self.dataset_dir, self.split = Path(dataset_dir), split
        manifest = read_manifest(self.dataset_dir)
        if split not in manifest["splits"]:
            raise KeyError(
                f"split {split!r} is not in {self.dataset_dir / 'manifest.json'} "
                f"(it has {sorted(manifest['splits'])}); add it under data.splits and prepare again"
            )
        self.shards = manifest["splits"][split]["shards"]
        if verify:
            self.verify()
        self._open()

    def verify(self) -> None:
        """Compare every shard file's sha256 with the manifest: catches truncated copies and edited bytes."""
        for shard in self.shards:
            for entry in shard["files"].values():
                path = self.dataset_dir / entry["file"]
                if not path.is_file():
                    raise FileNotFoundError(f"shard file missing: {path}; prepare the dataset again")
                if _sha256(path) != entry["sha256"]:
                    raise ShardChecksumError(
                        f"shard file {path} does not match the sha256 in {self.dataset_dir / 'manifest.json'} "
                        f"(expected {entry['sha256']}: corrupted or modified); delete {self.dataset_dir} and "
                        "prepare it again"
                    )

    def _mmap(self, shard: dict, kind: str) -> np.ndarray:
        return np.load(self.dataset_dir / shard["files"][kind]["file"], mmap_mode="r")

    def _open(self) -> None:
        self._src = [self._mmap(s, "src") for s in self.shards]
        self._tgt = [self._mmap(s, "tgt") for s in self.shards]
        self._idx = [self._mmap(s, "idx") for s in self.shards]
        # first global pair index of each shard: pair i lives in shard searchsorted(starts, i, "right") - 1
        self._starts = np.cumsum([0] + [s["pairs"] for s in self.shards])
        lengths = [np.diff(idx, axis=0) for idx in self._idx]  # per shard (N, 2)
        both = np.concatenate(lengths) if lengths else np.zeros((0, 2), dtype=np.int64)
        self.src_lengths = both[:, 0].astype(np.int32)  # (num_pairs,)
        self.tgt_lengths = both[:, 1].astype(np.int32)  # (num_pairs,)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(f"pair {i} out of range for the {len(self)} pairs of split {self.split!r}")
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        j = i - int(self._starts[k])
        (s0, t0), (s1, t1) = self._idx[k][j], self._idx[k][j + 1]
        return self._src[k][s0:s1], self._tgt[k][t0:t1]

    # DataLoader workers get a pickled copy: send only the file names and re-open the memory maps there,
    # instead of pickling (i.e. copying) every mapped token.
    def __getstate__(self) -> dict:
        return {"dataset_dir": self.dataset_dir, "split": self.split, "shards": self.shards}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()
