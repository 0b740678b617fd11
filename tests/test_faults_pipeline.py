"""Issue 20, "One-line errors instead of tracebacks", the pipeline's side: each fault a user met is one line on stderr
naming the key, file or folder at fault and the fix. Exit code 2 for a config value refused before anything starts
(pipeline/validate.py), 1 for what is found wrong once the command runs (pipeline/errors.py RunFolderError), and
nothing half-written left behind. Plus: `translate.nbest=2` gives every line, an empty one too, its nbest lines.

The data side (an empty train split, data.max_len=0, data.shard_lines=0, ENOSPC during prepare, ...) is tested in
the data tests.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeline import cli

TRAIN = ["logger.wandb.enabled=false", "trainer.enable_progress_bar=false", "run.n_samples=0"]


@pytest.fixture(scope="module")
def trained(tiny: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`aiayn train` on data=tiny with the tiny model (d_model 64): 3 steps, checkpoints/step0000003.ckpt and last.ckpt;
    and a hand-made checkpoint of another model (d_model 32), as another run would have left it."""
    from tiny_run import new_module, save_checkpoint

    from pipeline.config import load_config

    root = tmp_path_factory.mktemp("faults_pipeline")
    overrides = [*tiny["overrides"], *TRAIN, "run.val_bleu_sentences=0", "trainer.val_check_interval=3"]
    overrides += ["model.init=xavier"]  # three updates from it translate into words (tests/test_run_folder.py)
    overrides += ["checkpoint.every_n_train_steps=3"]
    cli.main(["train", *overrides, f"run.dir={root / 'run'}", "trainer.max_steps=3"])
    other = root / "other" / "step0000003.ckpt"
    save_checkpoint(new_module(load_config([*overrides, "model.d_model=32"]), 0), 3, other)
    return {"root": root, "run": root / "run", "overrides": overrides, "other": other}


def _with(overrides: list[str], **changes: Any) -> list[str]:
    """overrides with key=value changed (a key=None dropped) or added: one override per key."""
    kept = [o for o in overrides if o.split("=", 1)[0] not in changes]
    return kept + [f"{key}={value}" for key, value in changes.items() if value is not None]


