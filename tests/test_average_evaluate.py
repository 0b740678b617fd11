"""`aiayn average` and `aiayn evaluate` (section 6.1) on a tiny model: checkpoints are made by hand (distinct
random weights saved in Lightning's checkpoint layout) instead of trained, and data=tiny is cut to 40 test pairs.

References are independent of the code under test: the mean is torch.stack(...).mean(0) over the checkpoints'
own tensors; BLEU and chrF come from sacrebleu's command line on the files evaluate wrote; the hypotheses from
translating raw sentences one at a time with TranslationModule.translate; the references from the corpus file.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import forked
import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from data import prepare_dataset
from modules.lightning import TranslationModule
from pipeline import cli
from pipeline.average import average_run
from pipeline.config import load_config
from pipeline.errors import RunFolderError

TINY_MODEL = ["model.n_layers=2", "model.d_model=64", "model.d_ff=128", "model.n_heads=4", "model.vocab_size=400"]
N_TEST = 40
STEPS = (100, 200, 300)  # global steps the hand-made checkpoints claim
SNAPSHOT_EVERY = 20  # Adam steps between them


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, corpora_dir: Path) -> dict:
    """data=tiny (Multi30k val as training text) with its test split cut to the first N_TEST pairs, prepared."""
    root = tmp_path_factory.mktemp("average_evaluate")
    corpora = root / "corpora" / "multi30k"
    corpora.mkdir(parents=True)
    for lang in ("en", "de"):
        shutil.copy(corpora_dir / "multi30k" / f"val.{lang}.gz", corpora / f"val.{lang}.gz")
        with gzip.open(corpora_dir / "multi30k" / f"test_2016_flickr.{lang}.gz", "rt", encoding="utf-8") as f:
            lines = [next(f) for _ in range(N_TEST)]
        with gzip.open(corpora / f"test_2016_flickr.{lang}.gz", "wt", encoding="utf-8") as f:
            f.writelines(lines)
    overrides = [*TINY_MODEL, "data=tiny", f"paths.corpora_dir={corpora.parent}", f"paths.output_dir={root / 'out'}"]
    cfg = load_config(overrides)
    prepare_dataset(cfg.data, root / "out")
    return {"root": root, "overrides": overrides, "cfg": cfg, "corpora": corpora}


def _module(cfg, seed: int) -> TranslationModule:
    torch.manual_seed(seed)
    return TranslationModule(
        model=OmegaConf.to_container(cfg.model, resolve=True), optim=OmegaConf.to_container(cfg.optim, resolve=True)
    )


def _save(module: TranslationModule, step: int, path: Path) -> None:
    """The entries Lightning's checkpoint holds that averaging and evaluation read (no optimizer/loop states)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {
        "epoch": 0,
        "global_step": step,
        "pytorch-lightning_version": L.__version__,
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
    }
    torch.save(checkpoint, path)


