"""Config mistakes caught before they cost a run (issue 19, point 4): every bad config a user met, refused before
anything starts with one line naming the key and the fix, exit code 2, and no run folder (pipeline/validate.py);
per-command help that lists the keys a command reads; `--version`; `aiayn plan | head` without a traceback.
Config composition and argument parsing only, plus one subprocess: no training."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.config import load_config
from pipeline.plan import PlanConfigError, make_plan
from pipeline.validate import (
    KERNEL_CHOICES,
    READS,
    STRATEGY_NAMES,
    ConfigError,
    load_checked,
    validate,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SLURM_2x8 = ["experiment=wmt14_base", "cluster=slurm", "cluster.nodes=2", "cluster.gpus_per_node=8"]

# (command, overrides, the one line printed): the cases of the issue, as a user typed them.
SEEN = [
    ("train", ["model.d_modle=256"], "model.d_modle=256: no such key; did you mean model.d_model=256?"),
    ("train", ["+model.d_modle=256"], "model.d_modle=256: no such key; did you mean model.d_model=256?"),
    ("train", ["model.d_model=abc"], "model.d_model=abc: not an integer; set model.d_model to a positive integer"),
    (
        "train",
        ["model.d_model"],
        "model.d_model: not a key=value override (missing EQUAL at '<EOF>'); write model.d_model=<value>, or "
        "~model.d_model to delete it",
    ),
    (
        "train",
        ["trainer.precision=bf17"],
        "trainer.precision=bf17: not one of 32-true, bf16-mixed, 16-mixed, bf16-true, 16-true, 64-true; did you mean "
        "trainer.precision=bf16-mixed?",
    ),
    (
        "train",
        ["data=tiny"],
        "model.vocab_size=8000: data=tiny is tokenized with a 400-piece BPE (data.vocab_size), so 7,600 embedding "
        "rows would never be trained; set model.vocab_size=400",
    ),
    (
        "train",
        ["model.n_heads=3"],
        "model.n_heads=3: model.d_model=256 does not split into 3 heads (d_k = d_v = 256 / 3 = 85.33); set "
        "model.n_heads to a divisor of 256 (2 or 4), or set model.d_k and model.d_v",
    ),
    (
        "train",
        ["checkpoint.save_top_k=3", "average.last_n=5"],
        "checkpoint.save_top_k=3: training keeps fewer checkpoints than `aiayn average` averages (average.last_n=5); "
        "set checkpoint.save_top_k=5 (or more; -1 keeps all) or average.last_n=3",
    ),
    (
        "submit",
        SLURM_2x8,
        "train.tokens_per_update=25000: one micro-batch on each of the 16 devices already holds up to "
        "data.max_tokens x 16 = 50,000 tokens, and accumulation cannot go below 1; lower data.max_tokens to 1562 "
        "(= tokens_per_update / world) or raise train.tokens_per_update to 50000",
    ),
    (
        "plan",
        ["model=base", "cluster.gpus=8", "cluster.gpu=p100"],
        "trainer.precision=bf16-mixed: a p100 (cluster.gpu) has no bf16 arithmetic (fp32 is its fastest); set "
        "trainer.precision=16-mixed or 32-true",
    ),
]

# Types and ranges of the obvious keys, cross-key rules, and override mistakes beyond the issue's: (command,
# overrides, what the line starts with, a part of its fix).
MORE = [
    ("train", ["model.dropout=1.5"], "model.dropout=1.5: out of range", "a number in [0, 1)"),
    ("train", ["optim.label_smoothing=-0.1"], "optim.label_smoothing=-0.1: out of range", "a number in [0, 1)"),
    ("train", ["data.max_tokens=0"], "data.max_tokens=0: out of range", "a positive integer"),
    ("train", ["optim.warmup_steps=1.5"], "optim.warmup_steps=1.5: not an integer", "a positive integer"),
    ("train", ["trainer.max_steps=0"], "trainer.max_steps=0: out of range", "or -1 (no limit)"),
    ("train", ["model.share_embeddings=yes"], "model.share_embeddings=yes: not true or false", "true or false"),
    ("train", ["device.kernels=cdua"], "device.kernels=cdua: not one of auto, plain, cpu, cuda", "device.kernels=cuda"),
    ("train", ["device.compile=yes"], "device.compile=yes: not one of auto, true, false", "one of them"),
    ("train", ["strategy=deepspeed", "strategy.stage=4"], "strategy.stage=4: not one of 1, 2, 3", "one of them"),
    ("train", ["strategy=ddpp"], "strategy=ddpp: no such strategy config", "did you mean strategy=ddp?"),
    ("train", ["model=bsae"], "model=bsae: no such model config", "did you mean model=base?"),
    ("train", ["modle.d_model=3"], "modle.d_model=3: no such key", "did you mean model.d_model=3?"),
    ("train", ["+checkpoint.save_topk=5"], "checkpoint.save_topk=5: no such key", "checkpoint.save_top_k=5?"),
    ("train", ["+model.d_model=3"], "model.d_model=3: already in the config", "drop the +: model.d_model=3"),
    ("train", ["model.d_model=${nope}"], "model.d_model=${nope}: cannot be resolved", "fix or drop the ${...}"),
    ("train", ["data.splits.train=[1,2"], "data.splits.train=[1,2: not a key=value override", "quote a value"),
    (
        "train",
        ["++train.tokens_per_update=25000", "trainer.accumulate_grad_batches=2"],
        "trainer.accumulate_grad_batches=2: train.tokens_per_update=25000 sets the accumulation too",
        "drop one of them",
    ),
    (
        "train",
        ["checkpoint.every_n_minutes=10"],
        "checkpoint.every_n_minutes=10: checkpoint.every_n_train_steps=500 sets the checkpoint cadence too",
        "set one of them to null",
    ),
    ("evaluate", ["evaluate.nbest=5"], "evaluate.nbest=5: more hypotheses than the beam keeps", "at most 4"),
    ("plan", ["cluster.gpu=v100"], "trainer.precision=bf16-mixed: a v100 (cluster.gpu) has no bf16", "16-mixed"),
    ("plan", ["cluster.mfu=40"], "cluster.mfu=40: out of range", "a number in (0, 1] or null"),
]


def _refused(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run `aiayn argv`: it must exit with code 2 and print exactly one line, on stderr; returns that line."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    captured = capsys.readouterr()
    assert exit_info.value.code == 2, (exit_info.value.code, captured.err)
    assert captured.out == "" and captured.err.count("\n") == 1, captured
    return captured.err.rstrip("\n")


@pytest.mark.parametrize("command, overrides, line", SEEN, ids=[" ".join(o) for _, o, _ in SEEN])
def test_each_bad_config_seen_is_one_line_exit_2_and_no_run_folder(command, overrides, line, tmp_path, capsys):
    out = tmp_path / "out"
    assert _refused([command, *overrides, f"paths.output_dir={out}"], capsys) == f"aiayn {command}: {line}"
    assert not out.exists()  # nothing was written: no output folder, so no run folder


@pytest.mark.parametrize("command, overrides, start, fix", MORE, ids=[" ".join(o) for _, o, _, _ in MORE])
def test_more_bad_values_name_the_key_and_the_fix(command, overrides, start, fix, tmp_path, capsys):
    out = tmp_path / "out"
    line = _refused([command, *overrides, f"paths.output_dir={out}"], capsys)
    assert line.startswith(f"aiayn {command}: {start}") and fix in line.split("; ", 1)[1], line
    assert not out.exists()


def test_build_run_refuses_before_it_creates_the_run_folder(tmp_path):
    """What `aiayn train` runs (and a SLURM job, and the benchmarks): the check comes before the folder."""
    from pipeline.train import build_run

    cfg = load_config(["trainer.precision=bf17", f"paths.output_dir={tmp_path / 'out'}"])
    with pytest.raises(ConfigError, match=r"^trainer\.precision=bf17: "):
        build_run(cfg)
    assert not (tmp_path / "out").exists()


def test_the_planner_refuses_bf16_on_a_gpu_without_it():
    """The planner's own entry point too: no memory labelled bf16-mixed on a P100 (fp32) or a V100 (fp16)."""
    for gpu in ("p100", "v100", "v100-pcie"):
        with pytest.raises(PlanConfigError, match=rf"trainer.precision=bf16-mixed: a {gpu} .*16-mixed or 32-true"):
            make_plan(load_config(["model=base", f"cluster.gpu={gpu}"]))
    for precision in ("16-mixed", "32-true"):  # what the fix offers works
        plan = make_plan(load_config(["model=base", "cluster.gpu=p100", f"trainer.precision={precision}"]))
        assert plan["memory"]["precision"] == precision
    assert make_plan(load_config(["model=base", "cluster.gpu=a100"]))["memory"]["precision"] == "bf16-mixed"


