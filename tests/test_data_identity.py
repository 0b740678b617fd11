"""The dataset's identity is computed when it is prepared: readers find the folder without reading the corpus.

`aiayn prepare` hashes the corpus files and records their stat in the manifest (data/prepare.py). The data module
(training on every rank, evaluate, translate, attention) and `aiayn run`'s "prepared?" test then find the folder
from that record; an edited corpus is still noticed by prepare, by the readers, and by `aiayn data check`.
"""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import data.prepare
from data import TranslationDataModule, read_manifest
from data.errors import DatasetNotPreparedError
from data.prepare import CorpusChangedError, check_corpus, dataset_dir_for, find_dataset_dir, prepare_dataset
from pipeline import cli

N_TRAIN, N_VALID = 300, 30


@pytest.fixture
def corpus(tmp_path: Path, corpora_dir: Path) -> dict:
    """A 300-pair corpus of plain text files (Multi30k's first lines), prepared under tmp_path/out."""
    folder = tmp_path / "corpora" / "small"
    folder.mkdir(parents=True)
    for name, n in (("train", N_TRAIN), ("val", N_VALID)):
        for lang in ("en", "de"):
            with gzip.open(corpora_dir / "multi30k" / f"{name}.{lang}.gz", "rt", encoding="utf-8") as f:
                lines = [next(f) for _ in range(n)]
            (folder / f"{name}.{lang}").write_text("".join(lines), encoding="utf-8")
    cfg = OmegaConf.create(
        {
            "name": "small",
            "corpora_dir": str(folder.parent),
            "src_lang": "en",
            "tgt_lang": "de",
            "splits": {
                "train": {"src": "small/train.en", "tgt": "small/train.de"},
                "valid": {"src": "small/val.en", "tgt": "small/val.de"},
            },
            "vocab_size": 150,
            "spm_sample_lines": 100_000,
            "max_len": 60,
            "max_tokens": 512,
            "shard_lines": 128,
            "num_workers": 0,
            "num_prepare_workers": 1,
        }
    )
    out = tmp_path / "out"
    return {"cfg": cfg, "out": out, "folder": folder, "dataset_dir": prepare_dataset(cfg, out)}


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every corpus file data/prepare.py reads to hash it, in order; this process's earlier hashes forgotten."""
    monkeypatch.setattr(data.prepare, "_SHA256_BY_STAT", {})
    read, real = [], data.prepare.file_sha256

    def counted(path, *args, **kwargs) -> str:
        read.append(Path(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(data.prepare, "file_sha256", counted)
    return read


def edit_in_place(path: Path) -> None:
    """Change one word of the first line, keeping the file (inode), its size and its line count."""
    with open(path, "r+b") as f:
        first = f.read(4)
        f.seek(0)
        f.write(first[::-1])


def test_after_prepare_readers_do_not_hash_the_corpus(corpus: dict, hashes: list[Path]) -> None:
    from pipeline.stages import _prepared

    cfg, out, dataset_dir = corpus["cfg"], corpus["out"], corpus["dataset_dir"]
    assert find_dataset_dir(cfg, out) == dataset_dir
    datamodule = TranslationDataModule(cfg, out)
    datamodule.prepare_data()  # already prepared: Lightning calls it at every `aiayn train`
    datamodule.setup()
    assert datamodule.dataset_dir == dataset_dir and len(datamodule.splits["train"]) > 0
    assert _prepared(OmegaConf.create({"data": cfg, "paths": {"output_dir": str(out)}}), out / "run")
    assert hashes == []
    # `aiayn prepare` itself hashes each file once, though it asks for the folder before preparing it
    assert dataset_dir_for(cfg, out) == dataset_dir and prepare_dataset(cfg, out) == dataset_dir
    assert sorted(hashes) == sorted(corpus["folder"].iterdir())


def test_a_touched_corpus_is_hashed_once_then_found_by_stat_again(corpus: dict, hashes: list[Path]) -> None:
    cfg, out, dataset_dir = corpus["cfg"], corpus["out"], corpus["dataset_dir"]
    train_en = corpus["folder"] / "train.en"
    os.utime(train_en, ns=(train_en.stat().st_atime_ns, train_en.stat().st_mtime_ns + 10**9))  # same bytes
    assert find_dataset_dir(cfg, out) == dataset_dir
    assert train_en in hashes
    recorded = read_manifest(dataset_dir)["lookup"]["corpus_stat"]["train.src"]
    assert recorded["mtime_ns"] == train_en.stat().st_mtime_ns  # the manifest now records the new stat
    hashes.clear()
    assert find_dataset_dir(cfg, out) == dataset_dir and hashes == []


def test_an_edited_corpus_is_noticed_by_prepare_by_readers_and_by_the_check(corpus: dict) -> None:
    cfg, out, dataset_dir = corpus["cfg"], corpus["out"], corpus["dataset_dir"]
    assert check_corpus(cfg, out) == dataset_dir
    train_de = corpus["folder"] / "train.de"
    edit_in_place(train_de)

    with pytest.raises(CorpusChangedError, match=rf"since {dataset_dir} was prepared: {train_de} \(sha256"):
        check_corpus(cfg, out)
    assert find_dataset_dir(cfg, out) != dataset_dir  # a reader looks for the new corpus's folder: not prepared
    with pytest.raises(DatasetNotPreparedError):
        TranslationDataModule(cfg, out).setup()
    prepared_again = prepare_dataset(cfg, out)
    assert prepared_again != dataset_dir and prepared_again.parent == dataset_dir.parent
    assert check_corpus(cfg, out) == find_dataset_dir(cfg, out) == prepared_again


def test_the_check_reads_the_bytes_where_stat_sees_no_change(
    corpus: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A filesystem that keeps no file times (or a tool that puts them back): stat cannot tell, the check can."""
    cfg, out, dataset_dir = corpus["cfg"], corpus["out"], corpus["dataset_dir"]
    recorded = {e["path"]: e for e in read_manifest(dataset_dir)["lookup"]["corpus_stat"].values()}
    real_stat = data.prepare._file_stat
    monkeypatch.setattr(data.prepare, "_file_stat", lambda path: recorded.get(str(path.resolve())) or real_stat(path))
    edit_in_place(corpus["folder"] / "train.en")

    assert find_dataset_dir(cfg, out) == dataset_dir  # what a stat-based lookup must say here
    with pytest.raises(CorpusChangedError, match=str(corpus["folder"] / "train.en")):
        check_corpus(cfg, out)  # though this process hashed the file before, under the same stat
    # once prepared again, two folders claim these stats: readers no longer trust them and hash
    prepared_again = prepare_dataset(cfg, out)
    assert prepared_again != dataset_dir
    assert find_dataset_dir(cfg, out) == prepared_again


def test_data_check_command(tiny: dict, capsys: pytest.CaptureFixture) -> None:
    cli.main(["data", "check", *tiny["overrides"]])
    assert capsys.readouterr().out.strip() == (
        f"unchanged: the corpus files are those {tiny['dataset_dir']} was prepared from"
    )


def test_evaluate_does_not_hash_the_corpus(
    tiny: dict, hand_made_run: dict, hashes: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    shutil.copytree(hand_made_run["run"] / "checkpoints", run / "checkpoints")
    overrides = [*tiny["overrides"], f"run.dir={run}", "evaluate.beam=1", "logger.wandb.enabled=false"]
    cli.main(["evaluate", *overrides])
    assert (run / "eval-test.json").is_file()
    assert hashes == []
