"""Encoded sentence pairs on disk, in shards that are memory-mapped instead of loaded.

The 4.5M WMT pairs of section 5.1 are ~150M BPE tokens. Kept as Python lists they would take tens of GB;
as flat uint16 arrays they take ~300 MB on disk and, memory-mapped, almost no RAM: the OS pages in only
what a batch touches, and every DataLoader worker and DDP rank shares the same page cache.

One shard of N pairs is three .npy files:
    shard-00000.src.npy   (total source tokens,)   uint16 (int32 if the vocabulary has more than 65536 ids)
    shard-00000.tgt.npy   (total target tokens,)   same dtype
    shard-00000.idx.npy   (N + 1, 2) int64         offsets: pair i is src[idx[i,0]:idx[i+1,0]], tgt[idx[i,1]:idx[i+1,1]]
plus shard-00000.json, its record (pairs, tokens, sha256 per file, which input lines it holds), written last.
With de-duplication on (data.clean.dedup), shard-00000.keys.npy holds the hashes the shard added to the
de-duplication memory, so a resumed prepare restores that memory without reading the text again (data/dedup.py).

Shard k holds what cleaning kept of input lines [k * shard_lines, (k + 1) * shard_lines): a shard is a unit of
work that does not depend on the ones before it, so an interrupted preparation resumes at the first missing shard.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from data.atomic import atomic_write, disk_full, is_disk_full, move_into_place, temp_path, write_json_atomic
from data.errors import DataError, DiskFullError, ManifestMismatchError
from data.manifest import MANIFEST_NAME, file_sha256, read_manifest

SIDES = ("src", "tgt")


class ShardChecksumError(DataError, RuntimeError):
    """A shard file's bytes differ from the sha256 recorded in the manifest (corrupted or edited)."""


class ShardFileMissingError(DataError, FileNotFoundError):
    """A shard file the manifest lists is not in the dataset folder."""


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest dtype holding every id: ids run 0..vocab_size-1, uint16 holds 0..65535."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


def _save_atomic(path: Path, array: np.ndarray) -> str:
    """np.save to a temporary name, then rename (data/atomic.py): a crash never leaves a half-written shard.
    Returns the file's sha256."""
    atomic_write(path, lambda f: np.save(f, array))
    return file_sha256(path)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


