"""`aiayn average` and `aiayn evaluate` (section 6.1) on a tiny model: checkpoints are made by hand (distinct
random weights saved in Lightning's checkpoint layout) instead of trained, and data=tiny is cut to 40 test pairs.

References are independent of the code under test: the mean is torch.stack(...).mean(0) over the checkpoints'
own tensors; BLEU and chrF come from sacrebleu's command line (its entry point, run in a forked process) on the
files evaluate wrote; the hypotheses from translating raw sentences one at a time with
TranslationModule.translate; the references from the corpus file.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import forked
import pytest
import torch
from tiny_run import N_TEST, STEPS, new_module, save_checkpoint
from wandb_records import OfflineRun

from modules.lightning import TranslationModule
from pipeline import cli
from pipeline.average import average_run
from pipeline.config import load_config
from pipeline.errors import RunFolderError


def _mean(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([s[k] for s in states]).mean(dim=0) for k in states[0]}


def _averaged(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_average_is_the_mean_of_the_newest_checkpoints(hand_made_run: dict, tiny: dict) -> None:
    run, states = hand_made_run["run"], hand_made_run["states"]
    logs: list[str] = []

    # last_n=5 with 3 step checkpoints + last.ckpt (a copy of step 300): the mean of exactly the 3, and it says so.
    target = average_run(run, last_n=5, log=logs.append)
    assert target == run / "averaged.ckpt" and target.is_file()
    assert any("average.last_n=5" in line and "holds 3" in line for line in logs), logs
    saved = _averaged(target)
    expected = _mean([states[s] for s in STEPS])
    assert saved["state_dict"].keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(saved["state_dict"][k], v, rtol=1e-6, atol=1e-7, msg=k)
    # last.ckpt counted once: the step-300 weights weigh 1/3, not 1/2
    assert saved["averaged_from"] == [{"name": f"step{s:07d}.ckpt", "global_step": s} for s in STEPS]
    assert saved["global_step"] == 300 and saved["hyper_parameters"] == dict(new_module(tiny["cfg"], 0).hparams)
    # the tied embeddings (section 3.4) are still one tensor, and Lightning rebuilds the model from the file alone
    sd = saved["state_dict"]
    assert sd["model.encoder.embedding.weight"].data_ptr() == sd["model.decoder.embedding.weight"].data_ptr()
    module = TranslationModule.load_from_checkpoint(target, map_location="cpu")
    torch.testing.assert_close(
        module.state_dict()["model.decoder.layers.1.ffn.w_2.weight"],
        expected["model.decoder.layers.1.ffn.w_2.weight"],
        rtol=1e-6,
        atol=1e-7,
    )

    # Nothing new: "up to date", the file is not rewritten.
    logs.clear()
    mtime = target.stat().st_mtime_ns
    average_run(run, last_n=5, log=logs.append)
    assert logs and logs[0].startswith("up to date") and target.stat().st_mtime_ns == mtime

    # last_n=2: another checkpoint list, so it is averaged again, from the newest two.
    average_run(run, last_n=2, log=logs.append)
    saved = _averaged(target)
    assert [r["global_step"] for r in saved["averaged_from"]] == [200, 300]
    for k, v in _mean([states[200], states[300]]).items():
        torch.testing.assert_close(saved["state_dict"][k], v, rtol=1e-6, atol=1e-7, msg=k)

    # A newer checkpoint arrives (last.ckpt now holds step 400 and no step file does): it counts.
    newest = new_module(tiny["cfg"], 3)
    save_checkpoint(newest, 400, run / "checkpoints" / "last.ckpt")
    average_run(run, last_n=2, log=logs.append)
    saved = _averaged(target)
    assert [r["name"] for r in saved["averaged_from"]] == ["step0000300.ckpt", "last.ckpt"]
    for k, v in _mean([states[300], newest.state_dict()]).items():
        torch.testing.assert_close(saved["state_dict"][k], v, rtol=1e-6, atol=1e-7, msg=k)
    shutil.copy(run / "checkpoints" / f"step{STEPS[-1]:07d}.ckpt", run / "checkpoints" / "last.ckpt")  # restore
    assert not list(run.glob(".averaged.ckpt.tmp*"))  # written under a temporary name, then renamed


def test_average_without_run_dir_names_the_key(tiny: dict, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["average", *tiny["overrides"]])
    assert exit_info.value.code == 1
    assert "run.dir is not set" in capsys.readouterr().err
    with pytest.raises(RunFolderError, match="no checkpoints folder"):
        average_run(tiny["root"] / "empty", last_n=5)


def _sacrebleu_main(argv: list[str], out: Path) -> None:
    """In a forked child: sacrebleu's command-line entry point (what the `sacrebleu` command runs) with argv, its
    stdout into `out`."""
    import os

    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.close(fd)
    sys.argv = ["sacrebleu", *argv]
    from sacrebleu.sacrebleu import main

    main()  # ends with sys.exit(0)


def _sacrebleu_command_line(argv: list[str], folder: Path) -> list[dict] | dict:
    """The JSON `sacrebleu <argv>` prints, run by sacrebleu's own command-line code in a process forked from this
    one (tests/forked.py: no new interpreter to start)."""
    out, log = folder / "sacrebleu.json", folder / "sacrebleu.log"
    (code,) = forked.wait_all([forked.Child(_sacrebleu_main, (argv, out), forked.clean_env(), log)], timeout=300)
    assert code == 0, log.read_text()
    return json.loads(out.read_text())


def _sacrebleu_cli(ref: Path, hyp: Path) -> dict[str, float]:
    """`sacrebleu ref -i hyp -m bleu chrf -w 4` on the files: {"BLEU": score, "chrF2": score}."""
    out = _sacrebleu_command_line([str(ref), "-i", str(hyp), "-m", "bleu", "chrf", "-w", "4"], ref.parent)
    return {entry["name"]: entry["score"] for entry in out}


def _get_ende_bleu(ref: Path, hyp: Path) -> dict:
    """tensor2tensor's get_ende_bleu.sh: tokenizer.perl -l de (sacremoses), the perl one-liner that splits
    compounds, multi-bleu.perl (sacrebleu's command line, no tokenization, no smoothing): its JSON, 4 decimals."""
    from sacremoses import MosesTokenizer

    moses = MosesTokenizer(lang="de")
    for path in (ref, hyp):
        lines = path.read_text(encoding="utf-8").splitlines()
        tokenized = "".join(moses.tokenize(line, return_str=True, escape=True) + "\n" for line in lines)
        perl = ["perl", "-ple", r"s{(\S)-(\S)}{$1 ##AT##-##AT## $2}g"]
        split = subprocess.run(perl, input=tokenized.encode(), capture_output=True, check=True).stdout
        path.with_suffix(".atat").write_bytes(split)
    argv = [str(ref.with_suffix(".atat")), "-i", str(hyp.with_suffix(".atat"))]
    out = _sacrebleu_command_line([*argv, "-m", "bleu", "-tok", "none", "-s", "none", "--force", "-w", "4"], ref.parent)
    return out[0] if isinstance(out, list) else out


def test_evaluate_scores_like_the_sacrebleu_command_line(
    hand_made_run: dict, tiny: dict, capsys: pytest.CaptureFixture
) -> None:
    run = hand_made_run["run"]
    overrides = [*tiny["overrides"], f"run.dir={run}", "average.last_n=3", "evaluate.max_tokens=200"]
    cli.main(["average", *overrides])
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(run / "averaged.ckpt")
    # The training run's W&B run, as an online or offline run leaves it in the run folder (W&B is offline here).
    (run / "wandb" / "offline-run-20250101_120000-trained-run-id").mkdir(parents=True)
    cli.main(["evaluate", *overrides])
    out = capsys.readouterr().out
    result = json.loads((run / "eval-test.json").read_text())
    hyp_file, ref_file = run / result["files"]["hyp"], run / result["files"]["ref"]

    # The references are the raw test lines; the model used is averaged.ckpt (the default when it exists).
    with gzip.open(tiny["corpora"] / "test_2016_flickr.de.gz", "rt", encoding="utf-8") as f:
        assert ref_file.read_text(encoding="utf-8") == f.read()
    assert result["checkpoint"] == str(run / "averaged.ckpt") and result["sentences"] == N_TEST
    # Section 6.1's decoding, from conf/config.yaml: beam 4, length penalty 0.6, output up to input length + 50.
    decoding = {k: result["decoding"][k] for k in ("search", "beam", "alpha", "max_extra", "nbest")}
    assert decoding == {"search": "beam", "beam": 4, "alpha": 0.6, "max_extra": 50, "nbest": 1}
    assert "nbest" not in result["files"] and not (run / "eval-test.nbest.txt").exists()
    assert result["global_step"] == 300 and len(result["averaged_from"]) == 3

    # Scores as sacrebleu's command line computes them from the written files, signatures printed and saved.
    cli_scores = _sacrebleu_cli(ref_file, hyp_file)
    assert round(result["bleu"], 4) == cli_scores["BLEU"] and round(result["chrf"], 4) == cli_scores["chrF2"]
    assert result["chrf"] > 0
    for signature in result["signatures"].values():
        assert signature in out and "version:2.6.0" in signature
    assert "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp" in result["signatures"]["bleu"]

    # The paper's tokenized BLEU: get_ende_bleu.sh's steps done here independently (Moses tokenization, perl's
    # compound splitting, sacrebleu's command line on the tokens with multi-bleu.perl's settings).
    reference = _get_ende_bleu(ref_file, hyp_file)
    assert round(result["tok_bleu"], 4) == reference["score"]
    # and the statistics behind it, n-gram precisions and token counts (a little-trained model may match no 4-gram,
    # and without smoothing BLEU is then 0 on both sides):
    ours = re.search(
        r"([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) \(BP=.*hyp_len=(\d+), ref_len=(\d+)\)", result["tok_bleu_text"]
    )
    theirs = re.search(
        r"([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) \(BP = .*hyp_len = (\d+) ref_len = (\d+)\)", reference["verbose_score"]
    )
    assert ours.groups() == theirs.groups() and float(ours[1]) > 0, (result["tok_bleu_text"], reference)
    assert f"(the paper's, get_ende_bleu.sh): {result['tok_bleu_text']}" in out

    # The scores are in the W&B summary of the training run (found in the run folder), reopened.
    folders = sorted((run / "wandb").glob("offline-run-*"))
    (scores,) = [OfflineRun.read(folder) for folder in folders if any(folder.glob("*.wandb"))]
    assert scores.run_id == "trained-run-id" and scores.resume
    assert "W&B: test/* scores in the summary of run trained-run-id" in out
    for key in ("bleu", "chrf", "tok_bleu", "sentences", "global_step"):
        assert scores.summary[f"test/{key}"] == result[key], key
    assert scores.summary["test/signature/tok_bleu"] == result["signatures"]["tok_bleu"]
    assert scores.summary["test/checkpoint"] == "averaged.ckpt" and scores.summary["test/translate_seconds"] > 0

    # Batched, length-sorted decoding gives each sentence what beam-decoding it alone from its raw text gives,
    # in the file's order, detokenized by SentencePiece.
    module = TranslationModule.load_from_checkpoint(run / "averaged.ckpt", map_location="cpu")
    from data import Tokenizer

    dataset_dir = Path(result["dataset_dir"])
    tokenizer = Tokenizer(dataset_dir / "spm.model")
    with gzip.open(tiny["corpora"] / "test_2016_flickr.en.gz", "rt", encoding="utf-8") as f:
        sources = [line.rstrip("\n") for line in f]
    hyps = hyp_file.read_text(encoding="utf-8").splitlines()
    assert len(hyps) == N_TEST
    assert hyps[:8] == [module.translate([s], tokenizer, beam=4, alpha=0.6)[0] for s in sources[:8]]
    assert len({len(h) for h in hyps}) > 1  # not one repeated string: the check above can tell sentences apart

    # evaluate.nbest=3: each sentence's 3 best, best first, in eval-test.nbest.txt; the first is the hypothesis,
    # the same as with nbest=1 (a search kept going for more finished hypotheses finds none better than the best).
    no_wandb = "logger.wandb.enabled=false"
    cli.main(["evaluate", *overrides, "evaluate.nbest=3", no_wandb])
    result = json.loads((run / "eval-test.json").read_text())
    assert result["decoding"]["nbest"] == 3 and result["files"]["nbest"] == "eval-test.nbest.txt"
    rows = [line.split("\t") for line in (run / "eval-test.nbest.txt").read_text(encoding="utf-8").splitlines()]
    assert hyp_file.read_text(encoding="utf-8").splitlines() == hyps
    for i in range(N_TEST):
        mine = [row for row in rows if row[0] == str(i)]
        assert len(mine) == 3 and mine[0][3] == hyps[i]
        scores = [float(row[1]) for row in mine]
        assert scores == sorted(scores, reverse=True) and all(float(row[2]) <= float(row[1]) for row in mine)
    assert [int(row[0]) for row in rows] == sorted(int(row[0]) for row in rows)

    # evaluate.beam=1 is greedy search (TranslationModule.translate's greedy_search); the n-best list of the
    # earlier decoding is removed.
    cli.main(["evaluate", *overrides, "evaluate.beam=1", no_wandb])
    result = json.loads((run / "eval-test.json").read_text())
    decoding = {"search": "greedy", "max_extra": 50, "max_tokens": 200, "device": "cpu", "precision": "32-true"}
    assert result["decoding"] == decoding
    assert not (run / "eval-test.nbest.txt").exists()
    greedy = hyp_file.read_text(encoding="utf-8").splitlines()
    assert greedy[:4] == [module.translate([s], tokenizer, beam=1)[0] for s in sources[:4]]
    assert greedy != hyps  # beam search found other translations: the checks above can tell the two apart
    capsys.readouterr()


def test_evaluate_without_a_checkpoint_says_what_to_do(tiny: dict, capsys: pytest.CaptureFixture) -> None:
    run = tiny["root"] / "untrained"
    run.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["evaluate", *tiny["overrides"], f"run.dir={run}"])
    assert exit_info.value.code == 1
    assert "no averaged.ckpt and no checkpoints/last.ckpt" in capsys.readouterr().err