def test_the_fixes_offered_pass():
    """Following a line's fix gives a config that passes: the issue's cases, fixed as their lines say."""
    fixed = {
        "train": [
            ["data=tiny", "model.vocab_size=400"],
            ["model.n_heads=4"],
            ["model.n_heads=3", "model.d_k=64", "model.d_v=64"],
            ["checkpoint.save_top_k=5", "average.last_n=5"],
            ["checkpoint.save_top_k=-1"],
            ["checkpoint.save_top_k=3", "average.last_n=3"],
            ["trainer.precision=32"],  # Lightning's aliases, typed as an integer by Hydra
        ],
        "submit": [[*SLURM_2x8, "data.max_tokens=1562"], [*SLURM_2x8, "train.tokens_per_update=50000"]],
        "plan": [["model=base", "cluster.gpus=8", "cluster.gpu=p100", "trainer.precision=32-true"]],
    }
    for command, cases in fixed.items():
        for overrides in cases:
            validate(load_checked(overrides), command)


def test_shipped_configs_pass_for_every_command():
    """The defaults and the experiments are valid configs: validation never blocks what the repository ships."""
    configs = [[], ["experiment=wmt14_base"], ["experiment=wmt14_big"], ["experiment=wmt14_base", "cluster=slurm"]]
    configs += [["data=tiny", "model.vocab_size=400"], ["strategy=deepspeed"], ["strategy=ddp"], ["trainer=gpu"]]
    for overrides in configs:
        cfg = load_checked(overrides)
        for command in READS:
            validate(cfg, command)


