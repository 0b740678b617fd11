"""Preparing a small real corpus (300 Multi30k pairs): BPE, shards, manifest, and the errors a user can hit.

Every value is checked against an independent reference: the raw text read here with gzip, hashlib over the
files, Python's own NFKC normalisation, or sentencepiece's output.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import unicodedata
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf
from tiny_corpus import tiny_data_cfg

from data import (
    CorpusFileNotFoundError,
    ShardChecksumError,
    ShardedPairs,
    TokenBatchSampler,
    Tokenizer,
    TranslationDataModule,
    collate_pairs,
    dataset_dir_for,
    prepare_dataset,
    read_manifest,
    train_sentencepiece,
)

CORPORA = Path(os.environ.get("CORPORA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
N_TRAIN, N_VALID, N_TEST = 300, 40, 30
MAX_LEN = 60  # with a 200-token vocabulary this drops ~5% of the 300 training pairs


def real_lines(name: str, n: int) -> list[str]:
    path = CORPORA / "multi30k" / f"{name}.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: set CORPORA_DIR to the shared corpora folder")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [next(f).rstrip("\n") for _ in range(n)]


def write_text(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
    return path


def data_cfg(corpora_dir: Path, **overrides):
    """tests/tiny_corpus.py's tiny config over this file's own corpus: gzip train, plain-text valid and test."""
    splits = {
        "train": {"src": "tiny/train.en.gz", "tgt": "tiny/train.de.gz"},  # gzip
        "valid": {"src": "tiny/val.en", "tgt": "tiny/val.de"},  # plain text
        "test": {"src": "tiny/test.en", "tgt": "tiny/test.de"},
    }
    # shard_lines 64 (the default there): several shards, so indexing across shard boundaries is exercised
    defaults = {"splits": splits, "vocab_size": 200, "max_len": MAX_LEN}
    return OmegaConf.create(tiny_data_cfg(corpora_dir, **{**defaults, **overrides}))


@pytest.fixture(scope="module")
def raw() -> dict[str, list[str]]:
    return {
        "train.en": real_lines("train.en", N_TRAIN),
        "train.de": real_lines("train.de", N_TRAIN),
        "val.en": real_lines("val.en", N_VALID),
        "val.de": real_lines("val.de", N_VALID),
        "test.en": real_lines("test_2016_flickr.en", N_TEST),
        "test.de": real_lines("test_2016_flickr.de", N_TEST),
    }


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, raw) -> Path:
    root = tmp_path_factory.mktemp("corpora")
    for name, lines in raw.items():
        write_text(root / "tiny" / (name + (".gz" if name.startswith("train") else "")), lines)
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, corpora) -> tuple[Path, Path]:
    output_dir = tmp_path_factory.mktemp("outputs")
    return prepare_dataset(data_cfg(corpora), output_dir), output_dir


def sp_text(text: str) -> str:
    """What a sentencepiece round trip should give, computed without sentencepiece: NFKC, single spaces."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


# -- the prepared folder -----------------------------------------------------------------------------------
def test_train_pairs_round_trip_and_long_pairs_are_dropped(prepared, raw):
    dataset_dir, _ = prepared
    tok = Tokenizer(dataset_dir / "spm.model")
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 3, 200)
    # the pairs that should survive: both sides at most MAX_LEN tokens (sentencepiece as the reference)
    src_ids, tgt_ids = tok.encode(raw["train.en"]), tok.encode(raw["train.de"])
    kept = [i for i in range(N_TRAIN) if len(src_ids[i]) <= MAX_LEN and len(tgt_ids[i]) <= MAX_LEN]
    assert 0 < len(kept) < N_TRAIN

    train = ShardedPairs(dataset_dir, "train")
    assert len(train) == len(kept)
    for j, i in enumerate(kept):
        src, tgt = train[j]
        assert src.tolist() == src_ids[i] and tgt.tolist() == tgt_ids[i]
        assert tok.decode([src, tgt]) == [sp_text(raw["train.en"][i]), sp_text(raw["train.de"][i])]
        assert (train.src_lengths[j], train.tgt_lengths[j]) == (len(src_ids[i]), len(tgt_ids[i]))

    split = read_manifest(dataset_dir)["splits"]["train"]
    assert (split["lines"], split["pairs"], split["dropped_too_long"]) == (N_TRAIN, len(kept), N_TRAIN - len(kept))