class ShardWriter:
    """One shard written while it is encoded: each batch's ids go straight to the shard's .npy files, so memory
    holds a batch, not the shard (a 250k-line WMT shard is ~20 MB of ids; held and then concatenated, twice that).

    The files are written under temporary names and renamed by `finish`, which writes the offsets and the record
    last, as write_shard describes. Used as a context manager, an exception removes the temporary files.
    The .npy header, which holds the array's length, is written at the end into the HEADER bytes kept free at the
    start: that is where np.save puts the data of a 1-D array of any length up to 10^18 (byte-identical files).
    """

    HEADER = 128

    def __init__(self, dataset_dir: Path, split: str, index: int, dtype: np.dtype):
        self.dataset_dir, self.split, self.name, self.dtype = Path(dataset_dir), split, shard_name(index), dtype
        (self.dataset_dir / split).mkdir(parents=True, exist_ok=True)
        self._tmp = {kind: temp_path(self._path(kind)) for kind in SIDES}
        self._files = {kind: open(path, "wb") for kind, path in self._tmp.items()}  # noqa: SIM115 (closed in finish)
        for f in self._files.values():
            f.seek(self.HEADER)
        self._lengths: dict[str, list[np.ndarray]] = {kind: [] for kind in SIDES}

    def _file(self, kind: str) -> str:
        """A shard file's path relative to the dataset folder, as records store it."""
        return f"{self.split}/{self.name}.{kind}.npy"

    def _path(self, kind: str) -> Path:
        return self.dataset_dir / self._file(kind)

    def add(self, src: tuple[np.ndarray, np.ndarray], tgt: tuple[np.ndarray, np.ndarray]) -> None:
        """Append a batch of pairs: (flat ids, length of each pair) per side, as Tokenizer.encode_flat returns."""
        for kind, (ids, lengths) in zip(SIDES, (src, tgt), strict=True):
            self._files[kind].write(np.ascontiguousarray(ids, dtype=self.dtype).data)
            self._lengths[kind].append(np.asarray(lengths, dtype=np.int64))

    def finish(self, extra: dict[str, np.ndarray] | None = None, **info) -> dict:
        """Complete the shard (headers, renames, offsets, extras, the record last); return its record."""
        lengths = {
            kind: np.concatenate(parts) if parts else np.zeros(0, np.int64) for kind, parts in self._lengths.items()
        }
        files, tokens = {}, {}
        for kind, f in self._files.items():
            tokens[kind] = int(lengths[kind].sum())
            f.seek(0)
            header = {
                "descr": np.lib.format.dtype_to_descr(self.dtype),
                "fortran_order": False,
                "shape": (tokens[kind],),
            }
            np.lib.format.write_array_header_1_0(f, header)
            if f.tell() != self.HEADER:
                raise RuntimeError(f"{self._tmp[kind]}: .npy header of {f.tell()} bytes, expected {self.HEADER}")
            f.close()
            move_into_place(self._tmp[kind], self._path(kind))
            files[kind] = {"file": self._file(kind), "sha256": file_sha256(self._path(kind))}
        offsets = np.zeros((len(lengths["src"]) + 1, 2), dtype=np.int64)  # (N + 1, 2)
        offsets[1:, 0] = np.cumsum(lengths["src"])
        offsets[1:, 1] = np.cumsum(lengths["tgt"])
        for kind, array in (("idx", offsets), *(extra or {}).items()):
            files[kind] = {
                "file": self._file(kind),
                "sha256": _save_atomic(self._path(kind), array),
            }
        record = {
            "name": self.name,
            "pairs": len(offsets) - 1,
            "src_tokens": tokens["src"],
            "tgt_tokens": tokens["tgt"],
        }
        record.update(files=files, **info)
        write_json_atomic(self.dataset_dir / self.split / f"{self.name}.json", record)
        return record

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, _tb) -> None:
        if exc_type is not None:  # no half shard: drop what was written
            for kind, f in self._files.items():
                f.close()
                self._tmp[kind].unlink(missing_ok=True)
            if is_disk_full(exc) and not isinstance(exc, DiskFullError):
                raise disk_full(self.dataset_dir / self.split / f"{self.name}.*.npy", exc) from exc


def write_shard(
    dataset_dir: Path,
    split: str,
    index: int,
    src: tuple[np.ndarray, np.ndarray],
    tgt: tuple[np.ndarray, np.ndarray],
    extra: dict[str, np.ndarray] | None = None,
    **info,
) -> dict:
    """Write one shard's arrays, then its record `<split>/shard-NNNNN.json`, each atomically; return the record.

    src, tgt: (flat token ids, length of each pair), as Tokenizer.encode_flat returns them. `extra` arrays (e.g. the
    de-duplication keys of data/dedup.py) are written beside the shard as `shard-NNNNN.<name>.npy` and
    checksummed like the others. The record goes last: it is the proof that the shard is whole. A run killed
    at any moment leaves either no record (the shard is encoded again) or a complete shard whose sha256s are
    in the record (it is kept). `info` (input line range, cleaning counts, ...) is stored in the record.
    """
    with ShardWriter(dataset_dir, split, index, src[0].dtype) as writer:
        writer.add(src, tgt)
        return writer.finish(extra, **info)


def load_shard(dataset_dir: Path, record: dict) -> dict[str, np.ndarray]:
    """Every array of a shard written by `write_shard`, by kind (src, tgt, idx and any extras), memory-mapped."""
    return {kind: np.load(Path(dataset_dir) / e["file"], mmap_mode="r") for kind, e in record["files"].items()}


