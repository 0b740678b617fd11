"""CPUDeepSpeedStrategy end to end: ZeRO 1, 2 and 3 on two CPU processes (gloo), bf16-mixed; and the update's
loss normalization under DDP and DeepSpeed with the real TranslationModule.

One torchrun launch runs tests/ds_toy_run.py: per stage, train 16 steps with a checkpoint per epoch, resume a
scrambled model from the first checkpoint, validate from the last; then one update of the real model under DDP
and under DeepSpeed ZeRO-2 with accumulation. This file checks, against references computed without DeepSpeed:

- both processes exit 0 and nothing aborts at exit ("terminate called ..." on stderr);
- the loss falls, on the full toy dataset, evaluated with the consolidated weights;
- both ranks hold the same fp32 master weights and the same bf16 module weights;
- DeepSpeed's own consolidation (get_fp32_state_dict_from_zero_checkpoint) gives fp32 tensors equal to the
  trained master weights, and the module's bf16 weights are exactly their rounding;
- the resumed run starts at global_step 8, ends at 16, and repeats the uninterrupted run's losses and weights;
- validation through the inference engine reports the loss the consolidated weights give;
- the three stages agree with each other (same arithmetic, only partitioned differently);
- the update's gradient is Σ ∇(summed loss) / (target tokens of the whole update), as one process computes it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ds_toy_run import EPOCHS, STEPS_PER_EPOCH, mse, toy_dataset, toy_net

from data import prepare_dataset
from pipeline.config import load_config

PROJECT_ROOT = Path(__file__).resolve().parents[1]
HELPER = Path(__file__).with_name("ds_toy_run.py")
STAGES = (1, 2, 3)
TINY_MODEL = ["model.n_layers=1", "model.d_model=32", "model.d_ff=64", "model.n_heads=2", "model.vocab_size=400"]
TIMEOUT_S = float(os.environ.get("AIAYN_DS_TEST_TIMEOUT", 1800))  # an upper bound for a loaded machine

# Variables that would make the children join some other job's process group or cluster environment.
_FOREIGN_ENV_PREFIXES = ("SLURM_", "TORCHELASTIC_", "PMI_", "OMPI_", "LSB_", "KUBERNETES_")
_FOREIGN_ENV = {
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "NODE_RANK",
    "PL_DEEPSPEED_CONFIG_PATH",
}


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN_ENV and not k.startswith(_FOREIGN_ENV_PREFIXES)}
    # Where DeepSpeed would cache a compiled op (none is needed: CPUDeepSpeedStrategy's cpu_shm_comm is off).
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    env.update(DS_ACCELERATOR="cpu", WANDB_MODE="disabled", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory, corpora_dir: Path) -> dict:
    """ONE torchrun launch of 2 processes for every check (starting Python, torch and DeepSpeed costs minutes
    on a loaded 2-core machine): ZeRO-1, -2 and -3 on the toy problem, then the update-normalization check."""
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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(HELPER)]
    cmd += ["--stages", *map(str, STAGES), "--out", str(out), "--overrides", *overrides]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=_child_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    return {"proc": proc, "out": out}


def _ranks(folder: Path) -> list[dict | None]:
    return [torch.load(folder / f"rank{r}.pt") if (folder / f"rank{r}.pt").exists() else None for r in (0, 1)]


def _log(proc: subprocess.CompletedProcess) -> str:
    return f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"


def test_both_processes_finish_and_exit_cleanly(launch: dict) -> None:
    """Exit status 0 and no C++ abort at interpreter exit (ZeRO-3 used to end in "terminate called ...")."""
    proc = launch["proc"]
    assert proc.returncode == 0, _log(proc)
    assert "terminate called" not in proc.stderr, _log(proc)
    assert "rank 0 finished" in proc.stdout and "rank 1 finished" in proc.stdout, _log(proc)


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
    assert r0 is not None and r1 is not None, _log(launch["proc"])

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
    assert all(r is not None for r in ranks), _log(launch["proc"])
    for r in ranks:
        assert len(set(r["batch_sizes"])) > 1  # micro-batches of different sizes: a mean of means would differ
        if strategy == "deepspeed":
            assert int(r["grads"].pop("__engine_accumulation")) == 2  # the accumulation reached DeepSpeed
        assert r["grads"].keys() == r["expected"].keys()
        for name, grad in r["grads"].items():
            torch.testing.assert_close(grad, r["expected"][name], rtol=1e-4, atol=1e-6, msg=f"{strategy}: {name}")
