"""The `aiayn` command: one entry point for every stage of the pipeline.

    aiayn train   [overrides...]      train the configured experiment
    aiayn prepare [overrides...]      clean, BPE-encode and shard the configured data (data=multi30k, data=tiny, ...)
    aiayn data stats [overrides...]   pairs, tokens, length percentiles, unk rate and cleaning counts of that data
    aiayn data check [overrides...]   hash the corpus files again: are they the bytes the prepared data was made from?
    aiayn params  [overrides...]      print the model's parameter count as JSON
    aiayn plan    [overrides...]      FLOPs, batch layout, memory per GPU (ZeRO 0-3) and time of the configured run
    aiayn average  run.dir=<run> [overrides...]   mean of the newest average.last_n checkpoints -> <run>/averaged.ckpt
    aiayn evaluate run.dir=<run> [overrides...]   translate evaluate.split; sacreBLEU, chrF and the paper's tokenized
                                      BLEU -> <run>/eval-<split>.json (and the W&B run's summary)
    aiayn translate run.dir=<run> [translate.input=<file>] [overrides...]
                                      translate a file, stdin, or lines typed at a prompt with the run's model;
                                      translate.nbest > 1: `<index> TAB <score> TAB <translation>` lines
    aiayn attention "<sentence>" [--target "<translation>"] run.dir=<run> [overrides...]
                                      attention heatmaps of every layer and head for one sentence (greedy
                                      translation, or --target) -> <run>/attention/<slug>/*.png, weights.npz
                                      (pipeline/attention.py)
    aiayn config  [overrides...]      print the resolved config
    aiayn submit [--dry-run] cluster=slurm [overrides...]
                                      submit `aiayn train` as a SLURM job with submitit: cluster.nodes x
                                      cluster.gpus_per_node tasks under srun, requeued and resumed from last.ckpt
                                      on preemption (pipeline/slurm.py); --dry-run prints the sbatch script only
    aiayn run     [overrides...]      the stage graph prepare -> train -> average -> evaluate, skipping stages
                                      whose outputs exist for the same config (run folder): SLURM
                                      jobs chained by afterok (cluster=slurm) or run here in order (cluster=local)
                                      (pipeline/stages.py)

    aiayn --version                   the installed package's version
    aiayn <command> --help            what the command does and the config keys it reads

Overrides are Hydra's: `model=base`, `trainer.max_steps=50`, `data.max_tokens=2048`, ...
Before a command starts, the config is checked once (pipeline/validate.py): the keys it reads, their types and
ranges, keys that must agree, and the folders it writes to (run.dir no file, the output folder writable). A mistake
is one line, `aiayn <command>: <key>=<value>: <what is wrong>; <the fix>`, and exit code 2; nothing has been written
then (no run folder). A bad corpus, run folder or checkpoint (one of another model, a disk full while writing one)
is one line and exit code 1. Output piped into a reader that stops early (`aiayn plan | head`) ends the command
quietly.
Sentences are not overrides (Hydra's grammar gives commas, quotes and brackets a meaning): `aiayn attention` takes
its sentence as the first argument, quoted once for the shell, and a target as --target.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import NoReturn

from omegaconf import OmegaConf

from pipeline.cluster import ClusterConfigError
from pipeline.config import output_dir
from pipeline.host import quiet_known_warnings, set_torch_environment
from pipeline.validate import ConfigError, describe_reads, load_checked, validate


def _train(cfg) -> dict:
    from pipeline.train import main

    return main(cfg)


def _submit(cfg, overrides: list[str], dry_run: bool) -> None:
    from pipeline.cluster import scheduler
    from pipeline.runs import new_run_dir
    from pipeline.slurm import make_job, sbatch_script, submit

    if scheduler(cfg) != "slurm":
        sys.exit("aiayn submit: no scheduler in this config (cluster.scheduler is null): add cluster=slurm")
    # The run folder is fixed now, so that every (requeued) attempt of the job writes to the same one.
    job = make_job(cfg, "train", overrides, new_run_dir(cfg))
    if dry_run:
        print(sbatch_script(job))
        return
    submitted = submit(job)
    print(f"submitted job {submitted.job_id}: {job.aiayn_command}\nlog: {submitted.paths.stdout}")


def _run(cfg, overrides: list[str]) -> None:
    from pipeline.stages import run_graph

    run_graph(cfg, overrides)


def _prepare(cfg) -> None:
    from pipeline.prepare import main

    main(cfg)


def _data_stats(cfg) -> None:
    from data.manifest import is_complete
    from data.prepare import find_dataset_dir
    from data.stats import dataset_stats, format_stats

    dataset_dir = find_dataset_dir(cfg.data, output_dir(cfg))
    if not is_complete(dataset_dir):
        from data.errors import DatasetNotPreparedError

        raise DatasetNotPreparedError(
            f"{cfg.data.name} is not prepared yet ({dataset_dir}); run `aiayn prepare` with the same overrides first"
        )
    print(format_stats(dataset_stats(dataset_dir)))


def _data_check(cfg) -> None:
    from data.prepare import check_corpus

    print(f"unchanged: the corpus files are those {check_corpus(cfg.data, output_dir(cfg))} was prepared from")


def _params(cfg) -> None:
    from pipeline.params import main

    main(cfg)


def _plan(cfg) -> None:
    from pipeline.plan import PlanConfigError, main

    try:
        main(cfg)
    except PlanConfigError as err:  # a bad cluster/plan key: one line naming it, no traceback
        sys.exit(f"aiayn plan: {err}")


def _average(cfg) -> None:
    from pipeline.average import main

    main(cfg)


def _evaluate(cfg) -> None:
    from pipeline.evaluate import main

    main(cfg)


def _translate(cfg) -> None:
    from pipeline.translate import main

    main(cfg)


def _export(cfg) -> None:
    from pipeline.export import main

    main(cfg)


def _attention(cfg, sentence: str, target: str | None) -> None:
    from pipeline.attention import main

    main(cfg, sentence, target)


def _config(cfg) -> None:
    print(OmegaConf.to_yaml(cfg, resolve=True))


COMMANDS = {
    "train": (_train, "train the configured experiment"),
    "prepare": (_prepare, "clean, BPE-encode and shard the configured data; prints the dataset folder"),
    "data stats": (_data_stats, "pairs, tokens, length percentiles, unk rate and cleaning counts of the prepared data"),
    "data check": (_data_check, "hash the corpus files again and compare them with the prepared data's manifest"),
    "params": (_params, "print trainable parameter counts as one JSON line"),
    "plan": (_plan, "FLOPs per token, batch layout, memory per GPU for ZeRO 0-3, step and wall time, GPU-hours"),
    "average": (_average, "average the newest average.last_n checkpoints of run.dir into <run.dir>/averaged.ckpt"),
    "evaluate": (_evaluate, "beam-search evaluate.split with a run's model; sacreBLEU, chrF and the paper's BLEU"),
    "translate": (_translate, "translate text (translate.input: a file, stdin, or a prompt) with a run's model"),
    "export": (_export, "a run's model as safetensors + config.json + spm.model, for `translate model_dir=`"),
    "attention": (_attention, "heatmaps of every layer's attention weights for one sentence, in run.dir/attention/"),
    "config": (_config, "print the resolved configuration"),
    "submit": (_submit, "submit `aiayn train` as a SLURM job (cluster=slurm); --dry-run prints the sbatch script"),
    "run": (_run, "the stage graph prepare -> train -> average -> evaluate: SLURM jobs chained by afterok, or here"),
}
# Commands on a trained run: they read its folder's config.yaml, the command line adding only what it may change.
RUN_FOLDER_COMMANDS = ("average", "evaluate", "translate", "attention", "export")
# Commands that also get the raw overrides (to pass on to their jobs); those that take --dry-run.
JOB_COMMANDS = ("submit", "run")
DRY_RUN_COMMANDS = ("submit",)
# Commands that take a sentence (first positional argument, before the overrides) and a --target translation.
SENTENCE_COMMANDS = ("attention",)
# What an override looks like (key=value, +key=value, ~key=value): in the sentence's place, a misplaced sentence.
OVERRIDE = re.compile(r"^[+~]{0,2}[A-Za-z_][\w.@/-]*=")


class UserError(SystemExit):
    """A command refused with one line on stderr: exits with `code` (2: a config mistake), str() is that line."""

    def __init__(self, code: int, line: str) -> None:
        super().__init__(code)
        self.line = line

    def __str__(self) -> str:
        return self.line


def _refuse(command: str, err: Exception, code: int = 2) -> NoReturn:
    line = f"aiayn {command}: {err}"
    print(line, file=sys.stderr)
    raise UserError(code, line) from None


def _started(cfg) -> bool:
    """run.dir holds a run that started before (its config.yaml)."""
    from pipeline.runs import CONFIG_NAME

    return bool(cfg.run.get("dir")) and (Path(cfg.run.dir).expanduser() / CONFIG_NAME).is_file()


def version() -> str:
    """The installed package's version, else pyproject.toml's (a checkout that was never installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("aiayn")
    except PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        match = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.MULTILINE)
        return match.group(1) if match else "unknown"