def test_valid_and_test_keep_every_line_in_order(prepared, raw):
    dataset_dir, _ = prepared
    tok = Tokenizer(dataset_dir / "spm.model")
    for split, name, n in (("valid", "val", N_VALID), ("test", "test", N_TEST)):
        pairs = ShardedPairs(dataset_dir, split)
        assert len(pairs) == n
        expected_src, expected_tgt = tok.encode(raw[f"{name}.en"]), tok.encode(raw[f"{name}.de"])
        assert [pairs[i][0].tolist() for i in range(n)] == expected_src
        assert [pairs[i][1].tolist() for i in range(n)] == expected_tgt


def test_manifest_describes_the_files(prepared, corpora):
    dataset_dir, output_dir = prepared
    manifest = read_manifest(dataset_dir)
    sha = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()  # noqa: E731
    assert dataset_dir.parent == output_dir / "data" and dataset_dir.name == f"tiny-{manifest['fingerprint'][:10]}"
    assert manifest["source"]["files"]["train.src"]["sha256"] == sha(corpora / "tiny" / "train.en.gz")
    assert manifest["source"]["files"]["valid.tgt"]["sha256"] == sha(corpora / "tiny" / "val.de")
    assert manifest["spm_model"]["sha256"] == sha(dataset_dir / "spm.model")
    assert manifest["config"]["max_len"] == MAX_LEN and manifest["token_dtype"] == "uint16"

    shards = manifest["splits"]["train"]["shards"]
    # shard k holds what was kept of input lines [64k, 64k + 64)
    assert [s["lines"] for s in shards] == [[0, 64], [64, 128], [128, 192], [192, 256], [256, N_TRAIN]]
    assert all(s["pairs"] == s["lines"][1] - s["lines"][0] - s["dropped_too_long"] for s in shards)
    assert sum(s["pairs"] for s in shards) == manifest["splits"]["train"]["pairs"]
    train = ShardedPairs(dataset_dir, "train")
    assert sum(s["src_tokens"] for s in shards) == train.src_lengths.sum()
    assert sum(s["tgt_tokens"] for s in shards) == train.tgt_lengths.sum()
    for shard in shards:
        for entry in shard["files"].values():
            assert entry["sha256"] == sha(dataset_dir / entry["file"])
        tokens = np.load(dataset_dir / shard["files"]["src"]["file"], mmap_mode="r")
        assert tokens.dtype == np.uint16 and len(tokens) == shard["src_tokens"]
    # nothing was written outside the output folder's cache
    assert (output_dir / ".cache" / "huggingface" / "datasets").is_dir()


def test_second_prepare_does_nothing(prepared, corpora, caplog):
    dataset_dir, output_dir = prepared
    before = (dataset_dir / "manifest.json").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="data.prepare"):
        assert prepare_dataset(data_cfg(corpora), output_dir) == dataset_dir
    assert f"already prepared: {dataset_dir}" in caplog.text
    assert (dataset_dir / "manifest.json").stat().st_mtime_ns == before
    # a setting that changes the content gets its own folder
    assert dataset_dir_for(data_cfg(corpora, max_len=20), output_dir) != dataset_dir
    assert dataset_dir_for(data_cfg(corpora, max_tokens=9999), output_dir) == dataset_dir  # batching only


# -- errors a user can hit ---------------------------------------------------------------------------------
def test_tampered_shard_is_named(prepared, tmp_path):
    dataset_dir, _ = prepared
    copy = tmp_path / dataset_dir.name
    shutil.copytree(dataset_dir, copy)
    shard = copy / "train" / "shard-00001.tgt.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # one token id changed; the file still loads as a valid array
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardChecksumError, match=str(shard)):
        ShardedPairs(copy, "train")
    ShardedPairs(copy, "valid")  # the other splits are untouched


