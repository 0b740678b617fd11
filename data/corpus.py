"""Reading a parallel corpus: pair i is line i of the source side and line i of the target side.

Section 5.1 trains on "the standard WMT 2014 English-German dataset consisting of about 4.5 million sentence
pairs". data/sources.py reads each split (text file pairs, TSV, JSONL, parquet or a Hub dataset) into an Arrow
file on disk that is memory-mapped afterwards, so 4.5M pairs cost flat memory and a second pass over the text
(BPE training, then encoding) is a cheap re-read instead of a second decompression.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data.encode import read_record_batches
from data.errors import BadLineError, CorpusFileNotFoundError
from data.sources import Source, load_split, resolve_corpus_path

__all__ = ["CorpusFileNotFoundError", "ParallelCorpus", "resolve_corpus_path"]


class ParallelCorpus:
    """One split (train, valid or test) of a sentence-aligned parallel corpus, from one or more sources."""

    def __init__(self, split: str, sources: list[Source], cache_dir: Path, sha256: Mapping[str, str] | None = None):
        """sha256: the sources' files' hashes by manifest key ("train.src", ...), which name their Arrow files in
        the cache (`aiayn prepare` has them from the fingerprint, a reader from the manifest); without them the
        files are hashed here."""
        self.split, self.sources = split, sources
        self.data: datasets.Dataset = load_split(sources, cache_dir, sha256)  # columns: data.sources.FEATURES

    def __len__(self) -> int:
        return len(self.data)

    def issues(self) -> dict[str, int]:
        """How many pairs have each kind of unusable line (invalid_utf8, line_too_long, ...)."""
        column = self.data.data.column("issue").drop_null()
        return {str(row["values"]): int(row["counts"]) for row in pc.value_counts(column).to_pylist()}

    def crlf_lines(self) -> int:
        """Lines that ended in "\\r\\n" (the "\\r" was removed)."""
        return int(pc.sum(self.data.data.column("crlf")).as_py() or 0)

    def first_issue(self) -> str | None:
        """ "<file> line <n>: <problem>" of the first unusable line, or None."""
        column = self.data.data.column("where")
        if column.null_count == len(column):
            return None
        index = pc.index(pc.is_valid(column), True).as_py()
        return column[index].as_py()

    def check(self, on_bad_line: str) -> None:
        """Raise on the first unusable line unless bad lines may be skipped (train with on_bad_line=skip)."""
        if on_bad_line == "skip" or (where := self.first_issue()) is None:
            return
        if self.split == "train":
            advice = "fix the file, or set data.clean.on_bad_line=skip to skip such pairs (they are counted)"
        else:
            advice = f"fix the file: the {self.split} split keeps every line, so pair i stays line i of the reference"
        raise BadLineError(f"{where}; {advice}")

    def batches(
        self, batch_size: int = 10_000, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[list[str], list[str], list[str | None]]]:
        """(source sentences, target sentences, issues) of lines [start, stop) in file order, `batch_size` at a time."""
        stop = len(self) if stop is None else min(stop, len(self))
        for i in range(start, stop, batch_size):
            batch = self.data[i : min(i + batch_size, stop)]  # a contiguous slice of the memory-mapped Arrow table
            yield batch["src"], batch["tgt"], batch["issue"]

    def batches_at(
        self, indices: Sequence[int], batch_size: int = 10_000
    ) -> Iterator[tuple[list[str], list[str], list[str | None]]]:
        """Like `batches`, for the pairs at `indices` (ascending, e.g. a sorted random sample), in that order.

        Reads each Arrow record batch (~50k rows) once, with one `take` of the sampled rows it holds, so a sample
        costs one pass over the table. (`Dataset.__getitem__` with a list of indices builds a one-row slice per
        index, far too slow for a sample of a large corpus.)
        """
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (np.any(np.diff(indices) < 0) or indices[0] < 0 or indices[-1] >= len(self)):
            raise ValueError(f"batches_at needs ascending indices in [0, {len(self)}) of split {self.split!r}")
        if self.data._indices is not None:  # a selected/shuffled view: rows are not in file order
            raise ValueError(f"split {self.split!r} is a view with an indices mapping; flatten_indices() it first")
        # The files are read (not memory-mapped), one record batch at a time: a sample spread over the whole corpus
        # touches nearly every page of it, and mapped pages would stay in this process's resident set, growing
        # with the corpus; a read batch is freed once its sampled rows are taken.
        pending: list[pa.Table] = []
        offset, cursor = 0, 0  # first row of the current record batch; next index of `indices` to take
        for record_batch in read_record_batches(self.arrow_files()):
            end = offset + record_batch.num_rows
            stop = int(np.searchsorted(indices, end, side="left"))
            if stop > cursor:
                pending.append(pa.Table.from_batches([record_batch.take(pa.array(indices[cursor:stop] - offset))]))
                cursor = stop
            offset = end
            while pending and (sum(t.num_rows for t in pending) >= batch_size or cursor == len(indices)):
                table = pa.concat_tables(pending).combine_chunks()
                part, rest = table.slice(0, batch_size), table.slice(batch_size)
                yield part.column("src").to_pylist(), part.column("tgt").to_pylist(), part.column("issue").to_pylist()
                pending = [rest] if rest.num_rows else []
            if cursor == len(indices):
                return
            del record_batch
            pa.default_memory_pool().release_unused()  # else Arrow's allocator holds on to each batch read

    def arrow_files(self) -> list[str]:
        """The memory-mapped Arrow files holding this split's rows, in row order (read by data/encode.py workers)."""
        files = [entry["filename"] for entry in self.data.cache_files]
        if self.data._indices is not None or not files:
            raise ValueError(
                f"split {self.split!r} is not a plain memory-mapped Arrow table; set data.num_prepare_workers=1"
            )
        return files

    def head(self, n: int) -> list[tuple[str, str]]:
        """The first n (source, target) pairs, e.g. to show sample translations of validation sentences."""
        rows = self.data[: min(n, len(self))]
        return list(zip(rows["src"], rows["tgt"], strict=True))
