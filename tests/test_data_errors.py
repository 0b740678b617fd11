"""Bad input to `aiayn prepare`: every case is a clear error naming the file, line, shard or key, or, where the user
asked to skip bad lines, a count in the manifest. Inputs are tiny files written here (tests/tiny_corpus.py);
no Transformer is trained, only a 100-token BPE model on the 242 fixture pairs (about a second).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest
import tiny_corpus
from tiny_corpus import tiny_data_cfg, write_tiny_corpus

from data.clean import Cleaner
from data.corpus import ParallelCorpus
from data.errors import (
    BadLineError,
    CorpusFileNotFoundError,
    CorruptFileError,
    DataError,
    EmptyCorpusFileError,
    HubSourceError,
    LineCountError,
    SpmModelMismatchError,
    VocabSizeError,
)
from data.manifest import read_manifest, verify_spm_model
from data.prepare import prepare_dataset, split_sources
from data.shards import ShardChecksumError, ShardedPairs
from data.sources import MAX_LINE_BYTES
from data.stats import dataset_stats
from data.tokenizer import train_sentencepiece


def data_cfg(corpora_dir: Path, splits: dict | None = None, **clean) -> dict:
    """conf/data/tiny.yaml as a plain dict, with other splits or cleaning settings."""
    cfg = tiny_data_cfg(corpora_dir, clean=clean)
    return {**cfg, "splits": splits} if splits else cfg


def corpus(tmp_path: Path, spec: dict, split: str = "train", **clean) -> ParallelCorpus:
    """One split read from files under tmp_path (no BPE, no shards)."""
    sources = split_sources(data_cfg(tmp_path, {split: spec}, **clean))[split]
    return ParallelCorpus(split, sources, tmp_path / "cache")


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (gzip.open if path.suffix == ".gz" else open)(path, "wb").write(data)
    return path


def lines(*texts: str) -> bytes:
    return "".join(t + "\n" for t in texts).encode()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return prepare_dataset(
        data_cfg(write_tiny_corpus(tmp_path_factory.mktemp("corpora"))), tmp_path_factory.mktemp("out")
    )


# -- reading -----------------------------------------------------------------------------------------------
def test_invalid_utf8_names_file_and_line_or_is_skipped_and_counted(tmp_path):
    src = write(tmp_path / "a.en", lines("one", "two") + b"thr\xffee\n" + lines("four"))
    write(tmp_path / "a.de", lines("eins", "zwei", "drei", "vier"))
    spec = {"src": "a.en", "tgt": "a.de"}
    with pytest.raises(BadLineError, match=rf"{src} line 3: invalid UTF-8 at byte 3.*on_bad_line=skip"):
        corpus(tmp_path, spec).check("error")

    train = corpus(tmp_path, spec)
    train.check("skip")  # no error
    assert train.issues() == {"invalid_utf8": 1}
    cleaner = Cleaner({"on_bad_line": "skip"}, filters=True)
    kept = [cleaner(*batch) for batch in train.batches()]
    assert kept == [(["one", "two", "four"], ["eins", "zwei", "vier"])]  # the pairs after it stay aligned
    assert cleaner.report()["removed"] == {"invalid_utf8": 1}


def test_valid_split_never_skips_a_bad_line(tmp_path):
    write(tmp_path / "v.en", lines("one") + b"\xc3\n")
    tgt = write(tmp_path / "v.de", lines("eins", "zwei"))
    valid = corpus(tmp_path, {"src": "v.en", "tgt": "v.de"}, split="valid", on_bad_line="skip")
    with pytest.raises(BadLineError, match=r"v\.en line 2: invalid UTF-8.*valid split keeps every line"):
        valid.check("error")  # prepare passes "error" for every split but train
    assert str(tgt) not in str(valid.first_issue())


def test_empty_and_missing_files_are_named(tmp_path):
    write(tmp_path / "e.en", b"")
    write(tmp_path / "e.de", lines("x"))
    with pytest.raises(EmptyCorpusFileError, match=rf"{tmp_path / 'e.en'} \(data\.splits\.train\.src\) is empty"):
        corpus(tmp_path, {"src": "e.en", "tgt": "e.de"})
    write(tmp_path / "e.de.gz", b"")  # a valid gzip of nothing: not 0 bytes, but no lines
    write(tmp_path / "x.en", lines("x"))
    with pytest.raises(EmptyCorpusFileError, match=rf"{tmp_path / 'e.de.gz'} has no lines"):
        corpus(tmp_path, {"src": "x.en", "tgt": "e.de.gz"})
    with pytest.raises(CorpusFileNotFoundError, match=rf"{tmp_path / 'nope.tsv'} \(data\.splits\.train\.tsv\)"):
        corpus(tmp_path, {"tsv": "nope.tsv"})


def test_crlf_is_normalized_and_counted_and_a_lone_cr_does_not_split_a_line(tmp_path):
    # HF's "text" builder reads with universal newlines: the lone \r in line 2 would become a line break
    # there and shift every later pair. We split on \n only, strip a final \r and count it.
    write(tmp_path / "c.en", b"one\r\ntw\ro\r\nthree\n")
    write(tmp_path / "c.de", b"eins\nzwei\ndrei\r\n")
    train = corpus(tmp_path, {"src": "c.en", "tgt": "c.de"})
    assert len(train) == 3 and train.crlf_lines() == 3
    assert train.head(3) == [("one", "eins"), ("tw\ro", "zwei"), ("three", "drei")]
    cleaner = Cleaner({}, filters=True)  # strip_control turns the \r into a space
    assert cleaner(*next(train.batches()))[0] == ["one", "tw o", "three"]
    assert cleaner.report()["changed"] == {"strip_control": 1}


def test_line_over_one_mib_names_file_and_line_or_is_skipped(tmp_path):
    long_line = b"x" * (MAX_LINE_BYTES + 5)
    tgt = write(tmp_path / "l.de.gz", lines("eins") + long_line + b"\n" + lines("drei"))
    write(tmp_path / "l.en", lines("one", "two", "three"))
    spec = {"src": "l.en", "tgt": "l.de.gz"}
    with pytest.raises(BadLineError, match=rf"{tgt} line 2: over 1 MiB \({MAX_LINE_BYTES + 6} bytes\)"):
        corpus(tmp_path, spec).check("error")
    train = corpus(tmp_path, spec)
    assert train.issues() == {"line_too_long": 1}
    assert train.head(3)[2] == ("three", "drei")  # line 3 is still line 3


def test_truncated_gzip_is_named_as_cut_short(tmp_path):
    whole = gzip.compress(lines(*[f"sentence number {i}" for i in range(2000)]))
    src = write(tmp_path / "t.en.gz.part", whole[: len(whole) // 2]).rename(tmp_path / "t.en.gz")
    write(tmp_path / "t.de", lines(*["x"] * 2000))
    with pytest.raises(CorruptFileError, match=rf"{src} is cut short or corrupt after line \d+"):
        corpus(tmp_path, {"src": "t.en.gz", "tgt": "t.de"})


def test_line_count_mismatch_names_both_files(tmp_path):
    write(tmp_path / "m.en", lines("a", "b", "c"))
    write(tmp_path / "m.de", lines("a", "b"))
    with pytest.raises(LineCountError, match=r"m\.en has 3 lines but .*m\.de has 2"):
        corpus(tmp_path, {"src": "m.en", "tgt": "m.de"})


def test_tsv_and_jsonl_bad_lines_are_named(tmp_path):
    tsv = write(tmp_path / "p.tsv", lines("a\tA", "no tab here", "c\tC\textra"))
    train = corpus(tmp_path, {"tsv": "p.tsv"})
    assert train.first_issue() == f"{tsv} line 2: 1 tab-separated column(s), needs 2"
    assert train.head(3)[2] == ("c", "C")
    records = [{"translation": {"en": "a", "de": "A"}}, {"en": "b", "de": "B"}, {"en": "c"}]
    jsonl = write(tmp_path / "p.jsonl", lines(*map(json.dumps, records), "{not json"))
    train = corpus(tmp_path, {"jsonl": "p.jsonl"})
    assert train.head(2) == [("a", "A"), ("b", "B")]  # nested HF layout and flat keys
    assert train.issues() == {"missing_field": 1, "bad_json": 1}
    assert train.first_issue() == f"{jsonl} line 3: no text fields 'en' and 'de'"


def test_parquet_source_reads_fields(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    table = pa.table({"translation": [{"en": "a", "de": "A"}, {"en": "b", "de": "B"}]})
    pq.write_table(table, tmp_path / "p.parquet")
    assert corpus(tmp_path, {"parquet": "p.parquet"}).head(2) == [("a", "A"), ("b", "B")]


def test_hub_without_network_fails_fast_naming_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # conftest sets it too; this test must not reach the network
    cfg = data_cfg(tmp_path, {"train": {"hub": "wmt14", "hub_config": "de-en", "hub_split": "train"}})
    start = time.monotonic()
    with pytest.raises(HubSourceError, match=r"data\.splits\.train\.hub=wmt14: cannot load wmt14/de-en") as err:
        prepare_dataset(cfg, tmp_path / "out")
    assert time.monotonic() - start < 10
    assert "use local files" in str(err.value) and isinstance(err.value, DataError)


# -- the prepared folder -----------------------------------------------------------------------------------
def test_cleaning_counts_are_in_the_manifest(prepared):
    train = read_manifest(prepared)["splits"]["train"]
    # tests/tiny_corpus.py ends train with an empty pair and a 1-to-10-words pair
    assert (train["lines"], train["pairs"]) == (202, 200)
    assert train["clean"]["removed"] == {"drop_empty": 1, "max_ratio": 1}
    assert read_manifest(prepared)["splits"]["valid"]["pairs"] == 20  # from the TSV file
    assert dataset_stats(prepared)["splits"]["test"]["pairs"] == 20  # from the JSONL file


def test_skipped_lines_are_counted_in_the_manifest(tmp_path):
    corpora = write_tiny_corpus(tmp_path / "corpora")
    en = (corpora / "tiny" / "train.en").read_bytes().split(b"\n")
    en[2] = b"bad \xff byte"  # line 3
    (corpora / "tiny" / "train.en").write_bytes(b"\n".join(en))
    with pytest.raises(BadLineError, match=r"train\.en line 3: invalid UTF-8"):
        prepare_dataset(data_cfg(corpora), tmp_path / "out")
    dataset_dir = prepare_dataset(data_cfg(corpora, on_bad_line="skip"), tmp_path / "out")
    train = read_manifest(dataset_dir)["splits"]["train"]
    assert train["clean"]["removed"] == {"invalid_utf8": 1, "drop_empty": 1, "max_ratio": 1}
    assert train["pairs"] == 199


def test_tampered_shard_names_the_shard_file(prepared, tmp_path):
    copy = shutil.copytree(prepared, tmp_path / prepared.name)
    shard = copy / "train" / "shard-00001.src.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardChecksumError, match=rf"shard file {shard} does not match the sha256"):
        ShardedPairs(copy, "train")
    with pytest.raises(ShardChecksumError, match=str(shard)):
        dataset_stats(copy)


def test_other_sentencepiece_model_names_both_sha256s(prepared, tmp_path):
    copy = shutil.copytree(prepared, tmp_path / prepared.name)
    other = train_sentencepiece(
        [de for _, de in tiny_corpus.train if de], tmp_path / "other", vocab_size=60, sample_lines=1000
    )
    shutil.copy(other, copy / "spm.model")
    manifest = read_manifest(copy)
    with pytest.raises(SpmModelMismatchError) as err:
        verify_spm_model(copy, manifest)
    message = str(err.value)
    assert manifest["spm_model"]["sha256"] in message and str(copy / "spm.model") in message
    assert str(copy / "manifest.json") in message
    assert hashlib.sha256((copy / "spm.model").read_bytes()).hexdigest() in message


def test_too_large_vocabulary_names_the_key(tmp_path):
    with pytest.raises(VocabSizeError, match=r"model\.vocab_size=5000 .*at most \d+.*lower model\.vocab_size"):
        train_sentencepiece(["a small text", "ein kleiner Text"] * 5, tmp_path / "spm", 5000, sample_lines=1000)


def test_cli_prepare_is_idempotent_and_prints_stats(tmp_path, monkeypatch, capsys, corpora_dir):
    from pipeline.cli import main

    monkeypatch.setenv("AIAYN_OUTPUT_DIR", str(tmp_path))
    train_lines = {
        lang: gzip.open(corpora_dir / "multi30k" / f"val.{lang}.gz", "rt").read().count("\n")
        for lang in "en de".split()
    }
    main(["prepare", "data=tiny"])
    first = capsys.readouterr().out.strip().splitlines()[-1]
    assert first.startswith(str(tmp_path / "data" / "tiny-"))
    main(["prepare", "data=tiny"])
    assert capsys.readouterr().out.strip() == f"already prepared: {first}"
    main(["data", "stats", "data=tiny"])
    out = capsys.readouterr().out
    pairs = read_manifest(Path(first))["splits"]["train"]["pairs"]
    assert train_lines["en"] == train_lines["de"] and f"train: {pairs:,} pairs of {train_lines['en']:,} lines" in out
    with pytest.raises(SystemExit) as exit_:  # a data error: one line, exit code 1
        main(["prepare", "data=tiny", "data.splits.train.src=multi30k/missing.en"])
    assert exit_.value.code == 1
    assert "aiayn prepare: corpus file not found:" in capsys.readouterr().err


def test_sampled_rows_are_the_rows_at_those_indices(tmp_path, monkeypatch):
    """ParallelCorpus.batches_at (the BPE sample) reads the rows at the given indices, across record batches and
    output batches of any size, the same as indexing the table."""
    import data.sources

    monkeypatch.setattr(data.sources, "ARROW_BATCH_ROWS", 7)  # several record batches in the Arrow file
    src = write(tmp_path / "s.txt", "".join(f"source {i}\n" for i in range(50)).encode())
    tgt = write(tmp_path / "t.txt", "".join(f"target {i}\n" for i in range(50)).encode())
    train = corpus(tmp_path, {"src": str(src), "tgt": str(tgt)})
    indices = [0, 3, 6, 7, 20, 21, 22, 48, 49]
    for batch_size in (1, 4, 100):
        batches = list(train.batches_at(indices, batch_size))
        got = [pair for sources, targets, _ in batches for pair in zip(sources, targets, strict=True)]
        assert all(len(sources) <= batch_size for sources, _, _ in batches)
        assert got == [(f"source {i}", f"target {i}") for i in indices]
    assert list(train.batches_at([])) == []


@pytest.mark.parametrize("batch_rows", [1, 2, 3, 50])
def test_line_reader_batches_read_every_line_as_one_at_a_time_would(tmp_path, monkeypatch, batch_rows):
    """data.sources.LineReader's batched reading (fast path, and line by line for a batch with a problem) against
    the file's bytes split on b"\\n" by hand, with lines over a (shrunk) size limit, CRLF, bad UTF-8, no final
    newline, and batch boundaries falling anywhere."""
    import data.sources
    from data.sources import read_lines

    monkeypatch.setattr(data.sources, "MAX_LINE_BYTES", 16)
    monkeypatch.setattr(data.sources, "ARROW_BATCH_ROWS", batch_rows)
    lines = [b"plain", b"crlf\r", b"", b"x" * 40, b"ok", b"bad \xff utf8", b"a\rb", b"y" * 17, b"z" * 16, b"last"]
    path = write(tmp_path / "f.txt", b"\n".join(lines))  # no final newline
    expected = []
    for number, raw in enumerate(lines, 1):
        crlf = raw.endswith(b"\r")
        body = raw[:-1] if crlf else raw
        if len(raw) > 16:  # over the limit without its newline ("z" * 16 + newline is not)
            expected.append((number, "", "line_too_long", False))
        elif body == b"bad \xff utf8":
            expected.append((number, "", "invalid_utf8", crlf))
        else:
            expected.append((number, body.decode(), None, crlf))
    got = [(n, text, issue, crlf) for n, text, issue, where, crlf in read_lines(path)]
    assert got == expected
