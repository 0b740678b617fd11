"""Exact resume (pipeline/resume.py): a run killed with SIGKILL after its step-N checkpoint, then resumed
(run.resume=last), ends with the uninterrupted run's weights, optimizer and scheduler state, RNG states and data
position, bit for bit; in one process and in 2-process DDP (gloo); and the resume prints no warning that it cannot
continue exactly. Plus the pieces on their own: RNG states
survive a checkpoint and are kept from whatever runs between training batches; a wrong world size is refused; a
time-triggered save never lands inside an accumulated update; a process killed while saving leaves the previous
checkpoint loadable.

The end-to-end runs are `aiayn train` processes (what a user or a requeued job runs; forked from the test process, so
that they skip the minutes of importing torch again: tests/forked.py) on a 200-pair
slice of data=tiny with a tiny model, 32-true precision, deterministic CPU kernels, dropout 0.1. With 1024 tokens
per batch an epoch is 7 batches in one process and 4 per rank under DDP, so the step-5 checkpoint falls mid-epoch
and steps 6-10 cross an epoch boundary (a new shuffle, a new data loader iterator). Validation runs at steps 5 and
10, right after the checkpoint, as it does in the uninterrupted run but not in the resumed one.
"""

from __future__ import annotations

import gzip
import io
import os
import random
import signal
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import forked
import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, model_checkpoint
from tiny_run import TINY_MODEL

from data import prepare_dataset
from pipeline.config import load_config
from pipeline.resume import AtomicCheckpointIO, RNGState, UpdateCheckpoint

N = 5  # checkpoint every N steps; the killed run is resumed from step N and runs to 2N
TIMEOUT_S = float(os.environ.get("AIAYN_RESUME_TEST_TIMEOUT", 1800))  # an upper bound for a loaded machine


@pytest.fixture(scope="session")
def resume_data(tmp_path_factory: pytest.TempPathFactory, corpora_dir: Path) -> list[str]:
    """data=tiny on the first 200 training / 40 validation pairs, prepared once: the overrides every run shares."""
    root = tmp_path_factory.mktemp("exact_resume")
    (root / "corpora" / "multi30k").mkdir(parents=True)
    for name, n in (("val", 200), ("test_2016_flickr", 40)):  # data=tiny's train and valid/test files
        for lang in ("en", "de"):
            with gzip.open(corpora_dir / "multi30k" / f"{name}.{lang}.gz", "rt", encoding="utf-8") as f:
                lines = [next(f) for _ in range(n)]
            with gzip.open(root / "corpora" / "multi30k" / f"{name}.{lang}.gz", "wt", encoding="utf-8") as f:
                f.writelines(lines)
    overrides = [
        *TINY_MODEL,
        "model.dropout=0.1",
        "data=tiny",
        "data.max_tokens=1024",
        f"paths.corpora_dir={root / 'corpora'}",
        f"paths.output_dir={root / 'outputs'}",
        "trainer.precision=32-true",
        "trainer.deterministic=true",
        f"trainer.max_steps={2 * N}",
        f"trainer.val_check_interval={N}",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        f"checkpoint.every_n_train_steps={N}",
        "checkpoint.save_top_k=5",
        "run.n_samples=1",
        "run.val_bleu_sentences=8",  # greedy decoding at each validation: a few sentences show it changes nothing
        "logger.wandb.enabled=false",
    ]
    prepare_dataset(load_config(overrides).data, root / "outputs")  # here, once: the runs only read it
    return overrides


def _command(overrides: list[str], devices: int, run_dir: Path, *extra: str) -> list[str]:
    parallel = ["trainer.devices=2", "strategy=ddp"] if devices == 2 else []
    return ["train", *overrides, *parallel, f"run.dir={run_dir}", *extra]


WARNING = "warning: "  # how _aiayn_printing_warnings starts each warning's line in a rank's log


def _aiayn_printing_warnings(argv: list[str]) -> None:
    """forked.aiayn, with every warning it raises printed to the log at the end. (A forked child inherits
    pytest's recording of warnings into a list, where they would be lost.)"""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            forked.aiayn(argv)
        finally:
            for w in caught:
                message = " ".join(str(w.message).split())
                print(f"{WARNING}{w.category.__name__}: {message}", file=sys.stderr, flush=True)


def _start(argv: list[str], devices: int, log_dir: Path) -> list[forked.Child]:
    """`aiayn train` as 1 process, or as 2 DDP ranks started the way torchrun starts them; forked from this
    process (tests/forked.py), each rank in its own session so that SIGKILL takes it down as a node failure does."""
    log_dir.mkdir(parents=True, exist_ok=True)
    if devices == 1:
        return [forked.Child(_aiayn_printing_warnings, (argv,), forked.clean_env(), log_dir / "rank0.log")]
    return forked.torchrun_fork(_aiayn_printing_warnings, (argv,), devices, log_dir)


