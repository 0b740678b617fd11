"""Where a split's sentence pairs come from: text file pairs, TSV, JSON lines, parquet or a Hugging Face Hub dataset.

A split under `data.splits` is one source, or a list of sources read one after the other (e.g. several WMT
news test sets used as one training set):

    {src: a.en.gz, tgt: a.de.gz}                        two aligned text files, plain or .gz: line i <-> line i
    {tsv: pairs.tsv.gz, src_col: 0, tgt_col: 1}         one tab-separated file (extra columns are ignored)
    {jsonl: pairs.jsonl, src_field: en, tgt_field: de}  JSON lines; the fields default to data.src_lang/tgt_lang and
                                                        are also found inside HF's {"translation": {"en":.., "de":..}}
    {parquet: pairs.parquet, src_field: .., tgt_field: ..}
    {hub: wmt14, hub_config: de-en, hub_split: train, revision: null}   datasets.load_dataset (needs internet once)

Relative file paths are taken inside the corpora folder (data.corpora_dir: $CORPORA_DIR). A file it does not hold
is fetched on first use when the data config has `download: {url, dir}` and the file has a source: a mirror at
data.download.url (or $AIAYN_DATA_URL), or its public source (Multi30k's, data/download.py); it is kept, verified,
in data.download.dir and read from there like any corpus file.

Every source becomes an on-disk, memory-mapped Arrow table (flat memory at any corpus size) with the columns
    src, tgt   the raw text of the pair
    issue      null, or why the pair cannot be used: invalid_utf8, line_too_long, bad_columns, bad_json, missing_field
    where      null, or "<file> line <n>: <what is wrong>" for that issue
    crlf       how many of the pair's lines ended in "\\r\\n" (the "\\r" is removed and counted, never an error)

Line-based files (text, TSV, JSONL) and parquet files are read here and written to Arrow in batches
(`_from_batches`), not with HF's "text"/"csv"/"json"/"parquet" builders: the "text" builder opens files with
universal newlines, so a stray "\\r" inside a line silently splits it in two (and shifts every later pair), and it
fails on invalid UTF-8 without naming the line; pandas' csv reader treats quotes and "NA" specially. Reading the
bytes ourselves keeps row i exactly line i, and turns each problem into a row that on_bad_line=error reports by file
and line, or on_bad_line=skip skips and counts. Hub sources use `load_dataset` (its cache is keyed by the dataset's
revision).

The Arrow file of a source is reused while its input files' CONTENT is the same: it is named by their sha256 (which
`aiayn prepare` computes anyway for the dataset's fingerprint; readers pass the manifest's), never by path, size and
mtime, which a file edited in place can keep (HF's builders key local files by mtime alone).
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
import socket
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from operator import add
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

import datasets
import pyarrow as pa

from data.atomic import atomic_write
from data.errors import (
    CorpusFileNotFoundError,
    CorruptFileError,
    EmptyCorpusFileError,
    HubSourceError,
    LineCountError,
    SourceConfigError,
)
from data.manifest import file_sha256

MAX_LINE_BYTES = 1 << 20  # a "sentence" over 1 MiB is a broken file (a missing newline), not a sentence
READER_VERSION = 1  # part of the Arrow cache key: bump when read_lines or the row layout changes
FEATURES = datasets.Features(
    {
        "src": datasets.Value("string"),
        "tgt": datasets.Value("string"),
        "issue": datasets.Value("string"),
        "where": datasets.Value("string"),
        "crlf": datasets.Value("int8"),
    }
)
FILE_KINDS = ("tsv", "jsonl", "parquet")
HUB_TIMEOUT_S = 5.0
ARROW_BATCH_ROWS = 50_000  # rows converted to Arrow columns at a time: ~10 MB of text in memory
ARROW_DIR = "aiayn_arrow"  # the Arrow files of the sources, under the cache folder


def arrow_cache_dir(cache_dir: Path) -> Path:
    """Where `load_source` keeps the Arrow file of each source (one per input files' content and read options)."""
    return Path(cache_dir) / ARROW_DIR


@dataclass(frozen=True)
class Source:
    """One entry of data.splits.<split>: its config key (for messages), kind, files and options."""

    key: str  # e.g. "data.splits.train" or "data.splits.train[2]"
    label: str  # manifest key prefix, e.g. "train" or "train[2]"
    kind: str  # text | tsv | jsonl | parquet | hub
    files: dict[str, Path] = field(default_factory=dict)  # role -> path: src/tgt for text, file otherwise
    options: dict[str, Any] = field(default_factory=dict)


def resolve_corpus_path(
    path: str | os.PathLike,
    corpora_dir: str | os.PathLike | None,
    key: str = "",
    download: dict[str, Any] | None = None,
) -> Path:
    """A file from the data config: relative paths are taken inside `corpora_dir`. Missing or empty files fail.

    With `download` (data.download: {url, dir}), a relative file the corpora folder does not hold is taken from the
    download folder, fetched there first if needed (data/download.py): a mirror at `url`, else the file's public
    source if it has one."""
    where = f" ({key})" if key else ""
    put_here = "set CORPORA_DIR or data.corpora_dir=... to the folder holding the corpora"
    path = Path(path).expanduser()
    if not path.is_absolute():
        if corpora_dir is None:
            raise CorpusFileNotFoundError(
                f"corpus file {path}{where} is a relative path but no corpora folder is configured: {put_here}"
            )
        relative, path = path, Path(corpora_dir).expanduser() / path
        if not path.is_file() and download and download.get("dir"):
            path = _downloaded(relative, path, corpora_dir, where, download)
    if not path.is_file():
        raise CorpusFileNotFoundError(
            f"corpus file not found: {path}{where} (looked in corpora folder {corpora_dir}); {put_here}"
        )
    if path.stat().st_size == 0:
        raise EmptyCorpusFileError(f"corpus file {path}{where} is empty (0 bytes); point the data config at the data")
    return path


def _downloaded(relative: Path, path: Path, corpora_dir: Any, where: str, download: dict[str, Any]) -> Path:
    """The file `relative` from data.download.dir, fetched on first use; `path` (its place in the corpora folder) if it
    has no source. A failed fetch: one line naming the corpora folder's file, where to put it, and what failed."""
    from data.download import DownloadError, can_download, fetch, mirror_url

    name, mirror = relative.as_posix(), mirror_url(download.get("url"))
    if not can_download(name, mirror):
        return path
    try:
        return fetch(name, download["dir"], mirror)
    except DownloadError as err:
        raise CorpusFileNotFoundError(
            f"corpus file not found: {path}{where}, and downloading it failed ({err}); put the corpora in a folder "
            f"and set CORPORA_DIR (or paths.corpora_dir=...) to it, or data.download.url=... to a mirror of that "
            f"folder (README: 'Corpora')"
        ) from None


def parse_split(split: str, spec: Any, cfg: dict[str, Any]) -> list[Source]:
    """data.splits.<split> -> its sources, with files resolved and options defaulted."""
    specs = spec if isinstance(spec, list) else [spec]
    if not specs:
        raise SourceConfigError(f"data.splits.{split} is an empty list; give at least one source")
    sources = []
    for i, one in enumerate(specs):
        suffix = f"[{i}]" if isinstance(spec, list) else ""
        sources.append(_parse_one(f"data.splits.{split}{suffix}", f"{split}{suffix}", one, cfg))
    return sources


def _parse_one(key: str, label: str, spec: Any, cfg: dict[str, Any]) -> Source:
    corpora_dir = cfg.get("corpora_dir") or os.environ.get("CORPORA_DIR")
    download = cfg.get("download")  # data.download: where missing corpus files are fetched from (data/download.py)
    layouts = "{src: .., tgt: ..}, {tsv: ..}, {jsonl: ..}, {parquet: ..} or {hub: ..} (see data/sources.py)"
    if not isinstance(spec, dict):
        raise SourceConfigError(f"{key} must be one of {layouts}, got {spec!r}")
    layouts_given = [k for k in ("hub", *FILE_KINDS) if k in spec]
    layouts_given += ["src/tgt"] if "src" in spec or "tgt" in spec else []
    if len(layouts_given) > 1:
        raise SourceConfigError(
            f"{key} mixes {' and '.join(layouts_given)}: give one layout. A Hydra override merges into the default "
            f"split, so replace it instead: '~{key}' '+{key}={{src: a.en.gz, tgt: a.de.gz}}'"
        )
    fields = {
        "src_field": spec.get("src_field") or cfg.get("src_lang"),
        "tgt_field": spec.get("tgt_field") or cfg.get("tgt_lang"),
    }
    if "hub" in spec:
        options = {
            "hub": spec["hub"],
            "hub_config": spec.get("hub_config"),
            "hub_split": spec.get("hub_split", "train"),
            "revision": spec.get("revision"),
            **fields,
        }
        return Source(key, label, "hub", {}, options)
    kinds = [k for k in FILE_KINDS if k in spec]
    if len(kinds) == 1:
        kind = kinds[0]
        path = resolve_corpus_path(spec[kind], corpora_dir, f"{key}.{kind}", download)
        if kind == "tsv":
            options = {"src_col": int(spec.get("src_col", 0)), "tgt_col": int(spec.get("tgt_col", 1))}
        else:
            options = fields
        return Source(key, label, kind, {"file": path}, options)
    if "src" in spec or "tgt" in spec:
        for side in ("src", "tgt"):
            if side not in spec:
                raise SourceConfigError(f"{key} has no '{side}' file (it needs both 'src' and 'tgt')")
        files = {
            side: resolve_corpus_path(spec[side], corpora_dir, f"{key}.{side}", download) for side in ("src", "tgt")
        }
        return Source(key, label, "text", files)
    raise SourceConfigError(f"{key} must be one of {layouts}, got keys {sorted(spec)}")


# -- line-based files -------------------------------------------------------------------------------------
def _open_bytes(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


class LineReader:
    """The lines of a plain or .gz file, `take(n)` at a time as columns: (texts, issues, wheres, crlf flags).

    Splits on b"\\n" only; a final "\\r" is removed and reported as crlf. A line that is not UTF-8 or is longer
    than MAX_LINE_BYTES comes back with empty text and an issue, so the pair can be reported or skipped while every
    later line keeps its number. A .gz cut short raises CorruptFileError naming the file; a file with no line
    EmptyCorpusFileError. Memory is bounded: the file is read one line (at most MAX_LINE_BYTES + 1 bytes) at a
    time, and an over-long line is skipped without being held.

    Fast path: a batch of lines with no "\\r", no over-long line and valid UTF-8 is decoded and split in single
    C calls (one `bytes.decode`, one `str.split`); only a batch holding such a line is walked line by line.
    """

    def __init__(self, path: Path) -> None:
        self.path, self.lineno = path, 0
        self._file = _open_bytes(path)
        # Pieces of at most MAX_LINE_BYTES + 1 bytes: whole lines, except the pieces of an over-long one.
        self._pieces = iter(partial(self._file.readline, MAX_LINE_BYTES + 1), b"")

    def __enter__(self) -> LineReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def take(self, n: int) -> tuple[list[str], list[str | None], list[str | None], list[int]]:
        """The next n lines (fewer at the end of the file, none after it)."""
        pieces: list[bytes] = []
        try:
            pieces.extend(islice(self._pieces, n))  # what was read before an error stays in `pieces`
        except (EOFError, OSError, zlib.error) as err:
            # the whole lines read before the error: those of earlier batches, and of this one
            raise self._corrupt(self.lineno + sum(piece.endswith(b"\n") for piece in pieces), err) from err
        try:
            lines = self._fast(pieces) if pieces else ([], [], [], [])
            if lines is None:
                lines = self._slow(pieces, n)  # (reads on past `pieces` only to skip the rest of an over-long line)
        except (EOFError, OSError, zlib.error) as err:
            raise self._corrupt(self.lineno, err) from err
        if not lines[0] and self.lineno == 0:
            raise EmptyCorpusFileError(f"corpus file {self.path} has no lines; point the data config at the data")
        return lines

    def _corrupt(self, lines_read: int, err: BaseException) -> CorruptFileError:
        return CorruptFileError(
            f"{self.path} is cut short or corrupt after line {lines_read} ({err}); copy or download the file again"
        )

    def _fast(self, pieces: list[bytes]) -> tuple[list[str], list, list, list[int]] | None:
        if max(map(len, pieces)) > MAX_LINE_BYTES:  # (an over-long line's first piece is MAX_LINE_BYTES + 1)
            return None
        joined = b"".join(pieces)
        if b"\r" in joined:
            return None
        try:
            texts = joined.decode("utf-8").split("\n")
        except UnicodeDecodeError:
            return None
        if pieces[-1].endswith(b"\n"):
            texts.pop()  # the empty string after the last newline
        self.lineno += len(texts)
        return texts, [None] * len(texts), [None] * len(texts), [0] * len(texts)

    def _slow(self, pieces: list[bytes], n: int) -> tuple[list[str], list, list, list[int]]:
        texts, issues, wheres, crlfs = [], [], [], []
        pieces_iter = itertools.chain(pieces, self._pieces)  # an over-long line may need pieces past this batch
        for raw in pieces_iter:
            self.lineno += 1
            lineno, path = self.lineno, self.path
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                size = len(raw)
                for rest in pieces_iter:  # skip the rest of the line without holding it
                    size += len(rest)
                    if rest.endswith(b"\n"):
                        break
                texts.append("")
                issues.append("line_too_long")
                wheres.append(f"{path} line {lineno}: over 1 MiB ({size} bytes)")
                crlfs.append(0)
            else:
                raw = raw[:-1] if raw.endswith(b"\n") else raw
                crlf = raw.endswith(b"\r")
                raw = raw[:-1] if crlf else raw
                try:
                    texts.append(raw.decode("utf-8"))
                    issues.append(None)
                    wheres.append(None)
                except UnicodeDecodeError as err:
                    texts.append("")
                    issues.append("invalid_utf8")
                    bad = raw[err.start : err.start + 4]
                    wheres.append(f"{path} line {lineno}: invalid UTF-8 at byte {err.start} ({bad!r})")
                crlfs.append(int(crlf))
            if len(texts) == n:
                break
        return texts, issues, wheres, crlfs


def read_lines(path: Path) -> Iterator[tuple[int, str, str | None, str | None, bool]]:
    """(line number, text, issue, where, crlf) for every line of a plain or .gz file (see LineReader)."""
    lineno = 0
    with LineReader(path) as reader:
        while (lines := reader.take(ARROW_BATCH_ROWS))[0]:
            for text, issue, where, crlf in zip(*lines, strict=True):
                lineno += 1
                yield lineno, text, issue, where, bool(crlf)


def _text_pair_batches(src: str, tgt: str, stamp: Any) -> Iterator[tuple[list, ...]]:
    """Column batches (FEATURES order) of two aligned text files, read ARROW_BATCH_ROWS lines at a time from each.
    `stamp` (the files' sha256) only keys the Arrow cache."""
    with LineReader(Path(src)) as src_lines, LineReader(Path(tgt)) as tgt_lines:
        while True:
            s_text, s_issue, s_where, s_crlf = src_lines.take(ARROW_BATCH_ROWS)
            t_text, t_issue, t_where, t_crlf = tgt_lines.take(ARROW_BATCH_ROWS)
            if len(s_text) != len(t_text):
                # Every later step pairs line i with line i, so one missing line would shift every pair after it.
                for reader in (src_lines, tgt_lines):
                    while reader.take(ARROW_BATCH_ROWS)[0]:
                        pass  # count the rest of the longer file
                raise LineCountError(
                    f"source and target line counts differ: {src} has {src_lines.lineno} lines but {tgt} has "
                    f"{tgt_lines.lineno}; line i of one must translate line i of the other, so fix the files (or "
                    "point the data config at a matching pair)"
                )
            if not s_text:
                return
            if any(s_issue) or any(t_issue):  # the source's issue first, else the target's
                issues = [a or b for a, b in zip(s_issue, t_issue, strict=True)]
                wheres = [a or b for a, b in zip(s_where, t_where, strict=True)]
            else:
                issues, wheres = s_issue, s_where
            yield s_text, t_text, issues, wheres, list(map(add, s_crlf, t_crlf))


def _in_batches(rows: Iterator[tuple]) -> Iterator[tuple[list, ...]]:
    """Rows (tuples in FEATURES order) -> column batches of ARROW_BATCH_ROWS rows."""
    while chunk := list(islice(rows, ARROW_BATCH_ROWS)):
        yield tuple(map(list, zip(*chunk, strict=True)))


def _tsv_rows(path: str, src_col: int, tgt_col: int, stamp: Any) -> Iterator[tuple]:
    need = max(src_col, tgt_col) + 1
    for lineno, text, issue, where, crlf in read_lines(Path(path)):
        cols = text.split("\t")
        if issue is None and len(cols) < need:
            issue, where = "bad_columns", f"{path} line {lineno}: {len(cols)} tab-separated column(s), needs {need}"
        ok = issue is None
        yield (cols[src_col] if ok else ""), (cols[tgt_col] if ok else ""), issue, where, int(crlf)


def pick_field(record: Any, name: str) -> Any:
    """record[name], also inside HF's nested {"translation": {...}} layout and along dotted paths ("a.b")."""
    if isinstance(record, dict) and name not in record and isinstance(record.get("translation"), dict):
        record = record["translation"]
    if isinstance(record, dict) and name in record:
        return record[name]
    for part in name.split("."):
        record = record.get(part) if isinstance(record, dict) else None
    return record


def _jsonl_rows(path: str, src_field: str, tgt_field: str, stamp: Any) -> Iterator[tuple]:
    for lineno, text, issue, where, crlf in read_lines(Path(path)):
        src = tgt = ""
        if issue is None:
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                issue, where = "bad_json", f"{path} line {lineno}: not JSON ({err})"
            else:
                src, tgt = pick_field(record, src_field), pick_field(record, tgt_field)
                if not isinstance(src, str) or not isinstance(tgt, str):
                    issue, where = (
                        "missing_field",
                        f"{path} line {lineno}: no text fields {src_field!r} and {tgt_field!r}",
                    )
                    src = tgt = ""
        yield src, tgt, issue, where, int(crlf)


def _pick_columns(batch: dict, indices: list[int], src_field: str, tgt_field: str, origin: str) -> dict:
    """A batch of parquet/Hub records -> the FEATURES columns."""
    names = list(batch)
    rows = [{k: batch[k][i] for k in names} for i in range(len(indices))]
    out: dict[str, list] = {"src": [], "tgt": [], "issue": [], "where": [], "crlf": []}
    for index, row in zip(indices, rows, strict=True):
        src, tgt = pick_field(row, src_field), pick_field(row, tgt_field)
        ok = isinstance(src, str) and isinstance(tgt, str)
        out["src"].append(src if ok else "")
        out["tgt"].append(tgt if ok else "")
        out["issue"].append(None if ok else "missing_field")
        out["where"].append(None if ok else f"{origin} row {index}: no text fields {src_field!r} and {tgt_field!r}")
        out["crlf"].append(0)
    return out


def _parquet_batches(path: str, src_field: str, tgt_field: str, stamp: Any) -> Iterator[tuple[list, ...]]:
    """Column batches (FEATURES order) of a parquet file's records, ARROW_BATCH_ROWS at a time."""
    import pyarrow.parquet as pq

    offset = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=ARROW_BATCH_ROWS):
            records = batch.to_pydict()
            columns = _pick_columns(records, list(range(offset, offset + batch.num_rows)), src_field, tgt_field, path)
            offset += batch.num_rows
            yield tuple(columns[name] for name in FEATURES)
    except (pa.ArrowException, OSError) as err:
        if isinstance(err, OSError) and err.errno is not None:
            raise  # a read error of the disk, not of the file's content
        raise CorruptFileError(
            f"{path} is not a readable parquet file (after row {offset}: {err}); copy or download the file again"
        ) from err


# -- loading -----------------------------------------------------------------------------------------------
def _stamp(source: Source, sha256: Mapping[str, str] | None) -> str:
    """Keys the Arrow cache on the input files' content (sha256) and path (rows name it), and the reader's version.

    `sha256`: the files' hashes by manifest key ("train.src", ...), as `aiayn prepare` computed them for the
    dataset's fingerprint or a prepared manifest records them; a file not in it is hashed here."""
    files = []
    for role, path in source.files.items():
        digest = (sha256 or {}).get(f"{source.label}.{role}") or file_sha256(path)
        files.append([str(path), digest])
    return json.dumps([READER_VERSION, *files])


def _from_batches(
    batches: Callable[..., Iterator[tuple[list, ...]]], kwargs: dict, cache_dir: Path
) -> datasets.Dataset:
    """Write the column batches (lists in FEATURES order) to an Arrow file under cache_dir, reused while the files'
    content is the same (kwargs' "stamp"), and open it memory-mapped with `datasets.Dataset.from_file`.

    Each batch of columns becomes Arrow arrays in pyarrow (C++), not example by example as
    `Dataset.from_generator` does: its per-example feature encoding would cost more than the rest of a prepare run.
    The file is written atomically (data/atomic.py), so a killed run never leaves a truncated cache behind.
    """
    key = hashlib.sha256(json.dumps([batches.__name__, kwargs], sort_keys=True).encode()).hexdigest()[:20]
    path = arrow_cache_dir(cache_dir) / f"{batches.__name__.strip('_')}-{key}.arrow"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        schema = FEATURES.arrow_schema

        def write(sink: BinaryIO) -> None:
            with pa.ipc.new_stream(sink, schema) as writer:
                for columns in batches(**kwargs):
                    arrays = [pa.array(column, type=f.type) for column, f in zip(columns, schema, strict=True)]
                    writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=schema))
                    del arrays
                    # Arrow's allocator keeps the memory of freed batches; handed back after each batch, what it
                    # holds stays flat instead of growing with the size of the corpus.
                    pa.default_memory_pool().release_unused()

        atomic_write(path, write)
    return datasets.Dataset.from_file(str(path))


