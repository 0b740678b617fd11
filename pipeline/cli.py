"""The `aiayn` command: one entry point for every stage of the pipeline.

    aiayn train   [overrides...]      train the configured experiment
    aiayn prepare [overrides...]      clean, BPE-encode and shard the configured data (data=multi30k, data=tiny, ...)
    aiayn data stats [overrides...]   pairs, tokens, length percentiles, unk rate and cleaning counts of that data
    aiayn params  [overrides...]      print the model's parameter count as JSON
    aiayn plan    [overrides...]      FLOPs, batch layout, memory per GPU (ZeRO 0-3) and time of the configured run
    aiayn average  run.dir=<run> [overrides...]   mean of the newest average.last_n checkpoints -> <run>/averaged.ckpt
    aiayn evaluate run.dir=<run> [overrides...]   translate evaluate.split, BLEU and chrF -> <run>/eval-<split>.json
    aiayn config  [overrides...]      print the resolved config

Overrides are Hydra's: `model=base`, `trainer.max_steps=50`, `data.max_tokens=2048`, ...
"""

from __future__ import annotations

import argparse
import sys

from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from pipeline.config import load_config, output_dir


def _train(cfg) -> None:
    from pipeline.train import main

    main(cfg)


def _prepare(cfg) -> None:
    from data.manifest import is_complete
    from data.prepare import dataset_dir_for, prepare_dataset

    dataset_dir = dataset_dir_for(cfg.data, output_dir(cfg))
    if is_complete(dataset_dir):
        print(f"already prepared: {dataset_dir}")
        return
    print(prepare_dataset(cfg.data, output_dir(cfg)))


def _data_stats(cfg) -> None:
    from data.manifest import is_complete
    from data.prepare import dataset_dir_for
    from data.stats import dataset_stats, format_stats

    dataset_dir = dataset_dir_for(cfg.data, output_dir(cfg))
    if not is_complete(dataset_dir):
        from data.errors import DatasetNotPreparedError

        raise DatasetNotPreparedError(
            f"{cfg.data.name} is not prepared yet ({dataset_dir}); run `aiayn prepare` with the same overrides first"
        )
    print(format_stats(dataset_stats(dataset_dir)))


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


def _config(cfg) -> None:
    print(OmegaConf.to_yaml(cfg, resolve=True))


COMMANDS = {
    "train": (_train, "train the configured experiment"),
    "prepare": (_prepare, "clean, BPE-encode and shard the configured data; prints the dataset folder"),
    "data stats": (_data_stats, "pairs, tokens, length percentiles, unk rate and cleaning counts of the prepared data"),
    "params": (_params, "print trainable parameter counts as one JSON line"),
    "plan": (_plan, "FLOPs per token, batch layout, memory per GPU for ZeRO 0-3, step and wall time, GPU-hours"),
    "average": (_average, "average the newest average.last_n checkpoints of run.dir into <run.dir>/averaged.ckpt"),
    "evaluate": (_evaluate, "translate evaluate.split with a run's model; BLEU and chrF with sacrebleu"),
    "config": (_config, "print the resolved configuration"),
}


def main(argv: list[str] | None = None) -> None:
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
        cmd.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=base trainer.max_steps=50")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    command = f"{args.command} {args.action}" if getattr(args, "action", None) else args.command
    try:
        cfg = load_config(args.overrides)
    except ConfigCompositionException as err:  # a bad override: say which, without a Hydra traceback
        cause = f" ({err.__cause__})" if err.__cause__ else ""
        parser.exit(2, f"aiayn {command}: {err}{cause}\n")
    try:
        COMMANDS[command][0](cfg)
    except Exception as err:
        # A bad corpus, config key or run folder: one line that names the file/key, no traceback.
        from data.errors import DataError
        from pipeline.errors import RunFolderError

        if not isinstance(err, (DataError, RunFolderError)):
            raise
        parser.exit(1, f"aiayn {command}: {err}\n")


if __name__ == "__main__":
    main()