def remove_shard(dataset_dir: Path, record: dict) -> None:
    """Delete a shard's record (first: the shard stops counting as finished), then its arrays."""
    (Path(dataset_dir) / Path(record["files"]["src"]["file"]).parent / f"{record['name']}.json").unlink()
    for entry in record["files"].values():
        (Path(dataset_dir) / entry["file"]).unlink(missing_ok=True)


def finished_shard(dataset_dir: Path, split: str, index: int) -> dict | None:
    """The record of a shard a previous (interrupted) run completed, or None if it must be (re)written.

    A shard counts as finished only if its record exists and every file still has the sha256 recorded there.
    """
    path = Path(dataset_dir) / split / f"{shard_name(index)}.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    for entry in record["files"].values():
        file = Path(dataset_dir) / entry["file"]
        if not file.is_file() or file_sha256(file) != entry["sha256"]:
            return None
    return record


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
        self.check_counts()

    def verify(self) -> None:
        """Compare every shard file's sha256 with the manifest: catches truncated copies and edited bytes."""
        for shard in self.shards:
            for entry in shard["files"].values():
                path = self.dataset_dir / entry["file"]
                if not path.is_file():
                    raise ShardFileMissingError(
                        f"shard file missing: {path}; delete {self.dataset_dir} and run `aiayn prepare` again"
                    )
                if file_sha256(path) != entry["sha256"]:
                    raise ShardChecksumError(
                        f"shard file {path} does not match the sha256 in {self.dataset_dir / 'manifest.json'} "
                        f"(expected {entry['sha256']}: corrupted or modified); delete {self.dataset_dir} and "
                        "prepare it again"
                    )

    def _mmap(self, shard: dict, kind: str) -> np.ndarray:
        path = self.dataset_dir / shard["files"][kind]["file"]
        try:
            return np.load(path, mmap_mode="r")
        except FileNotFoundError:
            raise ShardFileMissingError(
                f"shard file missing: {path}; delete {self.dataset_dir} and run `aiayn prepare` again"
            ) from None
        except (OSError, ValueError) as err:  # cut short (mmap past the end), or not a .npy file
            raise ShardChecksumError(
                f"shard file {path} cannot be read ({err}): corrupted or cut short; delete {self.dataset_dir} and "
                "run `aiayn prepare` again"
            ) from err

    def check_counts(self) -> None:
        """The manifest's pair and token counts of each shard against its files, from their .npy headers and last
        offsets (no full read): a count edited by hand would otherwise index past a shard's end an epoch later (or
        leave pairs unread), since batches are drawn by the manifest's counts."""
        manifest = self.dataset_dir / MANIFEST_NAME
        for shard, src, tgt, idx in zip(self.shards, self._src, self._tgt, self._idx, strict=True):
            files = {kind: self.dataset_dir / shard["files"][kind]["file"] for kind in ("src", "tgt", "idx")}
            fix = (
                f"the manifest was edited, or the shard's files are another preparation's; delete {self.dataset_dir} "
                "and run `aiayn prepare` again"
            )
            if idx.ndim != 2 or idx.shape[1] != 2 or len(idx) == 0:
                raise ManifestMismatchError(
                    f"{files['idx']} holds offsets of shape {idx.shape}, not (pairs + 1, 2); {fix}"
                )
            found = {
                "pairs": (len(idx) - 1, files["idx"], "pairs"),
                "src_tokens": (len(src), files["src"], "source tokens"),
                "tgt_tokens": (len(tgt), files["tgt"], "target tokens"),
            }
            for key, (count, file, what) in found.items():
                if shard.get(key) != count:
                    raise ManifestMismatchError(
                        f"{manifest} says {self.split}/{shard['name']} holds {shard.get(key)} {what}, but {file} "
                        f"holds {count}; {fix}"
                    )
            if tuple(int(n) for n in idx[-1]) != (len(src), len(tgt)):
                raise ManifestMismatchError(
                    f"{files['idx']} ends at token offsets {tuple(int(n) for n in idx[-1])}, but {files['src']} and "
                    f"{files['tgt']} hold {len(src)} and {len(tgt)} tokens; {fix}"
                )

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