def _deepspeed_fit(overrides: list[str], run: Path) -> None:
    """`aiayn train`'s trainer on a fresh module; the fitted weights -> run/trained.pt. Runs in a forked child:
    DeepSpeed keeps its process groups in module globals, which a later DeepSpeed world in this process would
    inherit (tests/test_deepspeed_cpu.py forks its ranks from here)."""
    from pipeline import train

    parts = train.build_run(load_config(overrides), directory=run)
    module = parts.module
    parts.trainer.fit(module, datamodule=parts.datamodule)
    torch.save({"state_dict": module.state_dict(), "model": dict(module.hparams["model"])}, run / "trained.pt")
    torch.distributed.destroy_process_group()  # as pipeline/train.py does after fit


def test_average_consolidates_deepspeed_checkpoint_folders(tiny: dict) -> None:
    """A real ZeRO-2 fit (1 CPU process, fp32, 3 steps, a checkpoint folder per step, as `aiayn train
    strategy=deepspeed` writes them): the folders are consolidated and averaged; the newest alone gives exactly
    the weights the fit ended with, and last.ckpt (a folder too) is not counted twice."""
    run = tiny["root"] / "ds_run"
    run.mkdir()
    overrides = ["strategy=deepspeed", "strategy.stage=2", "trainer.precision=32-true", "trainer.max_steps=3"]
    overrides += ["checkpoint.every_n_train_steps=1", "trainer.limit_val_batches=0", "logger.wandb.enabled=false"]
    overrides += ["trainer.enable_progress_bar=false", "run.n_samples=0"]
    world = forked.torchrun_fork(_deepspeed_fit, ([*tiny["overrides"], *overrides], run), 1, run)
    codes = forked.wait_all(world, timeout=1800)
    assert codes == [0], (run / "rank0.log").read_text()[-5000:]
    fitted = torch.load(run / "trained.pt", weights_only=True)
    trained = fitted["state_dict"]
    folders = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert folders == ["last.ckpt", "step0000001.ckpt", "step0000002.ckpt", "step0000003.ckpt"]

    average_run(run, last_n=1)
    saved = _averaged(run / "averaged.ckpt")
    assert saved["averaged_from"] == [{"name": "step0000003.ckpt", "global_step": 3}]
    assert saved["hyper_parameters"]["model"] == fitted["model"]
    assert saved["state_dict"].keys() == trained.keys()
    for k, v in trained.items():
        assert saved["state_dict"][k].dtype == torch.float32
        torch.testing.assert_close(saved["state_dict"][k], v, rtol=0, atol=0, msg=k)

    # Two folders: the mean of what DeepSpeed's own consolidation gives for each.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    average_run(run, last_n=2)
    saved = _averaged(run / "averaged.ckpt")
    assert [r["name"] for r in saved["averaged_from"]] == ["step0000002.ckpt", "step0000003.ckpt"]
    consolidated = [get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints" / f)) for f in folders[2:]]
    assert not torch.equal(
        consolidated[0]["model.encoder.layers.0.ffn.w_1.weight"], trained["model.encoder.layers.0.ffn.w_1.weight"]
    )  # step 2 differs from step 3: the mean is not either
    for k, v in _mean(consolidated).items():
        torch.testing.assert_close(saved["state_dict"][k], v, rtol=1e-6, atol=1e-7, msg=k)
