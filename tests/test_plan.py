"""`aiayn plan` against independent references: the paper's Table 2, the ZeRO paper's memory example, and FLOPs,
accumulation and activations computed here by hand. Arithmetic and config loading only: no training."""

from __future__ import annotations

import json

import pytest

from pipeline import cli
from pipeline.config import load_config
from pipeline.costs import ACCELERATORS, accumulation_steps, batch_layout
from pipeline.plan import (
    MIXED_PRECISION_BYTES,
    PlanConfigError,
    make_plan,
    model_state_bytes,
    paper_training_flops,
)

# A P100 has no bf16 (the planner refuses bf16-mixed there: pipeline/validate.py); 16-mixed keeps the same bytes.
PAPER_BASE = [
    "model=base", "model.vocab_size=37000", "cluster.gpus=8", "cluster.gpu=p100", "trainer.precision=16-mixed",
]  # fmt: skip


def test_table2_training_cost_of_base_and_big():
    """Table 2: base 3.3e18 FLOPs (12 hours), big 2.3e19 (3.5 days), 8 P100s at 9.5 TFLOPS (section 5.2, 6.1)."""
    p100 = ACCELERATORS["p100"].peak_flops
    assert p100 == 9.5e12
    assert f"{paper_training_flops(hours=12, gpus=8, capacity_flops=p100):.1e}" == "3.3e+18"
    assert f"{paper_training_flops(hours=3.5 * 24, gpus=8, capacity_flops=p100):.1e}" == "2.3e+19"


def test_table2_through_the_config():
    plan = make_plan(load_config([*PAPER_BASE, "cluster.hours=12"]))
    assert f"{plan['paper_cost']['flops']:.1e}" == "3.3e+18"
    assert plan["paper_cost"]["hours_from"] == "cluster.hours"