def test_mismatched_line_counts_name_both_files(tmp_path, raw):
    corpora = tmp_path / "corpora"
    write_text(corpora / "tiny" / "train.en.gz", raw["train.en"][:10])
    write_text(corpora / "tiny" / "train.de.gz", raw["train.de"][:9])
    cfg = data_cfg(corpora, splits={"train": {"src": "tiny/train.en.gz", "tgt": "tiny/train.de.gz"}})
    with pytest.raises(ValueError) as err:
        prepare_dataset(cfg, tmp_path / "out")
    message = str(err.value)
    assert str(corpora / "tiny" / "train.en.gz") in message and "10 lines" in message
    assert str(corpora / "tiny" / "train.de.gz") in message and "has 9" in message


def test_missing_file_names_path_and_how_to_fix(tmp_path):
    cfg = data_cfg(tmp_path / "nowhere", splits={"train": {"src": "x/train.en", "tgt": "x/train.de"}})
    with pytest.raises(CorpusFileNotFoundError) as err:
        prepare_dataset(cfg, tmp_path / "out")
    message = str(err.value)
    assert str(tmp_path / "nowhere" / "x" / "train.en") in message
    assert str(tmp_path / "nowhere") in message and "CORPORA_DIR" in message and "data.corpora_dir" in message
    assert isinstance(err.value, FileNotFoundError)


def test_too_large_vocabulary_names_the_key(tmp_path, raw):
    with pytest.raises(ValueError, match=r"model\.vocab_size=5000 .*at most \d+"):
        train_sentencepiece(raw["train.en"][:30], tmp_path / "spm", vocab_size=5000, sample_lines=1000)


def test_train_sentencepiece_reads_files(tmp_path, corpora, raw):
    files = [corpora / "tiny" / "train.en.gz", corpora / "tiny" / "val.de"]
    model = train_sentencepiece(files, tmp_path / "spm", vocab_size=150, sample_lines=1000)
    tok = Tokenizer(model)
    assert tok.vocab_size == 150 and model == tmp_path / "spm.model"
    assert tok.decode(tok.encode(raw["val.de"][:5])) == [sp_text(s) for s in raw["val.de"][:5]]
    # decode stops at the first eos and ignores pad/bos, as a model's output rows need
    ids = tok.encode(["a dog"])[0]
    assert tok.decode([[tok.bos_id, *ids, tok.eos_id, *ids, tok.pad_id]]) == ["a dog"]
    assert tok.sha256 == hashlib.sha256(model.read_bytes()).hexdigest()


# -- the LightningDataModule -------------------------------------------------------------------------------
def signature(batch: dict) -> tuple:
    """Identifies a collated batch: its shape and token sums."""
    return tuple(batch["src"].shape), int(batch["src"].sum()), int(batch["tgt_out"].sum())


def expected_epoch(dataset_dir: Path, epoch: int, seed: int, max_tokens: int = 512) -> list[tuple]:
    """The epoch's batches rebuilt directly from the sampler and collate_pairs, without the datamodule."""
    train = ShardedPairs(dataset_dir, "train")
    sampler = TokenBatchSampler(train.src_lengths, train.tgt_lengths, max_tokens=max_tokens, seed=seed)
    sampler.set_epoch(epoch)
    return [signature(collate_pairs([train[i] for i in batch], 0, 2, 3)) for batch in sampler]


def test_datamodule_serves_every_pair_and_raw_examples(prepared, corpora, raw):
    dataset_dir, output_dir = prepared
    dm = TranslationDataModule(data_cfg(corpora), output_dir, seed=3)
    assert dm.dataset_dir == dataset_dir
    dm.prepare_data()  # already prepared: a no-op
    dm.setup("fit")
    assert dm.tokenizer.eos_id == 3
    assert dm.valid_examples(3) == list(zip(raw["val.en"][:3], raw["val.de"][:3], strict=True))

    train = dm.splits["train"]
    batches = list(dm.train_dataloader())
    assert [signature(b) for b in batches] == expected_epoch(dataset_dir, 0, seed=3)
    assert sum(int(b["n_tgt_tokens"]) for b in batches) == train.tgt_lengths.sum() + len(train)  # + one eos each
    valid = list(dm.val_dataloader())
    assert sum(b["src"].shape[0] for b in valid) == N_VALID
    assert all(b["src"].numel() <= 512 or b["src"].shape[0] == 1 for b in batches + valid)


