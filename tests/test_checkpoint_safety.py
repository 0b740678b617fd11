"""Opening a checkpoint never runs code (issue 20, point 1): every command that loads a checkpoint reads it with
torch's weights-only unpickler and refuses a pickle that would call anything, in one line.

The crafted checkpoint is a pickle whose __reduce__ makes unpickling call `pathlib.Path.touch` on a marker file:
if any loader executed it, the marker would exist.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from pipeline import cli
from pipeline.checkpoints import load_checkpoint
from pipeline.errors import RunFolderError


class _Touch:
    """Unpickled, it creates `path` (a stand-in for os.system and the like)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.path,))


def _crafted(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": 9999, "state_dict": {}, "hyper_parameters": {}, "x": _Touch(marker)}, path)
    assert not marker.exists()
    return path


def test_the_crafted_checkpoint_would_run_code_if_unpickled(tmp_path: Path) -> None:
    """The test's premise: torch's full unpickler does run it."""
    marker = tmp_path / "ran"
    torch.load(_crafted(tmp_path / "evil.ckpt", marker), weights_only=False)
    assert marker.exists()


def test_loading_refuses_it_in_one_line(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = _crafted(tmp_path / "evil.ckpt", marker)
    with pytest.raises(RunFolderError, match=r"evil.ckpt: refused, it holds more than weights") as error:
        load_checkpoint(path)
    assert "\n" not in str(error.value) and not marker.exists()


@pytest.mark.parametrize(
    ("command", "placement"),
    [
        ("average", "checkpoints/step0009999.ckpt"),
        ("evaluate", "averaged.ckpt"),
        ("evaluate", "evaluate.checkpoint"),
        ("translate", "translate.checkpoint"),
        ("translate", "averaged.ckpt"),
        ("attention", "averaged.ckpt"),
    ],
)
def test_no_command_runs_a_crafted_checkpoint(
    command: str, placement: str, hand_made_run: dict, tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A crafted file placed where each command looks (a run's step checkpoint, its averaged.ckpt) or named by
    evaluate.checkpoint / translate.checkpoint: the command exits 1 with the one-line refusal, the code never ran."""
    run = tmp_path / "run"
    shutil.copytree(hand_made_run["run"], run)
    (run / "averaged.ckpt").unlink(missing_ok=True)
    marker = tmp_path / "ran"
    argv = [command, *tiny["overrides"], f"run.dir={run}", "logger.wandb.enabled=false"]
    if placement.endswith(".checkpoint"):
        argv.append(f"{placement}={_crafted(tmp_path / 'given.ckpt', marker)}")
    else:
        _crafted(run / placement, marker)
    if command == "translate":
        source = tmp_path / "in.txt"
        source.write_text("A man is riding a bike.\n")
        argv.append(f"translate.input={source}")
    if command == "attention":
        argv.insert(1, "A man is riding a bike.")
    if command == "average":  # a step checkpoint that cannot be read is passed over, saying why
        cli.main(argv)
        out = capsys.readouterr().out
        assert "passing over step0009999.ckpt" in out and "refused, it holds more than weights" in out, out
    else:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 1, err
        assert "refused, it holds more than weights" in err and err.count("\n") == 1, err
    assert not marker.exists()