def _read_only_folder(tmp_path: Path) -> Path:
    """A folder no file can be created in: a folder made read-only, or, for root (whom permissions do not stop), the
    kernel's /sys, which refuses new files to everyone."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys")):
        try:
            (candidate / ".probe").open("w").close()
        except OSError:
            return candidate
        (candidate / ".probe").unlink()
    pytest.skip("no folder here refuses new files (root on a system without /sys)")


def _why_unwritable(folder: Path) -> str:
    try:
        (folder / ".probe").open("w").close()
    except OSError as error:
        return os.strerror(error.errno)
    raise AssertionError(f"{folder} can be written")


class DiskFull:
    """A checkpoint file on a disk that fills up after its first kilobyte: further writes fail with ENOSPC, which
    torch.save reports as `unexpected pos N vs M` (what the issue saw)."""

    ROOM = 1024

    def __init__(self, file: Any) -> None:
        self._file = file
        self._written = 0

    def write(self, data: Any) -> int:
        self._written += memoryview(data).nbytes
        if self._written > self.ROOM:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._file.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


def _disk_full_for_checkpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    """The atomic writer of checkpoints (pipeline/checkpoints.py save_atomic -> data/atomic.py) on a full disk."""
    import pipeline.checkpoints

    real = pipeline.checkpoints.atomic_write

    def full(path: Path, write: Callable) -> None:
        real(path, lambda f: write(DiskFull(f)) if Path(path).suffix == ".ckpt" else write(f))

    monkeypatch.setattr(pipeline.checkpoints, "atomic_write", full)


@dataclass
class Case:
    """A fault: the command line (from the fixtures' paths), the exit code and the exact line it must give, and
    what must hold afterwards (nothing written, the previous checkpoints intact, ...)."""

    name: str
    argv: Callable[[dict], list[str]]
    code: int
    line: Callable[[dict], str]
    setup: Callable[[dict, pytest.MonkeyPatch], None] = lambda ctx, monkeypatch: None
    after: Callable[[dict], None] = lambda ctx: None


def _copy_run(ctx: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx["copy"] = ctx["tmp"] / "run"
    shutil.copytree(ctx["run"], ctx["copy"])
    ctx["last_bytes"] = (ctx["copy"] / "checkpoints" / "last.ckpt").read_bytes()


def _read_only(ctx: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx["ro"] = _read_only_folder(ctx["tmp"])
    ctx["why"] = _why_unwritable(ctx["ro"])


def _no_new_run(ctx: dict) -> None:
    assert not (ctx["tmp"] / "new").exists()  # refused before the run folder was created


def _last_intact(ctx: dict) -> None:
    checkpoints = ctx["copy"] / "checkpoints"
    assert (checkpoints / "last.ckpt").read_bytes() == ctx["last_bytes"]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step0000003.ckpt"]  # no temp file left


OUTPUT_FIX = "set paths.output_dir (or AIAYN_OUTPUT_DIR) to a folder you can write to, or make {} writable"
MODEL_FIX = "resume from a checkpoint of this model, or set those keys as the checkpoint has them"

CASES = [
    Case(
        "read-only output folder: prepare",
        lambda c: ["prepare", *_with(c["overrides"], **{"paths.output_dir": c["ro"]})],
        2,
        lambda c: (
            f"aiayn prepare: paths.output_dir={c['ro']}: cannot be written ({c['why']}); " + OUTPUT_FIX.format(c["ro"])
        ),
        setup=_read_only,
    ),
    Case(
        "read-only output folder: train, from AIAYN_OUTPUT_DIR",
        lambda c: ["train", *_with(c["overrides"], **{"paths.output_dir": None})],
        2,
        lambda c: (
            f"aiayn train: paths.output_dir={c['ro']}: cannot be written ({c['why']}); " + OUTPUT_FIX.format(c["ro"])
        ),
        setup=lambda c, m: (_read_only(c, m), m.setenv("AIAYN_OUTPUT_DIR", str(c["ro"]))),
    ),
    Case(
        "read-only run folder",
        lambda c: ["train", *c["overrides"], f"run.dir={c['ro'] / 'run'}"],
        2,
        lambda c: (
            f"aiayn train: run.dir={c['ro'] / 'run'}: cannot be created in {c['ro']} ({c['why']}); set "
            f"run.dir to a folder you can write to, or make {c['ro']} writable"
        ),
        setup=_read_only,
    ),
    Case(
        "disk full while checkpointing",
        lambda c: ["train", f"run.dir={c['copy']}", "run.resume=last", "trainer.max_steps=4", *TRAIN],
        1,
        lambda c: (
            f"aiayn train: cannot write {c['copy'] / 'checkpoints' / 'step0000004.ckpt'}: the disk is full "
            "(No space left on device); the checkpoints written before it are intact (last.ckpt: the newest); free "
            "space there, then continue the run with run.resume=last"
        ),
        setup=lambda c, m: (_copy_run(c, m), _disk_full_for_checkpoints(m)),
        after=_last_intact,
    ),
    Case(
        "resume another model's checkpoint into a new folder (no config.yaml)",
        lambda c: [
            "train",
            *_with(c["overrides"], **{"model.d_model": 128}),
            f"run.dir={c['tmp'] / 'new'}",
            f"run.resume={c['run'] / 'checkpoints' / 'last.ckpt'}",
            "trainer.max_steps=5",
        ],  # fmt: skip
        1,
        lambda c: (
            f"aiayn train: run.resume={c['run'] / 'checkpoints' / 'last.ckpt'}: "
            f"{c['run'] / 'checkpoints' / 'last.ckpt'} holds another model than this run's: model.d_model=128 (the "
            f"checkpoint's: 64); {MODEL_FIX}"
        ),
        after=_no_new_run,
    ),
    Case(
        "resume another model's checkpoint in a run folder (its config.yaml agrees with the command line)",
        lambda c: ["train", f"run.dir={c['copy']}", f"run.resume={c['other']}", "trainer.max_steps=5", *TRAIN],
        1,
        lambda c: (
            f"aiayn train: run.resume={c['other']}: {c['other']} holds another model than this run's: "
            f"model.d_model=64 (the checkpoint's: 32); {MODEL_FIX}"
        ),
        setup=_copy_run,
        after=_last_intact,
    ),
    Case(
        "resume in a run folder with another model.d_model (its config.yaml refuses it)",
        lambda c: ["train", f"run.dir={c['copy']}", "run.resume=last", "model.d_model=128", "trainer.max_steps=5"],
        1,
        lambda c: (
            f"aiayn train: run.dir={c['copy']} was trained with other settings than model.d_model=128 (the "
            "run's: model.d_model=64): drop the override (the run folder's config.yaml applies)"
        ),
        setup=_copy_run,
        after=_last_intact,
    ),
    Case(
        "model.vocab_size smaller than the BPE",
        lambda c: ["train", *_with(c["overrides"], **{"model.vocab_size": 300}), f"run.dir={c['tmp'] / 'new'}"],
        2,
        lambda c: (
            "aiayn train: model.vocab_size=300: data=tiny is tokenized with a 400-piece BPE (data.vocab_size), "
            "so token ids up to 399 do not fit its 300 embedding rows; set model.vocab_size=400"
        ),
        after=_no_new_run,
    ),
    Case(
        "run.dir naming a file: train",
        lambda c: ["train", *c["overrides"], f"run.dir={c['file']}"],
        2,
        lambda c: (
            f"aiayn train: run.dir={c['file']}: a file, not a folder; set run.dir to a new folder's path (or "
            "to a run's folder, with run.resume=last to continue it)"
        ),
        setup=lambda c, m: c.update(file=c["tmp"] / "notes.txt") or c["file"].write_text("a file\n"),
    ),
    Case(
        "run.dir naming a file: evaluate",
        lambda c: ["evaluate", f"run.dir={c['file']}"],
        2,
        lambda c: (
            f"aiayn evaluate: run.dir={c['file']}: a file, not a folder; set run.dir to a run's folder (the "
            "one `aiayn train` printed)"
        ),
        setup=lambda c, m: c.update(file=c["tmp"] / "notes.txt") or c["file"].write_text("a file\n"),
    ),
    Case(
        "run.resume naming a missing file",
        lambda c: ["train", *c["overrides"], f"run.dir={c['tmp'] / 'new'}", f"run.resume={c['tmp'] / 'nope.ckpt'}"],
        1,
        lambda c: f"aiayn train: run.resume={c['tmp'] / 'nope.ckpt'}: no such checkpoint",
        after=_no_new_run,
    ),
    Case(
        "run.resume naming a run folder instead of a checkpoint",
        lambda c: ["train", *c["overrides"], f"run.dir={c['tmp'] / 'new'}", f"run.resume={c['run']}"],
        1,
        lambda c: (
            f"aiayn train: run.resume={c['run']}: a folder, not a checkpoint; to continue that run: "
            f"run.dir={c['run']} run.resume=last"
        ),
        after=_no_new_run,
    ),
    Case(
        "trainer.max_steps=0",
        lambda c: ["train", *_with(c["overrides"], **{"trainer.max_steps": 0}), f"run.dir={c['tmp'] / 'new'}"],
        2,
        lambda c: (
            "aiayn train: trainer.max_steps=0: out of range (nothing would be trained); set trainer.max_steps "
            "to a positive integer, or -1 (no limit)"
        ),
        after=_no_new_run,
    ),
    Case(
        "trainer.max_epochs=0",
        lambda c: [
            "train",
            *c["overrides"],
            "trainer.max_steps=-1",
            "trainer.max_epochs=0",
            f"run.dir={c['tmp'] / 'new'}",
        ],
        2,
        lambda c: (
            "aiayn train: trainer.max_epochs=0: out of range (nothing would be trained); set "
            "trainer.max_epochs to a positive integer, or -1 (no limit)"
        ),
        after=_no_new_run,
    ),
    Case(
        "trainer.max_time of no time",
        lambda c: ["train", *c["overrides"], "trainer.max_time=00:00:00:00", f"run.dir={c['tmp'] / 'new'}"],
        2,
        lambda c: (
            "aiayn train: trainer.max_time=00:00:00:00: out of range (nothing would be trained); set "
            'trainer.max_time to a duration "DD:HH:MM:SS" above zero, or null (no time limit)'
        ),
        after=_no_new_run,
    ),
    Case(
        "trainer.limit_train_batches=0",
        lambda c: ["train", *c["overrides"], "+trainer.limit_train_batches=0", f"run.dir={c['tmp'] / 'new'}"],
        2,
        lambda c: (
            "aiayn train: trainer.limit_train_batches=0: out of range (nothing would be trained); set "
            "trainer.limit_train_batches to a positive integer (batches per epoch) or a fraction in (0, 1]"
        ),
        after=_no_new_run,
    ),
    Case(
        "resumed at trainer.max_steps already",
        lambda c: ["train", f"run.dir={c['copy']}", "run.resume=last", "trainer.max_steps=3", *TRAIN],
        1,
        lambda c: (
            f"aiayn train: run.resume=last: {c['copy'] / 'checkpoints' / 'last.ckpt'} is at step 3 and "
            "trainer.max_steps=3, so nothing would be trained; set trainer.max_steps above 3"
        ),
        setup=_copy_run,
        after=_last_intact,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_each_fault_is_one_line_with_its_exit_code(
    case: Case, trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = {**trained, "tmp": tmp_path}
    case.setup(ctx, monkeypatch)
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(case.argv(ctx))
    finally:
        if "ro" in ctx and ctx["ro"].is_relative_to(tmp_path):
            ctx["ro"].chmod(0o755)
    err = capsys.readouterr().err
    assert exit_info.value.code == case.code, err
    assert err.splitlines()[-1:] == [case.line(ctx)], err
    assert "Traceback" not in err, err
    case.after(ctx)


def test_an_empty_line_gives_nbest_lines_like_any_other(trained: dict, monkeypatch: pytest.MonkeyPatch, capsys):
    """translate.nbest=2: two `<index>\\t<score>\\t<translation>` lines for every input line, an empty one too (its
    translation empty, scored 0.0000), so that a reader grouping lines by index finds nbest of each."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("A man is riding a bike.\n\nTwo dogs play in the snow.\n"))
    cli.main(["translate", f"run.dir={trained['run']}", "translate.beam=2", "translate.nbest=2"])
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [row[0] for row in rows] == ["0", "0", "1", "1", "2", "2"], rows
    assert rows[2:4] == [["1", "0.0000", ""], ["1", "0.0000", ""]]
    assert all(float(row[1]) < 0 and row[2] for row in rows[:2] + rows[4:]), rows
