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

Overrides are Hydra's: `model=base`, `trainer.max_steps=50`, `data.max_tokens=2048`, ...
Sentences are not overrides (Hydra's grammar gives commas, quotes and brackets a meaning): `aiayn attention` takes
its sentence as the first argument, quoted once for the shell, and a target as --target.
"""

from __future__ import annotations

import argparse
import re
import sys

from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from pipeline.cluster import ClusterConfigError
from pipeline.config import load_config, output_dir
from pipeline.host import set_torch_environment


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


def _run(cfg, overrides: list[str], dry_run: bool) -> None:
    from pipeline.stages import run_graph

    if dry_run:
        sys.exit("aiayn run: --dry-run is not supported; `aiayn submit --dry-run` prints the training job's script")
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
    "attention": (_attention, "heatmaps of every layer's attention weights for one sentence, in run.dir/attention/"),
    "config": (_config, "print the resolved configuration"),
    "submit": (_submit, "submit `aiayn train` as a SLURM job (cluster=slurm); --dry-run prints the sbatch script"),
    "run": (_run, "the stage graph prepare -> train -> average -> evaluate: SLURM jobs chained by afterok, or here"),
}
# Commands that also get the raw overrides (to pass on to their jobs) and the --dry-run flag.
JOB_COMMANDS = ("submit", "run")
# Commands that take a sentence (first positional argument, before the overrides) and a --target translation.
SENTENCE_COMMANDS = ("attention",)
# What an override looks like (key=value, +key=value, ~key=value): in the sentence's place, a misplaced sentence.
OVERRIDE = re.compile(r"^[+~]{0,2}[A-Za-z_][\w.@/-]*=")


def main(argv: list[str] | None = None) -> None:
    set_torch_environment()  # before anything imports torch (pipeline/host.py)
    parser = argparse.ArgumentParser(
        prog="aiayn",
        description="The Transformer of 'Attention Is All You Need', from corpus to BLEU.",
        epilog="Any config value can be overridden Hydra-style: aiayn train model=base trainer.max_steps=50",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}  # "data" of "data stats"
    for name, (_, help_text) in COMMANDS.items():
        group, _, action = name.rpartition(" ")
        if group and group not in groups:
            groups[group] = sub.add_parser(group, help=f"{group} tools").add_subparsers(
                dest="action", required=True, metavar="ACTION"
            )
        cmd = (groups[group] if group else sub).add_parser(action, help=help_text)
        if action in SENTENCE_COMMANDS:
            cmd.add_argument("sentence", help='the source sentence, quoted: "A man rides a bike."')
            cmd.add_argument("--target", help="the target side to draw (default: the model's greedy translation)")
        cmd.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=base trainer.max_steps=50")
        if action in JOB_COMMANDS:
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
        cfg = load_config(args.overrides)
    except ConfigCompositionException as err:  # a bad override: say which, without a Hydra traceback
        cause = f" ({err.__cause__})" if err.__cause__ else ""
        parser.exit(2, f"aiayn {command}: {err}{cause}\n")
    except ClusterConfigError as err:  # cluster and trainer layouts that disagree
        parser.exit(2, f"aiayn {command}: {err}\n")
    extra = {"overrides": list(args.overrides), "dry_run": args.dry_run} if command in JOB_COMMANDS else {}
    if command in SENTENCE_COMMANDS:
        extra = {"sentence": args.sentence, "target": args.target}
    try:
        COMMANDS[command][0](cfg, **extra)
    except Exception as err:
        # A bad corpus, config key or run folder: one line that names the file/key, no traceback.
        from data.errors import DataError
        from pipeline.errors import RunFolderError

        if not isinstance(err, (DataError, RunFolderError)):
            raise
        parser.exit(1, f"aiayn {command}: {err}\n")


if __name__ == "__main__":
    main()
