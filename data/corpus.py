"""Reading a parallel corpus: line i of the source file is the translation of line i of the target file.

Section 5.1 trains on "the standard WMT 2014 English-German dataset consisting of about 4.5 million sentence
pairs". Those pairs come as two plain (or gzip-compressed) text files per split, one sentence per line. We read
them with Hugging Face `datasets`' "text" builder: it decompresses .gz, and writes the lines once into an
Arrow file on disk that is memory-mapped afterwards, so 4.5M pairs cost flat memory and a second pass over
the text (BPE training, then encoding) is a cheap re-read instead of a second decompression.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

# The corpora are local files: never let `datasets` look for a dataset on the Hub (this machine, CI and the
# tests have no internet). Must be set before `datasets` is imported; setdefault keeps an explicit choice.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402  (after the environment variable above)


class CorpusFileNotFoundError(FileNotFoundError):
    """A corpus file named in the data config does not exist."""


def resolve_corpus_path(path: str | os.PathLike, corpora_dir: str | os.PathLike | None) -> Path:
    """A split file from the data config: relative paths are taken inside `corpora_dir`."""
    path = Path(path).expanduser()
    if not path.is_absolute():
        if corpora_dir is None:
            raise CorpusFileNotFoundError(
                f"corpus file {path} is a relative path but no corpora folder is configured: "
                "set CORPORA_DIR or data.corpora_dir=... to the folder holding the corpora"
            )
        path = Path(corpora_dir).expanduser() / path
    if not path.is_file():
        raise CorpusFileNotFoundError(
            f"corpus file not found: {path} (looked in corpora folder {corpora_dir}); "
            "set CORPORA_DIR or data.corpora_dir=... to the folder holding the corpora"
        )
    return path


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks so a multi-GB corpus never sits in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def read_lines(path: Path, cache_dir: Path) -> datasets.Dataset:
    """All lines of one text file (plain or .gz) as an on-disk Arrow table with one column, "text".

    The "text" builder splits on "\\n" only and strips the line break, so row i is line i of the file (empty
    lines included, which keeps two files of a pair aligned). The Arrow copy is cached under `cache_dir`,
    keyed by the file's path and modification time, so the second read of a file is instant.
    """
    return datasets.load_dataset(
        "text", data_files=str(path), split="train", cache_dir=str(cache_dir), keep_linebreaks=False
    )


class ParallelCorpus:
    """One split (train, valid or test) of a sentence-aligned parallel corpus: a source and a target file."""

    def __init__(self, src_path: Path, tgt_path: Path, cache_dir: Path):
        self.src_path, self.tgt_path = Path(src_path), Path(tgt_path)
        self.src = read_lines(self.src_path, cache_dir)
        self.tgt = read_lines(self.tgt_path, cache_dir)
        # Every later step pairs line i with line i, so one missing line would shift every pair after it.
        if len(self.src) != len(self.tgt):
            raise ValueError(
                f"source and target line counts differ: {self.src_path} has {len(self.src)} lines but "
                f"{self.tgt_path} has {len(self.tgt)}; line i of one must translate line i of the other, "
                "so fix the files (or point the data config at a matching pair)"
            )

    def __len__(self) -> int:
        return len(self.src)

    def batches(self, batch_size: int = 10_000) -> Iterator[tuple[list[str], list[str]]]:
        """(source sentences, target sentences) in file order, `batch_size` pairs at a time."""
        for src, tgt in zip(self.src.iter(batch_size=batch_size), self.tgt.iter(batch_size=batch_size), strict=True):
            yield src["text"], tgt["text"]

    def head(self, n: int) -> list[tuple[str, str]]:
        """The first n (source, target) pairs, e.g. to show sample translations of validation sentences."""
        n = min(n, len(self))
        return list(zip(self.src[:n]["text"], self.tgt[:n]["text"], strict=True))
