"""A run folder is the model (issue 19, point 1): it keeps its resolved config (written once), the BPE model and the
dataset's identity, so that later commands need no training override and no corpora; overrides that disagree with
the run are refused by name; `aiayn export` writes a folder that `aiayn translate model_dir=` loads with no
Lightning checkpoint and no pickle, translating exactly as the run does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline import cli

SENTENCES = ["A man is riding a bike.", "Two dogs play in the snow.", ""]


@pytest.fixture(scope="module")
def trained(tiny: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`aiayn train` on data=tiny with the tiny model: 3 steps, a checkpoint at the end."""
    root = tmp_path_factory.mktemp("run_folder")
    run = root / "run"
    overrides = [*tiny["overrides"], f"run.dir={run}", "trainer.max_steps=3", "trainer.val_check_interval=3"]
    overrides += ["checkpoint.every_n_train_steps=3", "run.n_samples=0", "run.val_bleu_sentences=0"]
    overrides += ["trainer.enable_progress_bar=false", "logger.wandb.enabled=false"]
    # Three updates from tensor2tensor's start already translate the sentences into words, which the comparisons
    # below need; from fairseq's smaller one (the default) every translation is still empty.
    overrides += ["model.init=xavier"]
    cli.main(["train", *overrides])
    source = root / "source.txt"
    source.write_text("\n".join(SENTENCES) + "\n")
    return {"root": root, "run": run, "overrides": overrides, "source": source}


def _translate(argv: list[str], out: Path, capsys: pytest.CaptureFixture) -> list[str]:
    cli.main(["translate", *argv, f"translate.output={out}", "translate.beam=2"])
    capsys.readouterr()
    return out.read_text().splitlines()


def test_the_run_folder_keeps_its_config_bpe_model_and_dataset_identity(trained: dict) -> None:
    run = trained["run"]
    identity = json.loads((run / "dataset.json").read_text())
    manifest = json.loads((Path(identity["dataset_dir"]) / "manifest.json").read_text())
    assert identity["fingerprint"] == manifest["fingerprint"]
    assert identity["spm_sha256"] == manifest["spm_model"]["sha256"]
    spm = Path(identity["dataset_dir"]) / manifest["spm_model"]["file"]
    assert (run / "spm.model").read_bytes() == spm.read_bytes()
    assert "vocab_size: 400" in (run / "config.yaml").read_text()


