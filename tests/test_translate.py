"""`aiayn translate` through the CLI entry (in-process), on the hand-made tiny run of tests/tiny_run.py.

The reference output is `aiayn evaluate`'s hypothesis file for the same test sentences: evaluate decodes the ids
that `aiayn prepare` wrote, translate the raw text it is given (cleaned and BPE-encoded by itself), so equal lines
show that translate prepares its input as training did, batches, decodes and orders it as evaluate does.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from pipeline import cli


class Terminal(io.StringIO):
    """Typed input: a stdin that is a TTY."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def run(hand_made_run: dict, tiny: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A run folder with only checkpoints/last.ckpt (the step-300 weights), evaluated on the 40 test sentences."""
    folder = tmp_path_factory.mktemp("translate") / "run"
    (folder / "checkpoints").mkdir(parents=True)
    checkpoint = folder / "checkpoints" / "last.ckpt"
    shutil.copy(hand_made_run["run"] / "checkpoints" / "step0000300.ckpt", checkpoint)
    overrides = [*tiny["overrides"], f"run.dir={folder}", "logger.wandb.enabled=false"]
    cli.main(["evaluate", *overrides])
    with gzip.open(tiny["corpora"] / "test_2016_flickr.en.gz", "rt", encoding="utf-8") as f:
        sources = [line.rstrip("\n") for line in f]
    source_file = folder / "test.en"
    source_file.write_text("".join(s + "\n" for s in sources), encoding="utf-8")
    hyps = (folder / "eval-test.hyp.txt").read_text(encoding="utf-8").splitlines()
    assert len(hyps) == len(sources) == 40 and len(set(hyps)) > 10  # varied output: the checks can tell lines apart
    return {
        "dir": folder,
        "checkpoint": checkpoint,
        "overrides": overrides,
        "sources": sources,
        "file": source_file,
        "hyps": hyps,
        "dataset_dir": Path(json.loads((folder / "eval-test.json").read_text())["dataset_dir"]),
    }


def test_translate_a_file_gives_what_evaluate_gives(run: dict, capsys: pytest.CaptureFixture) -> None:
    output = run["dir"] / "translated.de"
    # Smaller batches than evaluate's (4096 tokens: one batch): the order is restored all the same.
    cli.main(
        [
            "translate",
            *run["overrides"],
            f"translate.input={run['file']}",
            f"translate.output={output}",
            "translate.max_tokens=100",
        ]
    )
    assert output.read_text(encoding="utf-8").splitlines() == run["hyps"]
    assert capsys.readouterr().out == ""  # nothing else on stdout when the output goes to a file


def test_translate_stdin_piped_or_dash(run: dict, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    s, h = run["sources"], run["hyps"]
    # Piped stdin (not a TTY), translate.input unset: batch mode. An empty line stays an empty line. Extra spaces
    # and a control character are cleaned away as they were from the training text (data.clean).
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{s[0]}\n{s[1]}\n\n  {s[2]}\x07 \r\n"))
    cli.main(["translate", *run["overrides"]])
    assert capsys.readouterr().out.splitlines() == [h[0], h[1], "", h[2]]

    # translate.input=-: stdin even from a terminal, read to its end, no prompt. The model from
    # translate.checkpoint, without run.dir.
    monkeypatch.setattr(sys, "stdin", Terminal(f"{s[3]}\n{s[4]}\n"))
    overrides = [o for o in run["overrides"] if not o.startswith("run.dir=")]
    cli.main(["translate", *overrides, "translate.input=-", f"translate.checkpoint={run['checkpoint']}"])
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [h[3], h[4]] and "> " not in captured.err


def test_translate_interactive_prompt(run: dict, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    s, h = run["sources"], run["hyps"]
    monkeypatch.setattr(sys, "stdin", Terminal(f"{s[5]}\n{s[6]}\n"))
    cli.main(["translate", *run["overrides"]])
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [h[5], h[6]]
    assert captured.err.count("> ") == 3 and "Ctrl-D" in captured.err  # a prompt per line, and one at the end


def test_translate_nbest_and_greedy(run: dict, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    """translate.nbest=3: three `index TAB score TAB translation` lines per input line, best first, the first one
    the 1-best translation (evaluate's, beam 4); translate.beam=1: greedy search, as modules/search.py gives it for
    the same source ids."""
    from data import Tokenizer
    from modules.search import greedy_search
    from pipeline.inference import load_model

    s, h = run["sources"], run["hyps"]
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{s[7]}\n{s[8]}\n"))
    cli.main(["translate", *run["overrides"], "translate.nbest=3"])
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [row[0] for row in rows] == ["0"] * 3 + ["1"] * 3
    for index, mine in enumerate((rows[:3], rows[3:])):
        assert mine[0][2] == h[7 + index]
        scores = [float(row[1]) for row in mine]
        assert scores == sorted(scores, reverse=True) and all(score < 0 for score in scores)

    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{s[7]}\n{s[8]}\n"))
    cli.main(["translate", *run["overrides"], "translate.beam=1"])
    out = capsys.readouterr().out.splitlines()
    model, _ = load_model(run["checkpoint"])
    tokenizer = Tokenizer(run["dataset_dir"] / "spm.model")
    expected = []
    for sentence in s[7:9]:
        src = torch.tensor([[*tokenizer.encode([sentence])[0], tokenizer.eos_id]])  # (1, src_len)
        expected += tokenizer.decode(greedy_search(model, src, tokenizer.bos_id, tokenizer.eos_id, max_extra=50))
    assert out == expected


def _error(argv: list[str], capsys: pytest.CaptureFixture, code: int = 1) -> str:
    """The one line a failing command prints: exit 2 for a bad config value (checked before it starts, pipeline/
    validate.py), 1 for what it finds wrong once running (a missing file or run folder)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == code
    err = capsys.readouterr().err
    assert err.startswith("aiayn translate: ") and err.count("\n") == 1, err  # one line, no traceback
    return err


def test_translate_errors_name_the_key(run: dict, tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    err = _error(["translate", *tiny["overrides"]], capsys)
    assert "run.dir is not set and no translate.checkpoint" in err
    err = _error(["translate", *tiny["overrides"], f"run.dir={tmp_path / 'nowhere'}"], capsys)
    assert f"run.dir={tmp_path / 'nowhere'}: no such folder" in err
    err = _error(["translate", *tiny["overrides"], f"run.dir={tmp_path}"], capsys)
    assert "no averaged.ckpt and no checkpoints/last.ckpt" in err and "translate.checkpoint=<path>" in err
    err = _error(["translate", *run["overrides"], "translate.checkpoint=missing.ckpt"], capsys)
    assert f"translate.checkpoint=missing.ckpt: not found (also not in {run['dir']})" in err
    err = _error(["translate", *run["overrides"], f"translate.input={tmp_path / 'none.en'}"], capsys)
    assert f"translate.input={tmp_path / 'none.en'}: no such file" in err
    err = _error(["translate", *run["overrides"], f"translate.input={run['file']}", "translate.nbest=5"], capsys, 2)
    assert "translate.nbest=5" in err and "translate.beam=4" in err
