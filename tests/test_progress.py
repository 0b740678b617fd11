"""Progress a user can read in a log file as on a terminal (pipeline/progress.py, pipeline/callbacks.py RunProgress):
training's plain lines off a terminal and its bar on one, sentence progress of `aiayn evaluate`, `translate` and
`prepare`; and the third-party warnings known to be harmless silenced, others still shown (pipeline/host.py).
No assertion reads a time or a rate: only which fields are there."""

from __future__ import annotations

import gzip
import io
import logging
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from tiny_run import N_TEST

from pipeline import cli, host
from pipeline.callbacks import RunProgress
from pipeline.progress import Progress, clock

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MADE_UP = "a made-up warning that must still be shown"


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def _fields(line: str) -> tuple[str, dict[str, str]]:
    """A progress line -> (kind, {name: value}), as pipeline/progress.py's docstring reads it back."""
    kind, *fields = line.split(" | ")
    return kind, dict(field.split(" ", 1) for field in fields)


def _fake_srun(folder: Path) -> str:
    """A PATH whose first folder holds an `srun`: Lightning then warns that it is not used."""
    folder.mkdir(exist_ok=True)
    srun = folder / "srun"
    srun.write_text("#!/bin/sh\nexit 0\n")
    srun.chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"


# --- `aiayn train` with its output in files ----------------------------------------------------------------------

TRAIN_SCRIPT = textwrap.dedent(
    f"""
    import sys, warnings
    import pipeline.train

    real_main = pipeline.train.main

    def main(cfg):  # a warning nobody declared harmless, once the filters are in place
        warnings.warn({MADE_UP!r}, UserWarning)
        return real_main(cfg)

    pipeline.train.main = main
    from pipeline.cli import main as cli_main
    cli_main(sys.argv[1:])
    """
)


@pytest.fixture(scope="module")
def train_output(tiny: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`aiayn train` in a child process with stdout and stderr going to pipes (a SLURM job's log files): 6 steps,
    metrics every 2, validation every 3, with an `srun` on the PATH outside any SLURM job."""
    root = tmp_path_factory.mktemp("progress_train")
    run = root / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "PYTHONWARNINGS"}
    env |= {"PATH": _fake_srun(root / "bin"), "WANDB_MODE": "offline", "PYTHONPATH": str(PROJECT_ROOT)}
    overrides = [
        *tiny["overrides"],
        f"run.dir={run}",
        "trainer.max_steps=6",
        "trainer.log_every_n_steps=2",
        "trainer.val_check_interval=3",
        "trainer.limit_val_batches=2",
        "checkpoint.every_n_train_steps=6",
        "run.n_samples=0",
        "run.val_bleu_sentences=2",
        "logger.wandb.enabled=false",
    ]
    done = subprocess.run(
        [sys.executable, "-c", TRAIN_SCRIPT, "train", *overrides],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {"run": run, "out": done.stdout, "err": done.stderr}


def test_train_prints_the_run_folder_first(train_output: dict) -> None:
    assert train_output["out"].splitlines()[0] == f"run folder: {train_output['run']}"


def test_train_off_a_terminal_prints_a_line_every_logging_interval(train_output: dict) -> None:
    lines = [_fields(line) for line in train_output["out"].splitlines() if line.startswith("train | ")]
    assert [fields["step"] for _, fields in lines] == ["2/6", "4/6", "6/6"]
    for _, fields in lines:
        assert {"loss", "ppl", "lr", "tok/s", "elapsed", "eta"} <= fields.keys(), fields
        float(fields["loss"]), float(fields["tok/s"])  # numbers without separators
    assert "Epoch" not in train_output["out"] + train_output["err"]  # no per-epoch bar


def test_train_off_a_terminal_prints_a_line_after_each_validation(train_output: dict) -> None:
    lines = [_fields(line)[1] for line in train_output["out"].splitlines() if line.startswith("valid | ")]
    assert [fields["step"] for fields in lines] == ["3/6", "6/6"]
    assert all({"loss", "ppl", "bleu"} <= fields.keys() for fields in lines), lines


def test_train_shows_no_known_harmless_warning_but_others(train_output: dict) -> None:
    err = train_output["err"]
    assert MADE_UP in err
    for known in ("srun", "LeafSpec", "litlogger", "limit_val_batches", "Total FLOPs", "FLOPs"):
        assert known not in err + train_output["out"], known
    # Lightning's summary table is replaced by one line.
    assert "model: Transformer, " in err and "trainable parameters" in err


# --- the warning filters, against the libraries' own warnings -------------------------------------------------------


def _lightning_warnings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, job: str | None) -> list[str]:
    """The warnings shown after host.quiet_known_warnings() when Lightning meets an unused srun and flattens a
    batch (torch's deprecated LeafSpec), and a made-up one is warned, in a SLURM job `job` (None: outside one)."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment
    from lightning.pytorch.utilities._pytree import _tree_flatten

    monkeypatch.setattr(sys, "warnoptions", [])
    monkeypatch.setenv("PATH", _fake_srun(tmp_path / "bin"))
    for name in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    if job:
        monkeypatch.setenv("SLURM_JOB_ID", job)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        host.quiet_known_warnings()
        SLURMEnvironment.detect()
        _tree_flatten(1)
        warnings.warn(MADE_UP, UserWarning, stacklevel=1)
    return [str(w.message) for w in shown]


def test_known_harmless_warnings_are_silenced_and_others_shown(monkeypatch, tmp_path) -> None:
    assert _lightning_warnings(monkeypatch, tmp_path, job=None) == [MADE_UP]


def test_the_srun_warning_still_shows_inside_a_slurm_job(monkeypatch, tmp_path) -> None:
    shown = _lightning_warnings(monkeypatch, tmp_path, job="4242")
    assert len(shown) == 2 and "`srun` command is available" in shown[0] and shown[1] == MADE_UP


def test_known_harmless_lightning_messages_are_dropped_and_others_kept() -> None:
    from lightning.pytorch.trainer.setup import _determine_batch_limits

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger(host.LIGHTNING_INFO_LOGGERS[0])
    logger.addHandler(handler)
    try:
        host.quiet_known_warnings()
        L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        _determine_batch_limits(1.0, "limit_val_batches")
        _determine_batch_limits(1, "limit_val_batches")  # a limit of one batch: worth saying, still said
    finally:
        logger.removeHandler(handler)
        for name in host.LIGHTNING_INFO_LOGGERS:
            for drop in [f for f in logging.getLogger(name).filters if isinstance(f, host._DropMessages)]:
                logging.getLogger(name).removeFilter(drop)
    assert not [r for r in records if "litlogger" in r or "100% of the batches" in r], records
    assert "`Trainer(limit_val_batches=1)` was configured so 1 batch will be used." in records
    assert any(r.startswith("GPU available") for r in records), records


# --- the training bar on a terminal, and its steps under gradient accumulation -----------------------------------


class _Toy(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 4)), batch_size=4)


def _toy_fit(stream: io.StringIO, **trainer_args) -> None:
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[RunProgress(stream=stream)],
        **trainer_args,
    )
    trainer.fit(_Toy())


