"""`aiayn evaluate evaluate.tune.enabled=true` (pipeline/tuning.py): beam and α chosen on the validation split, then
the test split translated with the best setting, on the tiny hand-made run (tests/tiny_run.py).

References are independent of the code under test: each setting's translations come from translating the raw
validation sentences with TranslationModule.translate, scored with sacrebleu's corpus_bleu / corpus_chrf; the best
is the argmax of those scores.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
import sacrebleu

from data import Tokenizer
from modules.lightning import TranslationModule
from pipeline import cli

GRID = {"beams": [1, 3], "alphas": [0.0, 0.6, 3.0]}


def _lines(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def test_tuning_picks_the_best_setting_on_valid_and_scores_test_with_it(
    hand_made_run: dict, tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    shutil.copytree(hand_made_run["run"], run)  # other tests read the shared run's eval files
    beams, alphas = GRID["beams"], GRID["alphas"]
    overrides = [*tiny["overrides"], f"run.dir={run}", "logger.wandb.enabled=false", "evaluate.max_tokens=200"]
    overrides += [f"evaluate.tune.beams=[{','.join(map(str, beams))}]", f"evaluate.tune.alphas={alphas}"]
    cli.main(["evaluate", *overrides, "evaluate.tune.enabled=true", "evaluate.tune.metric=chrf"])
    out = capsys.readouterr().out
    result = json.loads((run / "eval-test.json").read_text())
    tuning = result["tuning"]

    # The reference: every setting of the grid (greedy once: it has no α) on the raw validation sentences.
    module = TranslationModule.load_from_checkpoint(run / "checkpoints" / "last.ckpt", map_location="cpu")
    tokenizer = Tokenizer(Path(result["dataset_dir"]) / "spm.model")
    sources = _lines(tiny["corpora"] / "test_2016_flickr.en.gz")  # data=tiny's valid split (and its test split)
    references = _lines(tiny["corpora"] / "test_2016_flickr.de.gz")
    settings = [(1, 0.0)] + [(3, alpha) for alpha in alphas]
    expected = []
    for beam, alpha in settings:
        hyps = module.translate(sources, tokenizer, beam=beam, alpha=alpha)
        bleu = sacrebleu.corpus_bleu(hyps, [references])
        expected.append(
            {
                "beam": beam,
                "alpha": alpha,
                "bleu": round(bleu.score, 4),
                "chrf": round(sacrebleu.corpus_chrf(hyps, [references]).score, 4),
                "length_ratio": round(bleu.sys_len / bleu.ref_len, 4),
            }
        )
    assert tuning["split"] == "valid" and tuning["metric"] == "chrf"
    assert tuning["grid"] == expected
    # α changes what is found here, so the choice below is a real one.
    assert len({row["length_ratio"] for row in expected[1:]}) > 1, expected
    best = max(range(len(expected)), key=lambda i: (expected[i]["chrf"], -i))
    assert tuning["best"] == {"beam": settings[best][0], "alpha": settings[best][1]}

    # The test split is translated with the best setting, as evaluate.beam / evaluate.alpha set to it would do.
    chosen = result["decoding"]
    assert (chosen.get("beam", 1), chosen.get("alpha", 0.0)) == settings[best]
    assert "<- best" in out and "best on valid: " in out
    tuned_hyps = (run / "eval-test.hyp.txt").read_text(encoding="utf-8").splitlines()
    plain = ["evaluate.tune.enabled=false", f"evaluate.beam={settings[best][0]}", f"evaluate.alpha={settings[best][1]}"]
    cli.main(["evaluate", *overrides, *plain])
    assert (run / "eval-test.hyp.txt").read_text(encoding="utf-8").splitlines() == tuned_hyps
    assert "tuning" not in json.loads((run / "eval-test.json").read_text())
    capsys.readouterr()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("evaluate.tune.split=test", "evaluate.tune.split=test: is the split being scored"),
        ("evaluate.tune.alphas=[]", "evaluate.tune.alphas=[]: out of range; set evaluate.tune.alphas to a non-empty"),
        ("evaluate.tune.beams=[0,4]", "evaluate.tune.beams=[0, 4]: out of range"),
        ("evaluate.nbest=3", "evaluate.nbest=3: more hypotheses than the smallest tuned beam keeps"),
        ("evaluate.tune.metric=ter", "evaluate.tune.metric=ter: not one of bleu, chrf"),
    ],
)
def test_a_tuning_setting_that_cannot_run_is_refused_in_one_line(
    hand_made_run: dict, tiny: dict, capsys: pytest.CaptureFixture, override: str, message: str
) -> None:
    overrides = [*tiny["overrides"], f"run.dir={hand_made_run['run']}", "evaluate.tune.enabled=true"]
    overrides += ["evaluate.tune.beams=[2,4]", "evaluate.beam=4"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["evaluate", *overrides, override])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
