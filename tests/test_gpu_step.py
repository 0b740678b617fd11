"""bench/gpu_step.py, the GPU benchmark (issue 17), exercised on the CPU: its smoke mode end to end (the same code
a CUDA run takes, with a tiny model), and the pieces of its `aiayn train` measurement that need no GPU: the
overrides compose, and the logged throughput is read back from a metrics.csv."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.validate import validate

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = PROJECT_ROOT / "bench" / "gpu_step.py"
PROJECT_ROWS = ["kernels=cuda compile=false", "kernels=plain compile=false"]


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("gpu_step") / "x.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--smoke", "--out", str(out)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def test_smoke_rows(smoke: dict):
    assert smoke["smoke"] is True and smoke["device"] == "cpu"
    assert smoke["datasheet"]["key"] == "cpu"
    assert smoke["torch"] and smoke["date"] and "--smoke" in smoke["command"]
    assert smoke["bf16_matmul_peak_tflops"]["used"] > 0
    entry = smoke["models"]["tiny"]
    assert entry["batches"]["target_tokens"] and all(n > 0 for n in entry["batches"]["target_tokens"])
    rows = entry["rows"]
    assert set(rows) == {*PROJECT_ROWS, "peer"}
    peer = rows["peer"]
    for name, row in rows.items():
        assert "error" not in row, (name, row)
        assert row["steps"] == 2 and row["warmup_updates"] == 2
        assert row["seconds_per_update"] > 0 and row["target_tokens_per_sec"] > 0
        assert row["model_tflops_per_sec"] > 0
        assert row["mfu_measured"] > 0 and row["mfu_datasheet"] > 0
        assert row["peak_memory_gb"] is None  # not tracked on a CPU
        assert row["vs_peer"] == pytest.approx(row["target_tokens_per_sec"] / peer["target_tokens_per_sec"], abs=1e-3)
    for name in PROJECT_ROWS:
        assert rows[name]["compiled"] is False
    assert rows["kernels=cuda compile=false"]["kernels_used"] == "cuda"
    assert rows["kernels=plain compile=false"]["kernels_used"] == "plain"
    assert "lightning_loop" not in entry  # --smoke: --train-steps 0


def test_smoke_losses_on_the_identical_first_batch(smoke: dict):
    """Same seed, same weights, same first batch, same dropout masks (both draw them with F.dropout): the project's
    kernels give the same loss to bf16 precision. The peer has weights of its own: only a finite loss there."""
    rows = smoke["models"]["tiny"]["rows"]
    cuda, plain = (rows[name]["first_loss_per_token"] for name in PROJECT_ROWS)
    assert math.isfinite(cuda) and cuda > 0
    assert cuda == pytest.approx(plain, rel=1e-2)
    assert smoke["models"]["tiny"]["first_loss_relative_spread"] < 1e-2
    assert math.isfinite(rows["peer"]["first_loss_per_token"])


def test_train_overrides_compose(tmp_path: Path):
    """The `aiayn train` run of the GPU benchmark: overrides that Hydra accepts and the config check passes, with the
    values meant (the base model at Multi30k's BPE vocabulary)."""
    import torch

    gpu_step = load_script()
    overrides = gpu_step.train_overrides("base", "cuda", "auto", 300, tmp_path / "run", torch.device("cuda"))
    cfg = load_config(overrides)
    validate(cfg, "train")
    assert (cfg.model.d_model, cfg.model.vocab_size, cfg.data.vocab_size) == (512, 8000, 8000)
    assert cfg.data.name == "multi30k" and cfg.data.max_tokens == 25000
    assert (cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.max_steps) == ("gpu", 1, 300)
    assert cfg.trainer.log_every_n_steps == 10 and cfg.trainer.limit_val_batches == 0
    assert (cfg.device.kernels, cfg.device.compile) == ("cuda", "auto")
    assert cfg.logger.wandb.enabled is False and cfg.run.dir == str(tmp_path / "run")
    assert cfg.run.val_bleu_sentences == 0 and cfg.run.n_samples == 0


def test_logged_throughput(tmp_path: Path):
    """The median of the last half of the logged values (the first ones include compilation)."""
    gpu_step = load_script()
    metrics = tmp_path / "metrics.csv"
    lines = ["epoch,step,train/loss,train/mfu,train/tgt_tokens_per_sec"]
    for step, tps in enumerate([1000, 90000, 100000, 110000, 105000, 95000], start=1):
        lines.append(f"0,{10 * step},5.0,{tps / 1e6},{tps}")
        lines.append(f"0,{10 * step},4.0,,")  # a row of other metrics only
    metrics.write_text("\n".join(lines) + "\n")
    result = gpu_step.logged_throughput(metrics)
    assert result["target_tokens_per_sec"] == 105000  # median of 110000, 105000, 95000
    assert result["mfu_datasheet"] == pytest.approx(0.105)
    assert len(result["target_tokens_per_sec_logged"]) == 6
