"""The GPU install and device path (issue 17): `make setup`'s torch build (dry runs only: nothing is installed),
the default trainer following the machine's device, and the accelerator table's GPU names and H200 entry."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipeline import cli
from pipeline.callbacks import accelerator_key
from pipeline.config import PROJECT_ROOT, load_config
from pipeline.costs import ACCELERATORS, accelerator_for_device_name

MAKEFILE = PROJECT_ROOT / "Makefile"
TORCH_VERSION = re.search(r"^TORCH_VERSION := (\S+)$", MAKEFILE.read_text(), re.MULTILINE).group(1)


# -- make setup: which torch build --------------------------------------------------------------------------------
def _dry_setup(venv: Path, *variables: str, path: str | None = None) -> list[str]:
    """The commands `make -n setup VENV=<venv> <variables>` would run, one per line (nothing is run)."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    # Without the variables of a make this test may run under (`make test TORCH=...` passes them in MAKEFLAGS).
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "TORCH", "VENV")}
    if path is not None:
        env["PATH"] = path
    out = subprocess.run(
        [make, "-n", "-f", str(MAKEFILE), "setup", f"VENV={venv}", *variables],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.splitlines()


def _torch_install(lines: list[str], venv: Path) -> str:
    (line,) = [x for x in lines if x.startswith(f"{venv}/bin/pip install") and " torch==" in x]
    return line


def test_setup_cuda_build_comes_from_pytorch_index(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    lines = _dry_setup(venv, "TORCH=cu128")
    install = _torch_install(lines, venv)
    assert "--index-url https://download.pytorch.org/whl/cu128 " in install
    assert install.endswith(f" torch=={TORCH_VERSION}+cu128")  # the pin, in exactly that build
    assert f"touch {venv}/.installed-torch-{TORCH_VERSION}-cu128" in lines  # the stamp names the build
    assert any("cu128 build (TORCH=cu128 given" in x for x in lines)
    assert list(tmp_path.iterdir()) == []  # a dry run: no venv, no stamp


def test_setup_cpu_build_is_the_plain_pin(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    lines = _dry_setup(venv, "TORCH=cpu")
    assert _torch_install(lines, venv) == f"{venv}/bin/pip install --quiet torch=={TORCH_VERSION}"
    assert not any("--index-url" in x or "uninstall" in x for x in lines)
    assert f"touch {venv}/.installed-torch-{TORCH_VERSION}-cpu" in lines


def test_setup_switching_build_reinstalls_torch(tmp_path: Path) -> None:
    """A venv set up for cu128: TORCH=cpu removes that torch first (its +cu128 would satisfy the plain pin)."""
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / f".installed-torch-{TORCH_VERSION}-cu128").touch()
    lines = _dry_setup(venv, "TORCH=cpu")
    uninstall = [x for x in lines if "uninstall" in x]
    assert uninstall == [
        f"{venv}/bin/pip uninstall --quiet --yes torch && rm -f {venv}/.installed-torch-{TORCH_VERSION}-cu128"
    ]
    assert lines.index(uninstall[0]) < lines.index(_torch_install(lines, venv))


@pytest.mark.parametrize(
    "nvidia_smi, build",
    [
        ("echo 'GPU 0: NVIDIA H200 (UUID: GPU-00000000-0000-0000-0000-000000000000)'", "cu128"),
        ("echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'; exit 9", "cpu"),
        ("echo 'No devices were found'; exit 6", "cpu"),
    ],
    ids=["gpu-listed", "no-driver", "no-device"],
)
def test_setup_auto_follows_nvidia_smi(tmp_path: Path, nvidia_smi: str, build: str) -> None:
    """TORCH=auto (the default): cu128 where `nvidia-smi -L` lists a GPU, else cpu; a stand-in nvidia-smi first
    on PATH says which."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\n{nvidia_smi}\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    venv = tmp_path / "venv"
    lines = _dry_setup(venv, path=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert ("--index-url https://download.pytorch.org/whl/cu128" in _torch_install(lines, venv)) == (build == "cu128")
    assert f"touch {venv}/.installed-torch-{TORCH_VERSION}-{build}" in lines
    (said,) = [x for x in lines if "make setup: torch" in x]  # one line: which build, and why
    assert f"{build} build (TORCH=auto and nvidia-smi -L lists {'a' if build == 'cu128' else 'no'} GPU" in said


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
def test_setup_auto_is_cpu_without_nvidia_smi(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    lines = _dry_setup(venv)
    assert _torch_install(lines, venv) == f"{venv}/bin/pip install --quiet torch=={TORCH_VERSION}"
    assert f"touch {venv}/.installed-torch-{TORCH_VERSION}-cpu" in lines


def test_makefile_pins_the_torch_of_the_constraints() -> None:
    """One torch version: `make setup`'s pin (any build of it) is the one constraints.txt holds for the rest of the
    install (pyproject.toml declares a range: tests/test_install.py)."""
    pins = re.findall(r"^torch==(\S+)$", (PROJECT_ROOT / "constraints.txt").read_text(), re.MULTILINE)
    assert pins == [TORCH_VERSION]


def test_makefile_does_not_set_ds_accelerator() -> None:
    """DeepSpeed's device layer is chosen by the code for CPU runs only (pipeline/strategies.py), never for every
    command: on a GPU machine DS_ACCELERATOR=cpu would put DeepSpeed on its CPU layer beside CUDA."""
    assert "DS_ACCELERATOR" not in MAKEFILE.read_text()


# -- the default trainer follows the machine ----------------------------------------------------------------------
@pytest.mark.parametrize("cuda, accelerator", [(True, "gpu"), (False, "cpu")])
def test_default_trainer_follows_the_machine(monkeypatch: pytest.MonkeyPatch, cuda: bool, accelerator: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    cfg = load_config([])
    assert cfg.trainer.accelerator == accelerator  # a concrete string: code compares it with "cpu"
    assert (cfg.trainer.devices, cfg.trainer.precision) == (1, "bf16-mixed")
    # An explicit trainer keeps its device whatever the machine has.
    assert load_config(["trainer=cpu"]).trainer.accelerator == "cpu"
    gpu = load_config(["trainer=gpu"]).trainer
    assert (gpu.accelerator, gpu.devices, gpu.precision) == ("gpu", 8, "bf16-mixed")


# -- accelerators: GPU names and the H200 ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, key",
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-40GB", "a100"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA A100 80GB PCIe", "a100"),  # the same 312 TFLOP/s as the SXM4 board
        ("NVIDIA H100 PCIe", "h100-pcie"),
        ("NVIDIA H100 NVL", "h100-nvl"),
        ("NVIDIA H200 NVL", "h200-nvl"),
        ("Tesla V100-SXM2-16GB", "v100"),
        ("Tesla V100-PCIE-32GB", "v100-pcie"),
        ("Tesla P100-PCIE-16GB", "p100"),
        ("NVIDIA GeForce RTX 4090", None),
        ("NVIDIA GH200 480GB", None),  # contains "h200", but not as a token
        ("Tesla V100S-PCIE-32GB", None),
        ("cpu", None),
        ("", None),
    ],
)
def test_accelerator_for_device_name(name: str, key: str | None) -> None:
    assert accelerator_for_device_name(name) == key


def test_h200_entry() -> None:
    h200 = ACCELERATORS["h200"]
    assert (h200.peak_flops, h200.dtype, h200.memory_gb) == (989e12, "bf16", 141)
    assert h200.peak_flops == ACCELERATORS["h100"].peak_flops  # the same Hopper tensor cores as the H100 SXM


def _on(device: str) -> SimpleNamespace:
    return SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))


def test_accelerator_key_of_a_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """What train/mfu's peak comes from: the CUDA device's name, else cluster.gpu if it names a GPU."""
    assert accelerator_key(_on("cpu"), "h100") == "cpu"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert accelerator_key(_on("cuda:0"), "cpu") == "h200"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 4090")
    assert accelerator_key(_on("cuda:0"), "a100") == "a100"
    assert accelerator_key(_on("cuda:0"), "cpu") is None  # not the CPU's peak for a GPU: no MFU instead
    assert accelerator_key(_on("cuda:0"), None) is None


def test_plan_on_h200(capsys: pytest.CaptureFixture) -> None:
    cli.main(["plan", "model=base", "model.vocab_size=37000", "cluster.gpus=8", "cluster.gpu=h200", "plan.json=true"])
    plan = json.loads(capsys.readouterr().out)
    assert (plan["time"]["gpu"], plan["time"]["peak_flops"], plan["time"]["dtype"]) == ("h200", 989e12, "bf16")
    assert plan["memory"]["device_bytes"] == 141e9