def test_train_loader_state_resumes_mid_epoch(prepared, corpora):
    _, output_dir = prepared
    first = TranslationDataModule(data_cfg(corpora), output_dir, seed=3)
    first.setup("fit")
    loader = first.train_dataloader()
    batches = iter(loader)
    for _ in range(4):
        next(batches)
    state = loader.state_dict()
    assert state == {"epoch": 0, "batches_done": 4}
    rest = [signature(b) for b in batches]

    resumed = TranslationDataModule(data_cfg(corpora), output_dir, seed=3)
    resumed.setup("fit")
    loader = resumed.train_dataloader()
    loader.load_state_dict(state)  # what Lightning does with a new loader on resume, before iterating it
    assert [signature(b) for b in loader] == rest


class Recorder(L.LightningModule):
    """A model that learns nothing and records which batch it was given at every step."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[int, tuple]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, signature(batch)))
        return self.w * batch["src"].float().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit(corpora: Path, output_dir: Path, ckpt_dir: Path, ckpt_path: Path | None = None) -> list[tuple]:
    """Two epochs, a checkpoint every 3 steps; the batches trained on, as (epoch, signature)."""
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        reload_dataloaders_every_n_epochs=1,  # what TranslationDataModule asks for
        use_distributed_sampler=False,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=3, save_top_k=-1)],
    )
    module = Recorder()
    # One DataLoader worker: it prefetches batches, so the sampler runs ahead of the steps actually trained
    # (the resume position must come from Lightning's step count), and batches must not depend on workers.
    datamodule = TranslationDataModule(data_cfg(corpora, num_workers=1), output_dir, seed=3)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return module.seen


@pytest.fixture(scope="module")
def uninterrupted(prepared, corpora, tmp_path_factory) -> tuple[list[tuple], Path]:
    """(batches trained, checkpoint folder) of a fit that ran through."""
    ckpt_dir = tmp_path_factory.mktemp("uninterrupted")
    return fit(corpora, prepared[1], ckpt_dir), ckpt_dir


def _resume_warnings(records: list[warnings.WarningMessage]) -> list[str]:
    """Lightning's warnings about a resume that cannot continue exactly, e.g. "... your dataloader is not
    resumable. This can cause unreliable results if further training is done. ..."""
    messages = [str(r.message) for r in records]
    return [m for m in messages if "resumable" in m or "reproducib" in m or "unreliable results" in m]


def test_lightning_trains_each_epoch_and_resumes_mid_epoch(prepared, corpora, uninterrupted, tmp_path):
    dataset_dir, output_dir = prepared
    epoch0, epoch1 = expected_epoch(dataset_dir, 0, seed=3), expected_epoch(dataset_dir, 1, seed=3)
    assert epoch0 != epoch1

    seen, ckpt_dir = uninterrupted
    assert [s for e, s in seen if e == 0] == epoch0
    assert [s for e, s in seen if e == 1] == epoch1
    # Lightning keeps the training loader's own state (TrainLoader), the datamodule none
    checkpoint = torch.load(ckpt_dir / "step=3.ckpt", weights_only=True)
    assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 0, "batches_done": 3}]
    assert "TranslationDataModule" not in checkpoint
    # restart from the checkpoint saved after step 3 of epoch 0: the rest of epoch 0, then epoch 1, and no
    # warning that the resume is not exact
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        resumed = fit(corpora, output_dir, tmp_path / "again", ckpt_path=ckpt_dir / "step=3.ckpt")
    assert [s for _, s in resumed] == epoch0[3:] + epoch1
    assert not _resume_warnings(records)


def test_a_checkpoint_from_before_the_stateful_loader_resumes_mid_epoch(prepared, corpora, uninterrupted, tmp_path):
    """Checkpoints written before TrainLoader held the sampler position as the datamodule's state."""
    dataset_dir, output_dir = prepared
    checkpoint = torch.load(uninterrupted[1] / "step=3.ckpt", weights_only=True)
    (position,) = checkpoint["loops"]["fit_loop"]["state_dict"].pop("combined_loader")
    checkpoint["TranslationDataModule"] = {"train_sampler": position}
    torch.save(checkpoint, tmp_path / "old.ckpt")
    resumed = fit(corpora, output_dir, tmp_path / "again", ckpt_path=tmp_path / "old.ckpt")
    epoch0, epoch1 = expected_epoch(dataset_dir, 0, seed=3), expected_epoch(dataset_dir, 1, seed=3)
    assert [s for _, s in resumed] == epoch0[3:] + epoch1