def _logs(log_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(log_dir.glob("rank*.log")))


def _resume_warnings(log_dir: Path) -> list[str]:
    """Warnings in the ranks' logs about a resume that cannot continue exactly, e.g. Lightning's "You're resuming
    from a checkpoint that ended before the epoch ended and your dataloader is not resumable. This can cause
    unreliable results if further training is done. ..."""
    lines = [line for p in sorted(log_dir.glob("rank*.log")) for line in p.read_text().splitlines()]
    return [
        line
        for line in lines
        if line.startswith(WARNING) and any(w in line for w in ("resumable", "reproducib", "unreliable results"))
    ]


def _run(argv: list[str], devices: int, log_dir: Path) -> None:
    codes = forked.wait_all(_start(argv, devices, log_dir), TIMEOUT_S)
    assert codes == [0] * devices, f"aiayn {' '.join(argv)}\nexit {codes}\n{_logs(log_dir)}"


def _run_and_kill_after_checkpoint(argv: list[str], devices: int, checkpoint: Path, log_dir: Path) -> None:
    """Start the run, SIGKILL all its processes as soon as `checkpoint` exists (renamed into place when complete)."""
    children = _start(argv, devices, log_dir)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not checkpoint.exists() and all(c.poll() is None for c in children) and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        forked.kill_all(children)
    codes = [c.poll() for c in children]
    assert checkpoint.exists(), f"no {checkpoint}: exit {codes}\n{_logs(log_dir)}"
    killed = [-signal.SIGKILL] * devices
    assert codes == killed, f"the run was not killed but ended by itself (exit {codes}):\n{_logs(log_dir)}"


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_equal(a, b, where: str = "checkpoint") -> None:
    """Tensors equal bit for bit (torch.equal, same dtype and shape); containers and plain values recursively."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs: max |diff| {(a.double() - b.double()).abs().max().item()}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            _assert_equal(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# What must be identical between two checkpoints of the same step. ("callbacks" also holds ModelCheckpoint's
# bookkeeping, which names the run folder; its RNGState entry is compared.)
TRAINING_STATE = ("global_step", "state_dict", "optimizer_states", "lr_schedulers")


def _training_state(ckpt: dict) -> dict:
    state = {k: ckpt[k] for k in TRAINING_STATE}
    state["rng"] = ckpt["callbacks"]["RNGState"]
    state["loops"] = ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    state["data_position"] = _data_position(ckpt)
    return state


def _data_position(ckpt: dict) -> dict:
    """The training loader's state (data/datamodule.py TrainLoader), which Lightning keeps with its loop state."""
    (position,) = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    return position


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 2], ids=["1-process", "ddp-2-processes"])
def test_killed_and_resumed_run_ends_exactly_like_an_uninterrupted_one(
    devices: int, resume_data: list[str], tmp_path: Path
) -> None:
    straight, broken = tmp_path / "straight", tmp_path / "killed"
    _run(_command(resume_data, devices, straight), devices, tmp_path / "straight-logs")
    _run_and_kill_after_checkpoint(
        _command(resume_data, devices, broken), devices, broken / "checkpoints" / "last.ckpt", tmp_path / "killed-logs"
    )
    at_kill = _load(broken / "checkpoints" / "last.ckpt")
    assert at_kill["global_step"] == N, "killed after the step-2N checkpoint: nothing left to resume"
    assert not (broken / "checkpoints" / f"step{2 * N:07d}.ckpt").exists()
    # The same command up to the kill: the step-N checkpoints agree (a difference here is not resume's fault).
    _assert_equal(
        _training_state(_load(straight / "checkpoints" / f"step{N:07d}.ckpt")), _training_state(at_kill), "step N"
    )
    assert len(at_kill["callbacks"]["RNGState"]["ranks"]) == devices
    # mid-epoch: batch 5 of 7 in one process; under DDP, batch 1 of the second epoch's 4 per rank
    position = {"epoch": 0, "batches_done": 5} if devices == 1 else {"epoch": 1, "batches_done": 1}
    assert _data_position(at_kill) == position

    _run(_command(resume_data, devices, broken, "run.resume=last"), devices, tmp_path / "resumed-logs")
    assert not _resume_warnings(tmp_path / "resumed-logs"), _logs(tmp_path / "resumed-logs")

    expected, resumed = _load(straight / "checkpoints" / "last.ckpt"), _load(broken / "checkpoints" / "last.ckpt")
    assert expected["global_step"] == resumed["global_step"] == 2 * N
    assert expected["epoch"] == resumed["epoch"] > at_kill["epoch"]  # steps N+1..2N crossed an epoch boundary
    _assert_equal(_training_state(expected), _training_state(resumed), "step 2N")
    embedding = "model.encoder.embedding.weight"  # steps N+1..2N trained: not the step-N weights
    assert not torch.equal(expected["state_dict"][embedding], at_kill["state_dict"][embedding])
    rank_states = expected["callbacks"]["RNGState"]["ranks"]
    if devices == 2:  # the ranks drew different dropout masks: one shared state would not have done
        assert not torch.equal(rank_states[0]["torch"], rank_states[1]["torch"])


