"""Values that reach a job's script or a stage's command line (issue 20, point 3): control characters are refused
before any script exists, run folders whose names hold spaces, parentheses or `$(...)` pass through Hydra intact,
and run.name can only name a folder under <output_dir>/runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from pipeline import cli
from pipeline.config import load_config
from pipeline.errors import RunFolderError
from pipeline.slurm import job_overrides, make_job


@pytest.mark.parametrize(
    "override",
    ["cluster.partition='gpu\ntouch x'", "cluster.account='a\rb'", "cluster.constraint='h100\t'", "run.name='x\ny'"],
)
def test_control_characters_never_reach_a_job_script(override: str, tmp_path: Path) -> None:
    cfg = load_config(["cluster=slurm", override])
    key = override.split("=", 1)[0]
    with pytest.raises(RunFolderError, match=rf"^{key}=.*control characters"):
        make_job(cfg, "train", [override], tmp_path / "run")


def test_a_newline_in_a_plain_override_is_refused_too(tmp_path: Path) -> None:
    cfg = load_config(["cluster=slurm"])
    with pytest.raises(RunFolderError, match="control characters"):
        make_job(cfg, "train", ["+extra.note='a\necho x'"], tmp_path / "run")


@pytest.mark.parametrize("name", ["out (copy)", "a $(touch pwned) b", "it's", "back\\slash\\"])
def test_a_run_folder_of_any_name_reaches_the_stage_as_it_is(name: str, tmp_path: Path) -> None:
    """`aiayn run cluster=local` hands run.dir to each stage's command line: Hydra reads back the same path."""
    run_dir = tmp_path / name / "run"
    (override,) = [o for o in job_overrides(["model=base"], run_dir, "auto") if o.startswith("run.dir=")]
    parsed = OverridesParser.create().parse_override(override)
    assert parsed.key_or_group == "run.dir" and parsed.value() == str(run_dir)
    assert load_config([override]).run.dir == str(run_dir)


@pytest.mark.parametrize("name", ["../../escaped", "a/b", "..", ""])
def test_run_name_cannot_leave_the_runs_folder(name: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "outputs"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", f"run.name='{name}'", f"paths.output_dir={out}", "logger.wandb.enabled=false"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "run.name=" in err and err.count("\n") == 1, err
    assert not (tmp_path / "escaped").exists() and not (out / "runs").exists()


def test_a_secret_override_is_not_written_into_the_job_script(tmp_path: Path) -> None:
    """Issue 20, point 2: the script's `# runs:` line (and what `aiayn submit` prints) shows a secret override's value
    redacted; the job itself still gets it (submitit's pickle)."""
    cfg = load_config(["cluster=slurm"])
    job = make_job(cfg, "train", ["+extra.hf_token=hf_do_not_log_me"], tmp_path / "run")
    assert "hf_do_not_log_me" not in job.aiayn_command and "hf_do_not_log_me" not in "\n".join(job.parameters["setup"])
    assert "+extra.hf_token=hf_do_not_log_me" in job.overrides