def main(argv: list[str] | None = None) -> None:
    """`aiayn`. Output piped into a reader that stops early (`aiayn plan | head`) ends it quietly, as the Python
    documentation's note on SIGPIPE does it (library/signal.html): the rest of stdout goes to devnull, exit code 1."""
    try:
        _main(argv)
        sys.stdout.flush()  # here, so that a broken pipe surfaces inside the try, not at interpreter exit
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)


def _main(argv: list[str] | None) -> None:
    set_torch_environment()  # before anything imports torch (pipeline/host.py)
    quiet_known_warnings()  # the third-party warnings known to be harmless here (pipeline/host.py)
    parser = argparse.ArgumentParser(
        prog="aiayn",
        description="The Transformer of 'Attention Is All You Need', from corpus to BLEU.",
        epilog="Any config value can be overridden Hydra-style: aiayn train model=base trainer.max_steps=50. "
        "`aiayn <command> --help` lists the keys a command reads.",
    )
    parser.add_argument("--version", action="version", version=f"aiayn {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}  # "data" of "data stats"
    for name, (_, help_text) in COMMANDS.items():
        group, _, action = name.rpartition(" ")
        if group and group not in groups:
            groups[group] = sub.add_parser(group, help=f"{group} tools").add_subparsers(
                dest="action", required=True, metavar="ACTION"
            )
        cmd = (groups[group] if group else sub).add_parser(
            action,
            help=help_text,
            description=help_text[0].upper() + help_text[1:] + ".",
            epilog=f"Config keys it reads, checked before it starts: {describe_reads(name)}.",
        )
        if action in SENTENCE_COMMANDS:
            cmd.add_argument("sentence", help='the source sentence, quoted: "A man rides a bike."')
            cmd.add_argument("--target", help="the target side to draw (default: the model's greedy translation)")
        cmd.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=base trainer.max_steps=50")
        if name in DRY_RUN_COMMANDS:
            cmd.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    # argparse ends a positional list at an option: in `aiayn attention "A man." run.dir=r --target "Ein Mann."
    # model=base` the last override comes back unrecognized. Overrides after an option are overrides all the same.
    unknown = [arg for arg in rest if arg.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *rest]
    command = f"{args.command} {args.action}" if getattr(args, "action", None) else args.command
    if command in SENTENCE_COMMANDS and OVERRIDE.match(args.sentence):
        parser.exit(
            2,
            f'aiayn {command}: the sentence comes first, quoted: aiayn {command} "<sentence>" run.dir=<run> '
            f"[overrides...] (got the override {args.sentence!r} in its place)\n",
        )
    try:
        cfg = load_checked(args.overrides)  # a bad override (grammar, unknown key or group option): one line
    except (ConfigError, ClusterConfigError) as err:  # ClusterConfigError: cluster and trainer layouts disagree
        _refuse(command, err)
    extra = {"overrides": list(args.overrides)} if command in JOB_COMMANDS else {}
    if command in DRY_RUN_COMMANDS:
        extra["dry_run"] = args.dry_run
    if command in SENTENCE_COMMANDS:
        extra = {"sentence": args.sentence, "target": args.target}
    try:
        if command in RUN_FOLDER_COMMANDS or (command == "train" and cfg.run.get("resume")):
            from pipeline.runs import with_run_config

            cfg = with_run_config(cfg, list(args.overrides))  # the run folder's own config, with these overrides
        # The keys this command reads, before it starts (pipeline/validate.py); a training run that started before
        # keeps its own settings.
        validate(cfg, command, started=command == "train" and _started(cfg))
        COMMANDS[command][0](cfg, **extra)
    except ConfigError as err:
        _refuse(command, err)
    except Exception as err:
        # A bad corpus, config key or run folder: one line that names the file/key, no traceback.
        from data.errors import DataError
        from modules.lightning import TrainingDiverged
        from pipeline.errors import RunFolderError

        if not isinstance(err, (DataError, RunFolderError, TrainingDiverged)):
            raise
        parser.exit(1, f"aiayn {command}: {err}\n")


if __name__ == "__main__":
    main()