def test_a_command_is_not_blocked_by_keys_it_does_not_read():
    """`aiayn prepare data=tiny` does not build a model, `aiayn params` does not train: neither reads the keys
    these rules are about."""
    tiny = load_checked(["data=tiny"])
    validate(tiny, "prepare")
    validate(tiny, "data stats")
    with pytest.raises(ConfigError, match="model.vocab_size=8000"):
        validate(tiny, "train")
    few_kept = load_checked(["checkpoint.save_top_k=3"])
    validate(few_kept, "params")
    validate(few_kept, "plan")
    with pytest.raises(ConfigError, match="checkpoint.save_top_k=3"):
        validate(few_kept, "run")
    adds = load_checked(["+secrets.hf_token=x", "+trainer.gradient_clip_algorithm=norm"])  # open sections
    validate(adds, "train")


def test_a_run_that_started_keeps_its_settings(tmp_path):
    """Resuming a run started before a rule existed (save_top_k 3 was the default): its folder's config.yaml holds
    its settings and refuses others, so the cross-key rules, which it could never pass, are for new runs only;
    the values themselves are still checked."""
    old_defaults = load_checked(["checkpoint.save_top_k=3", f"run.dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="checkpoint.save_top_k=3"):
        validate(old_defaults, "train")
    validate(old_defaults, "train", started=True)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("{}")
    assert cli._started(old_defaults)
    with pytest.raises(ConfigError, match="trainer.precision=bf17"):
        validate(load_checked(["trainer.precision=bf17"]), "train", started=True)


def test_the_validation_table_names_the_code_s_own_choices():
    from modules.kernels import CHOICES
    from pipeline.strategies import STRATEGIES

    assert KERNEL_CHOICES == CHOICES and STRATEGY_NAMES == STRATEGIES


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"aiayn {version('aiayn')}\n"


def _help(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--help"])
    assert exit_info.value.code == 0
    return "".join(capsys.readouterr().out.split())  # argparse wraps lines (at spaces and hyphens)


def test_each_command_s_help_says_what_it_does_and_the_keys_it_reads(capsys):
    helps = {name: _help(name.split(), capsys) for name in cli.COMMANDS}
    assert len(set(helps.values())) == len(helps)  # no two the same
    for name, text in helps.items():
        assert "".join(cli.COMMANDS[name][1][1:].split()) in text and "Configkeysitreads,checkedbeforeitstarts:" in text
    assert "checkedbeforeitstarts:run.dir,data.*,device.kernels,paths.*,evaluate.*" in helps["evaluate"]
    assert "checkedbeforeitstarts:model.*." in helps["params"]


def test_dry_run_is_offered_where_it_works(capsys):
    assert "--dry-run" in _help(["submit"], capsys)
    assert "--dry-run" not in _help(["run"], capsys)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", "--dry-run"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --dry-run" in capsys.readouterr().err


def test_a_reader_that_stops_early_ends_the_command_quietly():
    """`aiayn plan ... | head`: the pipe closes before the plan is written; no BrokenPipeError traceback."""
    argv = [sys.executable, "-m", "pipeline", "plan", "model=base", "cluster.gpu=h100"]
    proc = subprocess.Popen(argv, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before the command writes
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 1, err
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, err
