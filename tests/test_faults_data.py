"""Issue 20, the data side: faults and bad input met by `aiayn prepare` and by whatever reads a prepared folder.

Point 7 (a corpus edited in place, same size and mtime: the Arrow cache is keyed by content), point 8 (a hand-edited
manifest, a corrupted shard in a complete folder), point 12 (a killed prepare: its workers end with it, its temporary
files are removed by the next run, which says `resuming: ...`), and the one-line errors, as a table. Inputs are the
tiny made-up corpus (tests/tiny_corpus.py): a 100-token BPE model on 242 pairs, about a second per preparation.
"""

from __future__ import annotations

import errno
import gzip
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from omegaconf import OmegaConf
from tiny_corpus import tiny_data_cfg, write_tiny_corpus

import data.atomic
import data.shards
from data.errors import (
    CorruptFileError,
    DataConfigError,
    DataError,
    DiskFullError,
    ManifestMismatchError,
    NoTrainingTextError,
    OutputNotWritableError,
)
from data.manifest import read_manifest
from data.prepare import dataset_dir_for, prepare_dataset
from data.shards import ShardChecksumError, ShardedPairs
from data.sources import arrow_cache_dir
from data.tokenizer import Tokenizer

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def data_cfg(corpora_dir: Path, **overrides) -> dict:
    return tiny_data_cfg(corpora_dir, **overrides)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared folder; tests that change it work on a copy."""
    corpora = write_tiny_corpus(tmp_path_factory.mktemp("corpora"))
    return prepare_dataset(data_cfg(corpora), tmp_path_factory.mktemp("out"))


def cli_cfg(corpora: Path, out: Path, **overrides):
    """What pipeline/prepare.py's main gets from `aiayn prepare`: the data config and the output folder."""
    return OmegaConf.create({"data": data_cfg(corpora, **overrides), "paths": {"output_dir": str(out)}})