def _tsv_batches(**kwargs: Any) -> Iterator[tuple[list, ...]]:
    return _in_batches(_tsv_rows(**kwargs))


def _jsonl_batches(**kwargs: Any) -> Iterator[tuple[list, ...]]:
    return _in_batches(_jsonl_rows(**kwargs))


def load_source(source: Source, cache_dir: Path, sha256: Mapping[str, str] | None = None) -> datasets.Dataset:
    """One source as an Arrow table with the FEATURES columns.

    sha256: its files' hashes by manifest key ("train.src", "valid.file", ...), which key the Arrow cache; files
    it lacks are hashed here (see _stamp)."""
    files, opt = source.files, source.options
    if source.kind == "hub":
        return _to_features(load_hub(source, cache_dir), opt, f"{opt['hub']} ({source.key}.hub)")
    stamp = _stamp(source, sha256)
    if source.kind == "text":
        return _from_batches(
            _text_pair_batches, {"src": str(files["src"]), "tgt": str(files["tgt"]), "stamp": stamp}, cache_dir
        )
    if source.kind == "tsv":
        kwargs = {"path": str(files["file"]), "src_col": opt["src_col"], "tgt_col": opt["tgt_col"]}
        return _from_batches(_tsv_batches, {**kwargs, "stamp": stamp}, cache_dir)
    kwargs = {"path": str(files["file"]), "src_field": opt["src_field"], "tgt_field": opt["tgt_field"]}
    return _from_batches(
        _jsonl_batches if source.kind == "jsonl" else _parquet_batches, {**kwargs, "stamp": stamp}, cache_dir
    )


