"""CPUDeepSpeedStrategy end to end: ZeRO 1, 2 and 3 on two CPU processes (gloo), bf16-mixed; the update's
loss normalization under DDP and DeepSpeed with the real TranslationModule; and `aiayn train` under ZeRO-3 with
translations at validation, resumed from a checkpoint.

One launch of 2 forked ranks (tests/forked.py) runs tests/ds_toy_run.py: per stage, train 16 steps with a
checkpoint per epoch, resume a scrambled model from the first checkpoint, validate from the last; then one
update of the real model under DDP and under DeepSpeed ZeRO-2 with accumulation; then pipeline.train.main with
ZeRO-3, 2 steps and a validation that translates, and a second run resumed from its checkpoint. This file checks,
against references computed without DeepSpeed:

- both processes finish every stage and exit 0;
- the loss falls, on the full toy dataset, evaluated with the consolidated weights;
- both ranks hold the same fp32 master weights and the same bf16 module weights;
- DeepSpeed's own consolidation (get_fp32_state_dict_from_zero_checkpoint) gives fp32 tensors equal to the
  trained master weights, and the module's bf16 weights are exactly their rounding;
- the resumed run starts at global_step 8, ends at 16, and repeats the uninterrupted run's losses and weights;
- validation through the inference engine reports the loss the consolidated weights give;
- the three stages agree with each other (same arithmetic, only partitioned differently);
- the update's gradient is Σ ∇(summed loss) / (target tokens of the whole update), as one process computes it;
- under ZeRO-3, validation's greedy and beam translations (which run outside the engine's forward) are produced on
  both ranks, identical, and equal to what the checkpoint's consolidated weights translate in one process; so are
  the attention maps logged to W&B; the resumed run starts at the checkpoint's step.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import ds_toy_run
import forked
import pytest
import torch
from ds_toy_run import EPOCHS, STEPS_PER_EPOCH, mse, toy_dataset, toy_net

from data import prepare_dataset
from pipeline.config import load_config

STAGES = (1, 2, 3)
TINY_MODEL = ["model.n_layers=1", "model.d_model=32", "model.d_ff=64", "model.n_heads=2", "model.vocab_size=400"]
TIMEOUT_S = float(os.environ.get("AIAYN_DS_TEST_TIMEOUT", 1800))  # an upper bound for a loaded machine


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory, corpora_dir: Path) -> dict:
    """ONE launch of 2 ranks for every check, forked from this process (starting Python, torch and DeepSpeed
    again costs minutes on a loaded 2-core machine): ZeRO-1, -2 and -3 on the toy problem, then the
    update-normalization check."""
    out = tmp_path_factory.mktemp("deepspeed_cpu")
    overrides = [
        *TINY_MODEL,
        "model.dropout=0.0",
        "data=tiny",
        "data.max_tokens=96",
        f"paths.corpora_dir={corpora_dir}",
        f"paths.output_dir={out / 'outputs'}",
    ]
    prepare_dataset(load_config(overrides).data, out / "outputs")  # once, here: the ranks only read it
    # Imported here, once, before the ranks are forked: each rank would otherwise spend minutes importing them.
    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed  # noqa: F401

    from pipeline.strategies import _import_muon_uncompiled

    _import_muon_uncompiled()
    argv = ["--stages", *map(str, STAGES), "--out", str(out), "--overrides", *overrides]
    env = forked.clean_env(DS_ACCELERATOR="cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    codes = forked.wait_all(forked.torchrun_fork(ds_toy_run.main, (argv,), 2, out, env), TIMEOUT_S)
    logs = {r: (out / f"rank{r}.log").read_text() for r in (0, 1)}
    return {"codes": codes, "logs": logs, "out": out, "overrides": overrides}


def _ranks(folder: Path) -> list[dict | None]:
    return [torch.load(folder / f"rank{r}.pt") if (folder / f"rank{r}.pt").exists() else None for r in (0, 1)]


def _log(launch: dict) -> str:
    return "\n".join(f"--- rank {r}\n{log[-5000:]}" for r, log in launch["logs"].items())


def test_both_processes_finish_and_exit_cleanly(launch: dict) -> None:
    """Exit status 0 after every stage, with the process groups torn down: the forked ranks end with os._exit,
    so instead of the C++ abort ZeRO-3 gave at interpreter exit, tests/forked.py fails a rank whose world is
    still initialized when it ends (`torchrun ... tests/ds_toy_run.py --keep-process-group` shows the abort)."""
    assert launch["codes"] == [0, 0], _log(launch)
    for rank, log in launch["logs"].items():
        assert f"rank {rank} finished" in log, _log(launch)


def _consolidate(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir)))


def _net_with(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    net = toy_net()
    net.load_state_dict({k.removeprefix("net."): v for k, v in state.items()})
    return net


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, f"{what}: {k}"
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs by {(a[k].float() - b[k].float()).abs().max()}"


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_zero_stage_on_two_cpu_processes(launch: dict, stage: int) -> None:
    out = launch["out"] / f"zero{stage}"
    r0, r1 = _ranks(out)
    assert r0 is not None and r1 is not None, _log(launch)

    # Both ranks hold the same weights: the fp32 masters (gathered from the partitions) and the bf16 module.
    _assert_same(r0["fp32"], r1["fp32"], "fp32 master weights, rank 0 vs 1")
    _assert_same(r0["low"], r1["low"], "module weights, rank 0 vs 1")
    assert all(v.dtype == torch.float32 for v in r0["fp32"].values())
    assert all(v.dtype == torch.bfloat16 for v in r0["low"].values())
    _assert_same({k: v.bfloat16() for k, v in r0["fp32"].items()}, r0["low"], "bf16 module = rounded masters")

    # The checkpoints consolidate (DeepSpeed's zero_to_fp32) to exactly the trained fp32 master weights.
    final = _consolidate(out / "ckpt" / f"epoch={EPOCHS - 1}.ckpt")
    _assert_same(final, r0["fp32"], "consolidated final checkpoint vs trained masters")
    first = _consolidate(out / "ckpt" / "epoch=0.ckpt")
    assert not any(torch.equal(first[k], final[k]) for k in final), "the epoch-0 checkpoint holds later weights"

    # The loss falls: full-dataset MSE with the initial vs the consolidated weights (fp32, no DeepSpeed).
    data = toy_dataset()
    init_loss, final_loss = mse(_net_with(r0["init"]), data), mse(_net_with(final), data)
    assert final_loss < 0.35 * init_loss, (init_loss, final_loss)
    steps = EPOCHS * STEPS_PER_EPOCH
    for r in (r0, r1):
        assert r["global_step"] == steps and len(r["losses"]) == steps
        assert sum(r["losses"][-4:]) < 0.6 * sum(r["losses"][:4]), r["losses"]

    # Resume: a scrambled model restored from the epoch-0 checkpoint continues at step 8 and replays epoch 1.
    for r in (r0, r1):
        assert r["resume_start_step"] == STEPS_PER_EPOCH
        assert r["resume_global_step"] == steps
        torch.testing.assert_close(r["resume_losses"], r["losses"][STEPS_PER_EPOCH:], rtol=0, atol=1e-6)
    for k in final:
        torch.testing.assert_close(r0["resume_fp32"][k], final[k], rtol=0, atol=1e-6)
    resumed = _consolidate(out / "ckpt_resume" / f"epoch={EPOCHS - 1}.ckpt")
    for k in final:
        torch.testing.assert_close(resumed[k], final[k], rtol=0, atol=1e-6)

    # validate() through the inference engine from the final checkpoint: the loss of those weights, in bf16.
    bf16_loss = mse(_net_with(r0["low"]).bfloat16(), data)
    assert r0["val_loss"] == pytest.approx(r1["val_loss"], abs=1e-6)
    assert r0["val_loss"] == pytest.approx(bf16_loss, rel=0.03), (r0["val_loss"], bf16_loss, final_loss)


@pytest.mark.slow
def test_zero_stages_agree(launch: dict) -> None:
    """Partitioning changes where the arithmetic happens, not its result."""
    results = [_ranks(launch["out"] / f"zero{stage}")[0] for stage in STAGES]
    assert all(r is not None for r in results), "a stage's run failed (see its own test)"
    reference = results[0]
    for stage, r in zip(STAGES[1:], results[1:], strict=True):
        torch.testing.assert_close(r["losses"], reference["losses"], rtol=0, atol=2e-2, msg=f"stage {stage}")
        for k in reference["fp32"]:
            torch.testing.assert_close(r["fp32"][k], reference["fp32"][k], rtol=0, atol=2e-2, msg=f"stage {stage}")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_update_loss_is_normalized_by_all_its_tokens(launch: dict, strategy: str) -> None:
    """2 ranks (DDP: 1 micro-batch each; DeepSpeed ZeRO-2: 2 accumulated each) give the gradient of ONE process
    over all the update's batches, summed loss / all their target tokens (computed by each rank by hand)."""
    ranks = _ranks(launch["out"] / f"normalization-{strategy}")
    assert all(r is not None for r in ranks), _log(launch)
    for r in ranks:
        assert len(set(r["batch_sizes"])) > 1  # micro-batches of different sizes: a mean of means would differ
        if strategy == "deepspeed":
            assert int(r["grads"].pop("__engine_accumulation")) == 2  # the accumulation reached DeepSpeed
        assert r["grads"].keys() == r["expected"].keys()
        for name, grad in r["grads"].items():
            torch.testing.assert_close(grad, r["expected"][name], rtol=1e-4, atol=1e-6, msg=f"{strategy}: {name}")