@pytest.mark.parametrize("stage, gb", [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_paper_memory_example(stage, gb):
    """ZeRO paper (Rajbhandari et al. 2019), Figure 1: 7.5B parameters, N_d = 64, K = 12, per-GPU model states."""
    states = model_state_bytes(params=7.5e9, world_size=64, stage=stage, sizes=MIXED_PRECISION_BYTES)
    assert round(states.total / 1e9, 1) == gb


def test_accumulation_by_hand():
    assert accumulation_steps(25000, max_tokens=3125, world_size=8) == 1  # 25000 / 25000
    assert accumulation_steps(25000, max_tokens=4096, world_size=1) == 6  # 6.10
    assert accumulation_steps(25000, max_tokens=1024, world_size=2) == 12  # 12.2
    assert accumulation_steps(25000, max_tokens=2048, world_size=4) == 3  # 3.05
    assert accumulation_steps(25000, max_tokens=4096, world_size=8) == 1  # 0.76: never below one micro-batch
    unset = batch_layout(max_tokens=4096, world_size=8, tokens_per_update=None, accumulate=2)
    assert (unset.accumulation, unset.tokens_per_update) == (2, 65536)  # trainer.accumulate_grad_batches


def test_accumulation_through_the_config():
    """`++` adds train.tokens_per_update where the tree lacks it and sets it where it has it."""
    cfg = load_config(["++train.tokens_per_update=25000", "data.max_tokens=1024", "cluster.nodes=2", "cluster.gpus=1"])
    batch = make_plan(cfg)["batch"]
    assert (batch["world_size"], batch["accumulation"], batch["tokens_per_update"]) == (2, 12, 24576)


def test_base_flops_per_target_token_by_hand():
    """Base: N=6, d_model=512, h*d_k = h*d_v = 512, vocab 37000; mean source 27, target 28 tokens.

    Non-embedding parameters (tests/test_params.py's hand count): encoder 6 x 3,152,384 = 18,914,304,
    decoder 6 x 4,204,032 = 25,224,192.
    """
    r = 27 / 28  # source tokens per target token
    params = 6 * (r * 18_914_304 + 25_224_192)  # 260,777,910.9
    attention = 6 * 3 * 2 * 2 * 512 * (r * 27 + 28 + 27)  # encoder self, decoder self, cross: 2,987,300.6
    output = 6 * 512 * 37_000  # 113,664,000
    flops = make_plan(load_config(PAPER_BASE))["flops_per_target_token"]
    assert flops["params"] == pytest.approx(params, rel=1e-12)
    assert flops["attention"] == pytest.approx(attention, rel=1e-12)
    assert flops["output"] == output
    assert flops["total"] == pytest.approx(377_429_211.5, abs=1)


def test_base_activations_and_step_time_by_hand():
    """Activations of one 4096-token micro-batch of the base model in 16-mixed, and the step time on 8 P100s;
    the loss's share depends on the kernels (device.kernels): the plain loss keeps float32 log-probabilities and
    their gradient per token, the GPU's blocked loss one block of logits whatever the batch."""
    d, d_ff, h, s, t, vocab = 512, 2048, 8, 27, 28, 37_000
    encoder_layer = (11 * d + 5 * h * s) + (3 * d + 4 * d_ff) + 2 * 2 * d  # 18,488 bytes per token
    decoder_layer = (11 * d + 5 * h * t) + (11 * d + 5 * h * s) + (3 * d + 4 * d_ff) + 3 * 2 * d  # 26,264
    layers = 4096 * 6 * (encoder_layer + decoder_layer)
    outputs = {
        "plain": 4096 * vocab * (2 + 4 + 4),
        "cpu": 4096 * vocab * 2 + 4096 * d * 2 + vocab * d * 4,
        "cuda": 2**27 * (2 + 4) + 4096 * d * 2 + vocab * d * 4,  # 4096 x 37k logits are more than one block
    }
    for kernels, output in outputs.items():
        gpu = "cpu" if kernels == "cpu" else "p100"
        overrides = [*PAPER_BASE, "data.max_tokens=4096", "cluster.mfu=0.5", f"cluster.gpu={gpu}"]
        plan = make_plan(load_config([*overrides, f"device.kernels={kernels}"]))
        assert plan["memory"]["kernels"] == kernels
        assert plan["memory"]["zero"]["0"]["activations"] == layers + output, kernels
    assert make_plan(load_config([*PAPER_BASE, "cluster.gpu=h100"]))["memory"]["kernels"] == "cuda"  # auto
    plan = make_plan(load_config([*PAPER_BASE, "data.max_tokens=4096", "cluster.mfu=0.5"]))
    assert plan["memory"]["zero"]["0"]["weights"] == 2 * 63_082_496
    step = plan["flops_per_target_token"]["total"] * 4096 * 8 / (8 * 9.5e12 * 0.5)
    assert plan["time"]["step_seconds"] == pytest.approx(step, rel=1e-12)
    assert plan["time"]["wall_seconds"] == pytest.approx(step * plan["time"]["max_steps"], rel=1e-12)


def test_cli_table_and_json(capsys):
    cli.main(["plan", *PAPER_BASE])
    table = capsys.readouterr().out
    assert "63,082,496" in table and all(f"ZeRO-{stage}" in table for stage in range(4))
    cli.main(["plan", *PAPER_BASE, "plan.json=true"])
    plan = json.loads(capsys.readouterr().out)
    assert plan["model"]["params"] == 63_082_496 and plan["time"]["gpu"] == "p100"


def test_bad_settings_name_the_key():
    with pytest.raises(PlanConfigError, match="cluster.gpu"):
        make_plan(load_config(["cluster.gpu=tpu"]))
    with pytest.raises(PlanConfigError, match="cluster.mfu"):
        make_plan(load_config(["cluster.mfu=40"]))
    with pytest.raises(SystemExit, match="aiayn plan: cluster.gpu"):
        cli.main(["plan", "cluster.gpu=tpu"])