# -- an interrupted preparation resumes ----------------------------------------------------------------------
def test_killed_prepare_resumes_from_the_finished_shards(tmp_path, raw, monkeypatch):
    import data.prepare

    # 320 training lines whose last 20 repeat the first 20: de-duplication must remember shards it did not redo
    corpora = tmp_path / "corpora"
    write_text(corpora / "tiny" / "train.en.gz", raw["train.en"] + raw["train.en"][:20])
    write_text(corpora / "tiny" / "train.de.gz", raw["train.de"] + raw["train.de"][:20])
    for name in ("val.en", "val.de", "test.en", "test.de"):
        write_text(corpora / "tiny" / name, raw[name])
    cfg = data_cfg(corpora, clean={"dedup": True})
    straight = read_manifest(prepare_dataset(cfg, tmp_path / "straight"))
    assert straight["splits"]["train"]["clean"]["removed"]["dedup"] == 20

    write_shard, written = data.prepare.write_shard, []

    def killed_at_train_shard_2(dataset_dir, split, index, *args, **kwargs):
        if (split, index) == ("train", 2):
            # the kill lands while shard 2 is being written: one array on disk, a temporary file, no record
            (dataset_dir / "train" / "shard-00002.src.npy").write_bytes(b"\x93NUMPY half")
            (dataset_dir / "train" / ".shard-00002.tgt.npy.tmp-1").write_bytes(b"\x93NUMPY")
            raise KeyboardInterrupt
        written.append((split, index))
        return write_shard(dataset_dir, split, index, *args, **kwargs)

    monkeypatch.setattr(data.prepare, "write_shard", killed_at_train_shard_2)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(cfg, tmp_path / "resumed")
    assert written == [("train", 0), ("train", 1)]
    dataset_dir = dataset_dir_for(cfg, tmp_path / "resumed")
    assert not (dataset_dir / "manifest.json").exists()
    with pytest.raises(Exception, match="not prepared"):
        ShardedPairs(dataset_dir, "train")

    monkeypatch.setattr(data.prepare, "write_shard", write_shard)
    spm_before = (dataset_dir / "spm.model").stat().st_mtime_ns
    shard_before = (dataset_dir / "train" / "shard-00001.json").stat().st_mtime_ns
    assert prepare_dataset(cfg, tmp_path / "resumed") == dataset_dir
    assert (dataset_dir / "spm.model").stat().st_mtime_ns == spm_before  # BPE not trained again
    assert (dataset_dir / "train" / "shard-00001.json").stat().st_mtime_ns == shard_before  # shards 0-1 kept
    resumed = read_manifest(dataset_dir)
    # the same dataset as the run that was never interrupted, down to every shard's sha256
    # (spm.model's bytes include the path it was trained under, so the vocabularies are compared instead)
    straight_dir = dataset_dir_for(cfg, tmp_path / "straight")
    assert (dataset_dir / "spm.vocab").read_bytes() == (straight_dir / "spm.vocab").read_bytes()
    for manifest in (resumed, straight):
        for split in manifest["splits"].values():
            for shard in split["shards"]:
                assert shard.pop("spm_sha256") == manifest["spm_model"]["sha256"]
    assert resumed["splits"] == straight["splits"]
    assert [s["lines"] for s in resumed["splits"]["train"]["shards"]] == [
        [0, 64],
        [64, 128],
        [128, 192],
        [192, 256],
        [256, 320],
    ]