def _to_features(raw: datasets.Dataset, opt: dict, origin: str) -> datasets.Dataset:
    return raw.map(
        _pick_columns,
        batched=True,
        with_indices=True,
        remove_columns=raw.column_names,
        features=FEATURES,
        fn_kwargs={"src_field": opt["src_field"], "tgt_field": opt["tgt_field"], "origin": origin},
        desc=f"reading {origin}",
    )


def _hub_reachable(timeout: float) -> str | None:
    """None if the Hub's host answers within `timeout` seconds, else why not (so a missing network fails at once
    instead of after the client's retries)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or datasets.config.HF_DATASETS_OFFLINE:
        return None  # offline mode: load_dataset answers at once, from the local cache or with an error
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError as err:
        return f"{url.hostname} unreachable within {timeout:.0f} s: {err}"
    return None


def load_hub(source: Source, cache_dir: Path) -> datasets.Dataset:
    """datasets.load_dataset for a Hub source; any failure names the config key and the local-file alternative."""
    opt = source.options
    name = f"{opt['hub']}" + (f"/{opt['hub_config']}" if opt["hub_config"] else "") + f" split {opt['hub_split']}"
    advice = (
        f"without internet use local files instead, e.g. '~{source.key}' "
        f"'+{source.key}={{src: path/train.en.gz, tgt: path/train.de.gz}}', or data=wmt_news_local "
        "(README: 'Data preparation')"
    )
    if reason := _hub_reachable(HUB_TIMEOUT_S):
        raise HubSourceError(f"{source.key}.hub={opt['hub']}: cannot reach the Hugging Face Hub ({reason}); {advice}")
    try:
        return datasets.load_dataset(
            opt["hub"], opt["hub_config"], split=opt["hub_split"], revision=opt["revision"], cache_dir=str(cache_dir)
        )
    except Exception as err:  # noqa: BLE001  (offline mode, unknown name, no network: all need the same advice)
        raise HubSourceError(
            f"{source.key}.hub={opt['hub']}: cannot load {name} from the Hugging Face Hub "
            f"({type(err).__name__}: {err}); {advice}"
        ) from err


def load_split(sources: list[Source], cache_dir: Path, sha256: Mapping[str, str] | None = None) -> datasets.Dataset:
    """All sources of a split, concatenated in config order (sha256: see load_source)."""
    parts = [load_source(s, cache_dir, sha256) for s in sources]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def describe(source: Source, sha256: dict[Path, str]) -> dict[str, dict[str, Any]]:
    """Manifest "source" entries of one source: {"<label>.<role>": {path, bytes, sha256, options...}}."""
    if source.kind == "hub":
        return {f"{source.label}.hub": {"kind": "hub", **source.options}}
    return {
        f"{source.label}.{role}": {
            "kind": source.kind,
            "path": str(path),
            "bytes": path.stat().st_size,
            "sha256": sha256[path],
            **source.options,
        }
        for role, path in source.files.items()
    }