def dead_pid() -> int:
    """The id of a process that has ended (and was reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# -- point 7: the Arrow cache is keyed by the corpus's content -------------------------------------------------
def test_a_corpus_edited_in_place_with_its_size_and_mtime_is_read_again(tmp_path: Path) -> None:
    corpora = write_tiny_corpus(tmp_path / "corpora")
    cfg, out = data_cfg(corpora), tmp_path / "out"
    before = prepare_dataset(cfg, out)

    train_en = corpora / "tiny" / "train.en"
    stat = train_en.stat()
    lines = train_en.read_text(encoding="utf-8").split("\n")
    lines[0] = lines[0][::-1]  # the same characters, so the same size
    train_en.write_text("\n".join(lines), encoding="utf-8")
    os.utime(train_en, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the mtime put back, as `touch -r` or rsync do
    assert (train_en.stat().st_size, train_en.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)

    after = prepare_dataset(cfg, out)
    assert after != before  # the manifest has the new file's sha256 ...
    tokenizer = Tokenizer(after / "spm.model")
    src, _ = ShardedPairs(after, "train")[0]
    assert tokenizer.decode([src]) == [lines[0]]  # ... and the shards hold the new text, not the cached old one

    from data.datamodule import TranslationDataModule  # a reader: the raw text it shows comes from the cache too

    datamodule = TranslationDataModule(cfg, out)
    datamodule.setup()
    assert datamodule.dataset_dir == after
    assert datamodule.raw_pairs("train", 1)[0][0] == lines[0]


# -- point 8: what is cheap to verify is verified -------------------------------------------------------------
def _edit_manifest(folder: Path, edit: Callable[[dict], None]) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _shard_pairs(delta: int) -> Callable[[dict], None]:
    def edit(manifest: dict) -> None:  # a shard's count and the split's total, consistently
        manifest["splits"]["train"]["shards"][1]["pairs"] += delta
        manifest["splits"]["train"]["pairs"] += delta

    return edit


def _split_pairs(manifest: dict) -> None:
    manifest["splits"]["train"]["pairs"] += 1


def _shard_tokens(manifest: dict) -> None:
    manifest["splits"]["valid"]["shards"][0]["tgt_tokens"] -= 1
    manifest["splits"]["valid"]["tgt_tokens"] -= 1


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (_shard_pairs(+1), r"says train/shard-00001 holds \d+ pairs, but .*train/shard-00001\.idx\.npy holds \d+"),
        (_shard_pairs(-1), r"says train/shard-00001 holds \d+ pairs, but .*train/shard-00001\.idx\.npy holds \d+"),
        (_split_pairs, r"says split 'train' has \d+ pairs, but its shards add up to \d+"),
        (_shard_tokens, r"says valid/shard-00000 holds \d+ target tokens, but .*valid/shard-00000\.tgt\.npy holds"),
    ],
    ids=["shard-pairs+1", "shard-pairs-1", "split-pairs+1", "shard-tokens-1"],
)
def test_a_hand_edited_manifest_is_refused_when_the_data_is_loaded(prepared: Path, tmp_path: Path, edit, expected):
    """`pairs` +-1 in the manifest trained silently, then failed with an IndexError an epoch later."""
    copy = shutil.copytree(prepared, tmp_path / prepared.name)
    _edit_manifest(copy, edit)
    with pytest.raises(ManifestMismatchError, match=expected) as err:
        for split in ("train", "valid"):
            ShardedPairs(copy, split)
    message = str(err.value)
    assert "\n" not in message and str(copy / "manifest.json") in message
    assert f"delete {copy} and run `aiayn prepare` again" in message


def test_prepare_on_a_complete_folder_checks_its_shards(prepared: Path, tmp_path: Path, capsys) -> None:
    """A corrupted shard in a complete folder: `aiayn prepare` named it instead of saying "already prepared"."""
    from pipeline.prepare import main

    corpora, out = Path(read_manifest(prepared)["config"]["corpora_dir"]), tmp_path / "out"
    cfg = cli_cfg(corpora, out)
    folder = dataset_dir_for(cfg.data, out)
    shutil.copytree(prepared, folder)
    main(cfg)
    assert capsys.readouterr().out.strip() == f"already prepared: {folder}"

    shard = folder / "valid" / "shard-00000.tgt.npy"
    flipped = bytearray(shard.read_bytes())
    flipped[-1] ^= 0xFF  # same size: only the checksum can tell
    shard.write_bytes(bytes(flipped))
    with pytest.raises(ShardChecksumError, match=rf"shard file {shard} does not match the sha256") as err:
        main(cfg)
    assert f"delete {folder} and prepare it again" in str(err.value)
    assert "already prepared" not in capsys.readouterr().out


# -- point 12: a killed prepare --------------------------------------------------------------------------------
KILLED_PREPARE = """
import sys, time
sys.path.insert(0, {root!r})
from data.pool import ShardPool

if __name__ == "__main__":
    pool = ShardPool(2)
    executor = pool._pool()
    futures = [executor.submit(time.sleep, 300) for _ in range(2)]  # two workers busy, as with shards to encode
    while len(executor._processes) < 2:
        time.sleep(0.05)
    time.sleep(1)  # the workers are past their initializer
    print("ready", flush=True)
    time.sleep(300)