@pytest.fixture(scope="module")
def hand_made_run(tiny: dict) -> dict:
    """A run folder as `aiayn train` leaves it: step checkpoints at STEPS and last.ckpt, a copy of the newest.

    The weights are snapshots of a short fit (SNAPSHOT_EVERY Adam steps apart, on the tiny training split), so
    that the model translates into varied, scoreable German rather than one repeated token.
    """
    from data import ShardedPairs, collate_pairs
    from data.prepare import dataset_dir_for

    run = tiny["root"] / "run"
    module = _module(tiny["cfg"], 0)
    train_pairs = ShardedPairs(dataset_dir_for(tiny["cfg"].data, tiny["root"] / "out"), "train")
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3, betas=(0.9, 0.98), eps=1e-9)
    generator = torch.Generator().manual_seed(0)
    states = {}
    for step in range(1, len(STEPS) * SNAPSHOT_EVERY + 1):
        indices = torch.randint(len(train_pairs), (32,), generator=generator).tolist()
        batch = collate_pairs([train_pairs[i] for i in indices], pad_id=0, bos_id=2, eos_id=3)
        loss_sum, _ = module.criterion(module(batch["src"], batch["tgt_in"]), batch["tgt_out"])
        optimizer.zero_grad()
        (loss_sum / batch["n_tgt_tokens"]).backward()
        optimizer.step()
        if step % SNAPSHOT_EVERY == 0:
            global_step = STEPS[step // SNAPSHOT_EVERY - 1]
            _save(module, global_step, run / "checkpoints" / f"step{global_step:07d}.ckpt")
            states[global_step] = {k: v.detach().clone() for k, v in module.state_dict().items()}
    shutil.copy(run / "checkpoints" / f"step{STEPS[-1]:07d}.ckpt", run / "checkpoints" / "last.ckpt")
    return {"run": run, "states": states}


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
    assert saved["global_step"] == 300 and saved["hyper_parameters"] == dict(_module(tiny["cfg"], 0).hparams)
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
    newest = _module(tiny["cfg"], 3)
    _save(newest, 400, run / "checkpoints" / "last.ckpt")
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


def _sacrebleu_cli(ref: Path, hyp: Path) -> dict[str, float]:
    """sacrebleu's own command line on the files: {"BLEU": score, "chrF2": score}, 4 decimals."""
    cmd = [sys.executable, "-m", "sacrebleu", str(ref), "-i", str(hyp), "-m", "bleu", "chrf", "-w", "4"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return {entry["name"]: entry["score"] for entry in json.loads(out)}


def test_evaluate_scores_like_the_sacrebleu_command_line(
    hand_made_run: dict, tiny: dict, capsys: pytest.CaptureFixture
) -> None:
    run = hand_made_run["run"]
    overrides = [*tiny["overrides"], f"run.dir={run}", "average.last_n=3", "evaluate.max_tokens=200"]
    cli.main(["average", *overrides])
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(run / "averaged.ckpt")
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

    # evaluate.nbest=3: each sentence's 3 best, best first, in eval-test.nbest.txt; the first is the hypothesis.
    cli.main(["evaluate", *overrides, "evaluate.nbest=3"])
    result = json.loads((run / "eval-test.json").read_text())
    assert result["decoding"]["nbest"] == 3 and result["files"]["nbest"] == "eval-test.nbest.txt"
    rows = [line.split("\t") for line in (run / "eval-test.nbest.txt").read_text(encoding="utf-8").splitlines()]
    hyps = hyp_file.read_text(encoding="utf-8").splitlines()
    for i in range(N_TEST):
        mine = [row for row in rows if row[0] == str(i)]
        assert len(mine) == 3 and mine[0][3] == hyps[i]
        scores = [float(row[1]) for row in mine]
        assert scores == sorted(scores, reverse=True) and all(float(row[2]) <= float(row[1]) for row in mine)
    assert [int(row[0]) for row in rows] == sorted(int(row[0]) for row in rows)
    cli.main(["evaluate", *overrides])  # back to nbest=1: the n-best list of another decoding is removed
    assert not (run / "eval-test.nbest.txt").exists()
    capsys.readouterr()


def test_evaluate_without_a_checkpoint_says_what_to_do(tiny: dict, capsys: pytest.CaptureFixture) -> None:
    run = tiny["root"] / "untrained"
    run.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["evaluate", *tiny["overrides"], f"run.dir={run}"])
    assert exit_info.value.code == 1
    assert "no averaged.ckpt and no checkpoints/last.ckpt" in capsys.readouterr().err


def _deepspeed_fit(overrides: list[str], run: Path, dataset_root: Path) -> None:
    """`aiayn train`'s trainer on a fresh module; the fitted weights -> run/trained.pt. Runs in a forked child:
    DeepSpeed keeps its process groups in module globals, which a later DeepSpeed world in this process would
    inherit (tests/test_deepspeed_cpu.py forks its ranks from here)."""
    from data import TranslationDataModule
    from pipeline import train

    cfg = load_config(overrides)
    L.seed_everything(cfg.seed)
    module = TranslationModule(
        model=OmegaConf.to_container(cfg.model, resolve=True), optim=OmegaConf.to_container(cfg.optim, resolve=True)
    )
    trainer = train.build_trainer(cfg, run)
    trainer.fit(module, datamodule=TranslationDataModule(cfg.data, dataset_root, seed=cfg.seed))
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
    world = forked.torchrun_fork(_deepspeed_fit, ([*tiny["overrides"], *overrides], run, tiny["root"] / "out"), 1, run)
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