# -- the pieces on their own (in this process, cheap) --------------------------------------------------------------


def _draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_rng_state_survives_a_checkpoint_and_is_kept_from_what_runs_between_batches(tmp_path: Path) -> None:
    """After a batch, the next batch draws the same numbers whatever ran in between, and a new process that loads
    the checkpoint (saved and read back as Lightning does, weights_only) draws them too."""
    L.seed_everything(3)
    callback = RNGState()
    _ = torch.rand(10), np.random.rand(5)  # a training batch's draws (dropout)
    callback.on_train_batch_end(None, None, None, None, 0)
    expected = _draws()  # what the next batch draws if nothing runs in between
    torch.save({"rng": callback.state_dict()}, tmp_path / "rng.pt")

    _ = torch.rand(7), np.random.rand(2), random.random()  # e.g. validation, a new data loader's base seed
    callback.on_train_batch_start(None, None, None, 1)
    assert _draws() == expected

    L.seed_everything(99)  # a fresh process: other seed, other history
    resumed = RNGState()
    resumed.load_state_dict(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    resumed.on_train_batch_start(None, None, None, 0)
    assert _draws() == expected


def test_resuming_with_another_world_size_is_refused() -> None:
    saved = RNGState()
    state = saved.state_dict()  # one process
    callback = RNGState()
    callback.setup(SimpleNamespace(world_size=2, global_rank=1, ckpt_path="run/checkpoints/last.ckpt"), None, "fit")
    with pytest.raises(RuntimeError, match=r"last\.ckpt was written by 1 process\(es\) but this run has 2"):
        callback.load_state_dict(state)


class _Toy(L.LightningModule):
    """Linear regression; records, at each save, how many micro-batches of the epoch had been trained."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 1)
        self.saved_at: list[int] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.saved_at.append(self.trainer.fit_loop.epoch_loop.batch_progress.current.processed)


class _Clock:
    """Stands in for ModelCheckpoint's `time` module: each reading is one second after the previous one."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        self.now += 1.0
        return self.now


def _saves_with_timed_checkpoints(checkpoint_cls: type, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    monkeypatch.setattr(model_checkpoint, "time", _Clock())
    data = torch.utils.data.TensorDataset(torch.randn(24, 4), torch.randn(24, 1))
    model = _Toy()
    checkpoint = checkpoint_cls(dirpath=tmp_path, train_time_interval=timedelta(seconds=1.5), save_top_k=-1)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        accumulate_grad_batches=3,
        callbacks=[checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=2))  # 12 micro-batches, 4 updates
    return model.saved_at


def test_time_triggered_saves_wait_for_the_end_of_an_update(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With accumulation 3, a save after micro-batch 4 or 5 would lose their gradients. Lightning's own
    ModelCheckpoint saves there under this clock; UpdateCheckpoint only after micro-batches 3, 6, 9 or 12."""
    plain = _saves_with_timed_checkpoints(ModelCheckpoint, tmp_path / "plain", monkeypatch)
    assert any(n % 3 for n in plain), plain  # the hazard is real
    saves = _saves_with_timed_checkpoints(UpdateCheckpoint, tmp_path / "update", monkeypatch)
    assert len(saves) >= 2 and all(n % 3 == 0 for n in saves), saves


def test_a_process_killed_while_saving_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    """A child process overwrites last.ckpt and is SIGKILLed in the middle of writing it: the file still loads,
    as the previous checkpoint; the next save replaces it and clears the dead process's partial file."""
    checkpoint_io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    old = {"w": torch.arange(1000.0), "step": 5}
    checkpoint_io.save_checkpoint(old, path)

    pid = os.fork()
    if pid == 0:  # the child: its torch.save writes half of the archive, then the process is killed
        try:
            save = torch.save

            def save_half_then_die(obj, f):
                buffer = io.BytesIO()
                save(obj, buffer)
                f.write(buffer.getvalue()[: buffer.tell() // 2])
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)

            torch.save = save_half_then_die
            checkpoint_io.save_checkpoint({"w": torch.zeros(100_000), "step": 10}, path)
        finally:
            os._exit(1)  # not reached: SIGKILL comes first
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    partial = list(tmp_path.glob(".last.ckpt.tmp-*"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0  # it did die while writing
    _assert_equal(checkpoint_io.load_checkpoint(path, weights_only=True), old)

    new = {"w": torch.ones(10), "step": 10}
    checkpoint_io.save_checkpoint(new, path)
    _assert_equal(checkpoint_io.load_checkpoint(path, weights_only=True), new)
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_the_end_of_a_fit_is_saved_when_it_falls_between_two_saves(tmp_path: Path) -> None:
    """max_steps 5 with a save every 2 updates: Lightning's ModelCheckpoint keeps updates 2 and 4 and loses the 5th
    (as a run stopped by trainer.max_time loses everything since its last save); UpdateCheckpoint saves it."""
    data = torch.utils.data.TensorDataset(torch.randn(24, 4), torch.randn(24, 1))
    steps = {}
    for cls in (ModelCheckpoint, UpdateCheckpoint):
        folder = tmp_path / cls.__name__
        checkpoint = cls(dirpath=folder, every_n_train_steps=2, save_top_k=-1, save_last=True)
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=5,
            callbacks=[checkpoint],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(_Toy(), torch.utils.data.DataLoader(data, batch_size=2))
        steps[cls] = sorted(torch.load(f, weights_only=False)["global_step"] for f in folder.glob("*.ckpt"))
    assert 5 not in steps[ModelCheckpoint], steps  # the hazard is real
    assert steps[UpdateCheckpoint] == [2, 4, 5, 5], steps  # ... and the 5th update is in a checkpoint and last.ckpt


class _StopAfter(L.Callback):
    """Stops the fit after micro-batch `n` of the epoch, as trainer.max_time or a preemption does."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, idx) -> None:
        if idx + 1 == self.n:
            trainer.should_stop = True


def test_the_end_of_a_fit_is_not_saved_inside_an_update(tmp_path: Path) -> None:
    """Accumulation 3, a save every 4 updates: a fit stopped after micro-batch 7, inside its 3rd update, saved
    nothing before; neither UpdateCheckpoint nor Lightning's own last.ckpt at the end of a fit that saved none
    (ModelCheckpoint.on_train_end) may save it now, with the gradients of micro-batch 7 in no checkpoint."""
    data = torch.utils.data.TensorDataset(torch.randn(24, 4), torch.randn(24, 1))
    model = _Toy()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        accumulate_grad_batches=3,
        callbacks=[
            UpdateCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1, save_last=True),
            _StopAfter(7),
        ],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=2))
    assert trainer.global_step == 2
    assert model.saved_at == []


class _ToyWithValidation(_Toy):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))


def test_a_save_on_an_epochs_last_batch_is_written_at_its_step(tmp_path: Path) -> None:
    """Epochs of 6 updates, a save every 3 updates named by step as `aiayn train` names them, validation every 5
    updates (check_val_every_n_epoch null, as conf/trainer/*.yaml): Lightning's ModelCheckpoint puts the saves at
    updates 6 and 12 (epoch ends) off to a validation that does not come there, so they are lost and a file named
    by the next validation's step appears instead; UpdateCheckpoint writes each at its step."""
    data = torch.utils.data.TensorDataset(torch.randn(12, 4), torch.randn(12, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=2)  # 6 batches
    found = {}
    for cls in (ModelCheckpoint, UpdateCheckpoint):
        folder = tmp_path / cls.__name__
        checkpoint = cls(
            dirpath=folder, filename="step{step:07d}", auto_insert_metric_name=False, every_n_train_steps=3,
            save_top_k=-1, monitor="step", mode="max", save_last=True,
        )  # fmt: skip
        trainer = L.Trainer(
            accelerator="cpu", max_steps=14, val_check_interval=5, check_val_every_n_epoch=None, limit_val_batches=1,
            callbacks=[checkpoint], logger=False, enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        trainer.fit(_ToyWithValidation(), loader, loader)
        found[cls] = {f.name: torch.load(f, weights_only=False)["global_step"] for f in folder.glob("step*.ckpt")}
    assert "step0000006.ckpt" not in found[ModelCheckpoint], found  # the hazard is real (Lightning 2.6)
    expected = {f"step{s:07d}.ckpt": s for s in (3, 6, 9, 12, 14)}  # 14: the end of the fit
    assert found[UpdateCheckpoint] == expected, found