def test_a_copied_run_translates_with_no_override_and_no_corpora(
    trained: dict, tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run folder copied elsewhere, CORPORA_DIR and the output folder pointing at empty places, no training
    override: the same translations as the original run gives with all of its overrides."""
    argv = [f"translate.input={trained['source']}"]
    expected = _translate([*trained["overrides"], *argv], tmp_path / "expected.txt", capsys)
    assert len(expected) == len(SENTENCES) and expected[-1] == "" and all(expected[:-1])
    copy = tmp_path / "elsewhere" / "run"
    shutil.copytree(trained["run"], copy)
    monkeypatch.setenv("CORPORA_DIR", str(tmp_path / "no-corpora"))
    monkeypatch.setenv("AIAYN_OUTPUT_DIR", str(tmp_path / "no-outputs"))
    got = _translate([f"run.dir={copy}", *argv], tmp_path / "got.txt", capsys)
    assert got == expected


def test_an_override_that_disagrees_with_the_run_is_refused_by_name(
    trained: dict, capsys: pytest.CaptureFixture
) -> None:
    source = f"translate.input={trained['source']}"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["translate", f"run.dir={trained['run']}", "model.d_model=128", source])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count("\n") == 1, err
    assert "model.d_model=128 (the run's: model.d_model=64)" in err
    # The same value as the run's, and the decoding keys, are free.
    cli.main(["translate", f"run.dir={trained['run']}", "model.d_model=64", "translate.beam=1", "translate.nbest=1",
              f"translate.input={trained['source']}"])  # fmt: skip
    assert len(capsys.readouterr().out.splitlines()) == len(SENTENCES)


def test_a_resume_needs_no_override_and_a_conflicting_one_never_rewrites_the_config(
    trained: dict, tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    saved = (run / "config.yaml").read_text()
    common = [f"run.dir={run}", "run.resume=last", "logger.wandb.enabled=false", "trainer.enable_progress_bar=false"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", *common, "trainer.max_steps=4", "model.vocab_size=500"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "model.vocab_size=500" in err and err.count("\n") == 1, err
    assert (run / "config.yaml").read_text() == saved
    cli.main(["train", *common, "trainer.max_steps=5", f"paths.output_dir={tiny['root'] / 'out'}"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["start_step"] == 3 and summary["steps"] == 5  # how long is the resumed run's to choose
    assert (run / "config.yaml").read_text() == saved


def test_export_translates_as_the_run_without_lightning_or_pickle(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = [f"translate.input={trained['source']}"]
    expected = _translate([f"run.dir={trained['run']}", *argv], tmp_path / "expected.txt", capsys)
    out = tmp_path / "exported"
    cli.main(["export", f"run.dir={trained['run']}", f"export.dir={out}"])
    capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "spm.model"]
    assert "aiayn translate model_dir=" in (out / "README.md").read_text()

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load called: an exported model must load without unpickling")

    monkeypatch.setattr(torch, "load", no_pickle)
    monkeypatch.setenv("CORPORA_DIR", str(tmp_path / "no-corpora"))
    assert _translate([f"model_dir={out}", *argv], tmp_path / "got.txt", capsys) == expected


def test_training_into_a_folder_that_holds_a_run_is_refused_unless_resumed(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Issue 20, point 5: a second `aiayn train` into a run folder with checkpoints, without run.resume, would
    overwrite them and mix two runs under one folder: refused in one line, the checkpoints untouched."""
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    before = {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()}
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", *trained["overrides"], f"run.dir={run}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count("\n") == 1, err
    assert "already holds a run" in err and "run.resume=last" in err
    assert {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()} == before


def test_a_run_folder_another_process_writes_to_is_refused(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Issue 20, point 5: while one `aiayn train` holds the run folder's lock, a second one is refused."""
    import subprocess
    import sys

    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import filelock,sys; l=filelock.FileLock({str(run / '.lock')!r}); l.acquire(); "
         "print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["train", *trained["overrides"], f"run.dir={run}", "run.resume=last", "trainer.max_steps=4"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 1 and "another `aiayn train` is writing to it" in err, err
    finally:
        holder.communicate("")


def test_a_truncated_last_checkpoint_falls_back_to_the_newest_that_loads(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Issue 20, point 10: last.ckpt cut short (a copy that did not finish): translate and average use the
    step checkpoint beside it and say so, and a resume continues from it."""
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    cli.main(["translate", f"run.dir={run}", f"translate.input={trained['source']}", "translate.beam=1"])
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == len(SENTENCES)  # the translations alone: what happened goes to stderr
    assert "last.ckpt cannot be read" in err and "instead: step0000003.ckpt" in err
    cli.main(["average", f"run.dir={run}"])
    assert "passing over last.ckpt" in capsys.readouterr().out
    common = [f"run.dir={run}", "run.resume=last", "trainer.max_steps=4", "logger.wandb.enabled=false"]
    cli.main(["train", *common, "trainer.enable_progress_bar=false", f"paths.output_dir={trained['root'] / 'x'}"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["start_step"] == 3 and summary["resumed_from"].endswith("step0000003.ckpt")


def test_a_diverging_run_stops_with_the_step_and_keeps_its_good_checkpoints(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Issue 20, point 6: optim.lr_scale=1e30 makes the weights overflow; the updates with a non-finite gradient
    are skipped, then training stops with exit 1 and the step, and no checkpoint holding a non-finite weight is
    written (the resumed run's last.ckpt stays the good one)."""
    run = tmp_path / "run"
    overrides = [o for o in trained["overrides"] if not o.startswith("run.dir=")]
    overrides += [f"run.dir={run}", "trainer.max_steps=40", "checkpoint.every_n_train_steps=1"]
    overrides += ["optim.lr_scale=1e30", "optim.warmup_steps=1", "train.max_skipped_updates=2"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", *overrides])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1, err
    assert err.splitlines()[-1].startswith("aiayn train: training diverged at step"), err
    for path in (run / "checkpoints").glob("*.ckpt"):
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        assert all(bool(torch.isfinite(v).all()) for v in state.values()), path.name