# -- parallel encoding ---------------------------------------------------------------------------------------
def test_two_workers_write_the_same_shards_as_one_and_resume(tmp_path, raw):
    # 283 training lines, 5 shards of 64: lines 240-282 repeat earlier pairs, from other shards (20-59, 5 twice),
    # from the same shard (200), and a pair that is too long: de-duplication must see across workers' shards.
    en, de = raw["train.en"][:240], raw["train.de"][:240]
    longest = max(range(240), key=lambda i: len(en[i]) + len(de[i]))
    again = [200, *range(20, 60), longest, 5, 5]
    corpora = tmp_path / "corpora"
    write_text(corpora / "tiny" / "train.en.gz", en + [en[i] for i in again])
    write_text(corpora / "tiny" / "train.de.gz", de + [de[i] for i in again])
    for name in ("val.en", "val.de", "test.en", "test.de"):
        write_text(corpora / "tiny" / name, raw[name])
    with pytest.raises(KeyError, match="data.num_prepare_workers=0"):
        prepare_dataset(data_cfg(corpora, num_prepare_workers=0), tmp_path / "bad")

    # Both runs prepare the same folder (moved away in between): spm.model's bytes include the path it was
    # trained under, so the whole folders can then be compared byte for byte.
    one = prepare_dataset(data_cfg(corpora, clean={"dedup": True}), tmp_path / "out")
    name, one = one.name, one.rename(tmp_path / "one")
    cfg = data_cfg(corpora, clean={"dedup": True}, num_prepare_workers=2)
    two = prepare_dataset(cfg, tmp_path / "out")  # the number of workers is not part of the folder's identity
    assert two.name == name

    # the reference, without our code: the first copy of each pair is kept unless a side is over MAX_LEN tokens
    tok = Tokenizer(one / "spm.model")
    pairs = list(zip(en + [en[i] for i in again], de + [de[i] for i in again], strict=True))
    first = list(dict.fromkeys(pairs))
    ids = list(zip(tok.encode(p[0] for p in first), tok.encode(p[1] for p in first), strict=True))
    expected = [(s, t) for s, t in ids if len(s) <= MAX_LEN and len(t) <= MAX_LEN]
    assert len(pairs) - len(first) == len(again)  # every repeat is a duplicate
    assert any(len(s) > MAX_LEN or len(t) > MAX_LEN for s, t in ids)

    def sha(dataset_dir: Path) -> dict[str, str]:
        files = sorted(p for p in dataset_dir.rglob("*") if p.suffix in (".npy", ".model", ".vocab"))
        return {str(p.relative_to(dataset_dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}

    manifests = [read_manifest(d) for d in (one, two)]
    for dataset_dir, manifest in zip((one, two), manifests, strict=True):
        train = ShardedPairs(dataset_dir, "train")
        assert [(train[i][0].tolist(), train[i][1].tolist()) for i in range(len(train))] == expected
        split = manifest["splits"]["train"]
        assert split["clean"]["removed"] == {"dedup": len(again)}
        assert split["dropped_too_long"] == len(first) - len(expected)
        assert not (dataset_dir / ".pending").exists()  # candidate shards are gone
    assert sha(one) == sha(two) and len(sha(one)) == 5 * 4 + 2 * 3 + 2  # train shards carry their dedup keys
    assert manifests[0]["splits"] == manifests[1]["splits"]  # pair and token counts, cleaning counts, sha256s

    # a kill of the 2-worker run left shards 2 and 4 unfinished (no record): the next run redoes only those,
    # with the de-duplication memory of shards 0, 1 and 3 restored from their keys
    for name in ("manifest.json", "train/shard-00002.json", "train/shard-00004.json"):
        (two / name).unlink()
    kept = (two / "train" / "shard-00003.json").stat().st_mtime_ns
    assert prepare_dataset(cfg, tmp_path / "out") == two
    assert (two / "train" / "shard-00003.json").stat().st_mtime_ns == kept
    assert read_manifest(two)["splits"] == manifests[1]["splits"] and sha(two) == sha(one)