def test_the_bar_counts_optimizer_steps_to_max_steps_on_a_terminal() -> None:
    terminal = Terminal()
    _toy_fit(terminal, max_steps=3, accumulate_grad_batches=2, log_every_n_steps=1)
    screen = terminal.getvalue().replace("\r", "\n")
    assert "train 3/3 100%|" in screen and "train 4/3" not in screen
    assert "loss " in screen and "eta " in screen


def test_plain_lines_count_optimizer_steps_too() -> None:
    log = io.StringIO()
    _toy_fit(log, max_steps=4, accumulate_grad_batches=2, log_every_n_steps=2)
    assert [_fields(line)[1]["step"] for line in log.getvalue().splitlines()] == ["2/4", "4/4"]


def test_eta_is_the_time_left_to_max_time_when_that_ends_training_first() -> None:
    log = io.StringIO()
    _toy_fit(log, max_steps=1_000_000, max_time="00:00:00:01", log_every_n_steps=1)
    first = _fields(log.getvalue().splitlines()[0])[1]
    assert first["step"].endswith("/1000000") and first["eta"].startswith("0:00:0")  # not the days to step 10^6


# --- sentence progress ----------------------------------------------------------------------------------------------


def test_progress_lines_off_a_terminal() -> None:
    log = io.StringIO()
    with Progress(total=5, desc="evaluate test", stream=log, every_s=0) as progress:
        for _ in range(5):
            progress.update(1)
    lines = log.getvalue().splitlines()
    assert len(lines) == 6 and lines[0].startswith("evaluate test: 1/5 sentences (20%) | ")
    assert lines[-1].startswith("evaluate test: 5/5 sentences (100%) | ") and "sentences/s" in lines[-1]
    assert "eta " in lines[0] and "eta " not in lines[-1]
    assert clock(3 * 3600 + 62) == "3:01:02" and clock(30 * 3600) == "30:00:00"


def test_progress_is_a_bar_on_a_terminal() -> None:
    terminal = Terminal()
    with Progress(total=5, desc="translate", stream=terminal) as progress:
        progress.update(5)
    assert "translate: 100%" in terminal.getvalue() and "5/5" in terminal.getvalue()


def test_evaluate_and_translate_print_sentence_progress(
    hand_made_run: dict, tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    overrides = [*tiny["overrides"], f"run.dir={hand_made_run['run']}", "logger.wandb.enabled=false"]
    cli.main(["evaluate", *overrides, "evaluate.beam=1", "evaluate.max_tokens=200"])
    out = capsys.readouterr().out
    assert f"evaluate test: {N_TEST}/{N_TEST} sentences (100%) | " in out, out

    with gzip.open(tiny["corpora"] / "test_2016_flickr.en.gz", "rt", encoding="utf-8") as f:
        (tmp_path / "in.en").write_text(f.read(), encoding="utf-8")
    cli.main(["translate", *overrides, f"translate.input={tmp_path / 'in.en'}", "translate.beam=1"])
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == N_TEST  # stdout: the translations only
    assert f"translate: {N_TEST}/{N_TEST} sentences (100%) | " in captured.err, captured.err


def test_prepare_prints_pairs_done_per_split(tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cli.main(["prepare", "data=tiny", f"paths.corpora_dir={tiny['corpora'].parent}", f"paths.output_dir={tmp_path}"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("BPE: reading a sample of train: ") and "pairs/s" in out[0]
    for split, pairs in (("train", 1014), ("valid", N_TEST), ("test", N_TEST)):
        assert any(line.startswith(f"encoding {split}: {pairs}/{pairs} pairs (100%) | ") for line in out), out
    assert out[-1].startswith(str(tmp_path / "data" / "tiny-"))