def _translate_with(checkpoint: Path, overrides: list[str], sources: list[str], beam: int) -> list[str]:
    """`sources` translated in this process, without DeepSpeed, by the consolidated weights of a ZeRO-3
    checkpoint rounded to bf16 (the module's weights under DeepSpeed's bf16); beam 1 is greedy search."""
    from omegaconf import OmegaConf

    from data import TranslationDataModule
    from modules.lightning import TranslationModule

    cfg = load_config(overrides)
    module = TranslationModule(
        model=OmegaConf.to_container(cfg.model, resolve=True), optim=OmegaConf.to_container(cfg.optim, resolve=True)
    )
    module.load_state_dict(_consolidate(checkpoint))
    module.bfloat16()
    datamodule = TranslationDataModule(cfg.data, cfg.paths.output_dir)
    datamodule.setup("validate")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the ranks (OMP_NUM_THREADS=1): the same sums in the same order
    try:
        return module.translate(sources, datamodule.tokenizer, beam=beam, alpha=cfg.evaluate.alpha)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_zero3_translates_at_validation_and_resumes(launch: dict) -> None:
    """`aiayn train strategy=deepspeed strategy.stage=3` (pipeline.train.main) on 2 ranks, issue 17: validation
    translates and reads attention maps outside the engine's forward, where each rank holds an empty partition of
    every parameter unless they are gathered (TranslationModule.full_parameters). Run A: 2 steps, a checkpoint,
    greedy translations and W&B attention images at step 2; run B: resumed from that checkpoint to step 4,
    beam-2 translations at step 4."""
    from wandb_records import offline_runs

    from modules.attention_maps import KINDS

    out = launch["out"] / "zero3-translation"
    ranks = _ranks(out)
    assert all(r is not None for r in ranks), _log(launch)
    for r in ranks:
        assert [v["step"] for v in r["validations"]] == [2, 4], r["validations"]
        assert all(len(v["samples"]) == 2 for v in r["validations"])  # run.n_samples=2
        assert "val/bleu" in r["a"] and "val/bleu" in r["b"]  # logged only when translations came back
        assert r["a"]["train/grad_norm"] > 0  # from the engine: ZeRO leaves every p.grad empty
        assert (r["a"]["start_step"], r["a"]["steps"]) == (0, 2)
        assert (r["b"]["resumed_from"], r["b"]["start_step"], r["b"]["steps"]) == (r["checkpoint"], 2, 4)
    # Both ranks decoded with the same whole weights: the checkpoints' (saved at the step, before validation).
    assert ranks[0]["validations"] == ranks[1]["validations"]
    for validation, run, beam in zip(ranks[0]["validations"], ("a", "b"), (1, 2), strict=True):
        sources = [src for src, _, _ in validation["samples"]]
        checkpoint = out / run / "checkpoints" / f"step{validation['step']:07d}.ckpt"
        expected = _translate_with(checkpoint, launch["overrides"], sources, beam)
        assert [hyp for _, _, hyp in validation["samples"]] == expected, f"run {run}, step {validation['step']}"

    (wandb_run,) = offline_runs(out / "a")  # rank 0's; both ranks read the attention (a collective under ZeRO-3)
    for kind in KINDS:
        rows = [row for row in wandb_run.history if f"val/attention/{kind}" in row]
        assert [row["trainer/global_step"] for row in rows] == [2], kind
        assert rows[0][f"val/attention/{kind}"]["count"] == 1  # one image per layer: model.n_layers=1