"""


def test_the_workers_of_a_killed_prepare_end_with_it(tmp_path: Path) -> None:
    """kill -9 of `aiayn prepare` left the forkserver, two workers and the resource tracker running, still writing
    shards. Its workers now end with it, and the forkserver and resource tracker with them."""
    script = tmp_path / "killed_prepare.py"
    script.write_text(KILLED_PREPARE.format(root=str(PROJECT_ROOT)))
    preparing = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    children: list[psutil.Process] = []
    try:
        assert preparing.stdout.readline().strip() == "ready"
        children = psutil.Process(preparing.pid).children(recursive=True)
        assert len(children) >= 4  # resource tracker, forkserver, two workers
        preparing.send_signal(signal.SIGKILL)
        preparing.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (alive := [c for c in children if _running(c)]):
            time.sleep(0.2)
        assert not [c for c in children if _running(c)], [" ".join(c.cmdline())[:120] for c in alive]
    finally:
        for child in children:  # what this test started, if it failed
            if _running(child):
                child.kill()
        if preparing.poll() is None:
            preparing.kill()
            preparing.wait()


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_the_next_prepare_removes_a_killed_runs_temp_files_and_says_resuming(tmp_path: Path, monkeypatch, capsys):
    """A killed cache write left a 165 MB .arrow.tmp-<pid> that nothing removed; the README's `resuming: ...` line
    never appeared."""
    import data.prepare
    from pipeline.prepare import main

    corpora, out = write_tiny_corpus(tmp_path / "corpora"), tmp_path / "out"
    cfg = cli_cfg(corpora, out)
    encode_split = data.prepare.encode_split

    def killed_at_valid(corpus, split, *args, **kwargs):
        if split == "valid":
            raise KeyboardInterrupt
        return encode_split(corpus, split, *args, **kwargs)

    monkeypatch.setattr(data.prepare, "encode_split", killed_at_valid)
    with pytest.raises(KeyboardInterrupt):
        main(cfg)
    monkeypatch.setattr(data.prepare, "encode_split", encode_split)
    folder = dataset_dir_for(cfg.data, out)
    assert (folder / "spm.model").is_file() and not (folder / "manifest.json").exists()

    # what a kill -9 leaves: temporary files of processes that no longer run, in the folder and in the Arrow cache
    gone = dead_pid()
    stale = [
        folder / "valid" / f".shard-00000.src.npy.tmp-{gone}",
        folder / "train" / f".shard-00003.idx.npy.tmp-{gone}",
        arrow_cache_dir(out / ".cache" / "huggingface" / "datasets") / f".text_pair_batches-0.arrow.tmp-{gone}",
    ]
    live = folder / f".spm.vocab.tmp-{os.getpid()}"  # a process that runs: its file stays
    for path in [*stale, live]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    hour_ago = time.time() - 3600  # the cache is shared: there a temporary file must also be old to be stale
    os.utime(stale[-1], (hour_ago, hour_ago))

    capsys.readouterr()
    main(cfg)
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] == str(folder) and (folder / "manifest.json").is_file()
    # (train: 202 lines, 4 shards of 64)
    assert printed[0] == (
        f"resuming: {folder}: an interrupted run left the BPE model and 4 finished shard(s), reused where their sha256 "
        "still match"
    )
    assert "resuming: train: 4 of 4 shards are done (checked), encoding the other 0" in printed
    assert [path for path in stale if path.exists()] == []
    assert live.exists()


# -- one-line errors --------------------------------------------------------------------------------------------
def _only_empty_lines(corpora: Path) -> dict:
    (corpora / "tiny" / "train.en").write_text("\n" * 5)
    (corpora / "tiny" / "train.de").write_text(" \n" * 5)
    return data_cfg(corpora)


def _truncated_gzip(corpora: Path) -> dict:
    text = "".join(f"sentence number {i}\n" for i in range(2000)).encode()
    whole = gzip.compress(text)
    (corpora / "tiny" / "train.en.gz").write_bytes(whole[: len(whole) // 2])
    (corpora / "tiny" / "train.de").write_text("x\n" * 2000)
    return data_cfg(corpora, splits={"train": {"src": "tiny/train.en.gz", "tgt": "tiny/train.de"}})


def _lines_in_truncated_gzip(corpora: Path) -> int:
    """How many whole lines the half .gz of _truncated_gzip holds (the right answer is at most this)."""
    return zlib.decompressobj(31).decompress((corpora / "tiny" / "train.en.gz").read_bytes()).count(b"\n")


class _FullDisk(io.FileIO):
    def write(self, b) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def _disk_full_in_the_arrow_cache(corpora: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.setattr(data.atomic, "open", lambda path, mode: _FullDisk(path, "wb"), raising=False)
    return data_cfg(corpora)


def _read_only_output(corpora: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    def refused(path, mode):  # (chmod cannot make a folder read-only for root: the tests may run as root)
        raise PermissionError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(data.atomic, "open", refused, raising=False)
    return data_cfg(corpora)


def _disk_full_in_a_shard(corpora: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    def add(self, src, tgt) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(data.shards.ShardWriter, "add", add)
    return data_cfg(corpora)


ONE_LINE_ERRORS = {
    # case: (the config, from the corpora folder (and monkeypatch), the error's class, a fragment of its message)
    "train of only empty lines": (
        _only_empty_lines,
        NoTrainingTextError,
        r"data\.splits\.train \(.*train\.en, .*train\.de\): no text to train the BPE model on: the 5 pairs read "
        r"of its 5 lines are all empty or removed by cleaning \{'drop_empty': 5\}",
    ),
    "data.max_len=0": (
        lambda c: data_cfg(c, max_len=0),
        DataConfigError,
        r"^data\.max_len=0: out of range; set data\.max_len to a positive integer$",
    ),
    "data.max_len=1 leaves no pair": (
        lambda c: data_cfg(c, max_len=1),
        NoTrainingTextError,
        r"no training pair is left of its 202 lines: 200 longer than data\.max_len=1 tokens, .*raise data\.max_len",
    ),
    "data.shard_lines=0": (
        lambda c: data_cfg(c, shard_lines=0),
        DataConfigError,
        r"^data\.shard_lines=0: out of range; set data\.shard_lines to a positive integer$",
    ),
    "data.src_lang == data.tgt_lang": (
        lambda c: data_cfg(c, tgt_lang="EN"),
        DataConfigError,
        r"^data\.src_lang and data\.tgt_lang are both 'en': a translation needs two languages",
    ),
    "corrupt .gz": (
        _truncated_gzip,
        CorruptFileError,
        r"train\.en\.gz is cut short or corrupt after line (?P<lines>\d+) \(.*\); copy or download the file again",
    ),
    "disk full in the Arrow cache": (
        _disk_full_in_the_arrow_cache,
        DiskFullError,
        r"^no space left on the device to write .*/aiayn_arrow/text_pair_batches-\w+\.arrow \(No space left on "
        r"device; .*\): free some space there, or write to another disk",
    ),
    "disk full in a shard": (
        _disk_full_in_a_shard,
        DiskFullError,
        r"^no space left on the device to write .*/train/shard-00000\.\*\.npy \(No space left on device; .*\): "
        r"free some space there",
    ),
    "read-only output folder": (
        _read_only_output,
        OutputNotWritableError,
        r"^cannot write .*/aiayn_arrow/\.text_pair_batches-\w+\.arrow\.tmp-\d+ \(Read-only file system\): set the "
        r"output folder \(paths\.output_dir or AIAYN_OUTPUT_DIR\) to one this user can write",
    ),
}


@pytest.mark.parametrize("case", ONE_LINE_ERRORS)
def test_one_line_errors(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_cfg, error, expected = ONE_LINE_ERRORS[case]
    corpora = write_tiny_corpus(tmp_path / "corpora")
    takes_monkeypatch = make_cfg.__code__.co_argcount == 2
    cfg = make_cfg(corpora, monkeypatch) if takes_monkeypatch else make_cfg(corpora)
    with pytest.raises(error) as err:
        prepare_dataset(cfg, tmp_path / "out")
    message = str(err.value)
    assert isinstance(err.value, DataError) and "\n" not in message  # pipeline/cli.py prints it as one line
    found = re.search(expected, message)
    assert found, f"{message!r} does not match {expected!r}"
    if "lines" in found.groupdict():  # the real count, not "after line 0"
        assert 0 < int(found["lines"]) <= _lines_in_truncated_gzip(corpora)
    if error is DiskFullError:
        assert err.value.errno == errno.ENOSPC and isinstance(err.value, OSError)
        assert not list((tmp_path / "out").rglob(".*.tmp-*"))  # no half file left behind


def test_spm_model_is_byte_identical_between_two_preparations(tmp_path: Path) -> None:
    """spm.model stored the temporary path it was trained under, so two preparations gave different bytes."""
    corpora = write_tiny_corpus(tmp_path / "corpora")
    first = prepare_dataset(data_cfg(corpora), tmp_path / "one")
    second = prepare_dataset(data_cfg(corpora), tmp_path / "two")
    assert (first / "spm.model").read_bytes() == (second / "spm.model").read_bytes()
    assert (first / "spm.vocab").read_bytes() == (second / "spm.vocab").read_bytes()
    assert read_manifest(first)["spm_model"] == read_manifest(second)["spm_model"]
    assert str(tmp_path).encode() not in (first / "spm.model").read_bytes()
