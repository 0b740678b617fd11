"""The `aiayn` command: one entry point for every stage of the pipeline.

    aiayn train  [overrides...]     train the configured experiment
    aiayn params [overrides...]     print the model's parameter count as JSON
    aiayn config [overrides...]     print the resolved config

Overrides are Hydra's: `model=base`, `trainer.max_steps=50`, `data.max_tokens=2048`, ...
"""

from __future__ import annotations

import argparse
import sys

from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from pipeline.config import load_config


def _train(cfg) -> None:
    from pipeline.train import main

    main(cfg)


def _params(cfg) -> None:
    from pipeline.params import main

    main(cfg)


def _config(cfg) -> None:
    print(OmegaConf.to_yaml(cfg, resolve=True))


COMMANDS = {
    "train": (_train, "train the configured experiment"),
    "params": (_params, "print trainable parameter counts as one JSON line"),
    "config": (_config, "print the resolved configuration"),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="aiayn",
        description="The Transformer of 'Attention Is All You Need', from corpus to BLEU.",
        epilog="Any config value can be overridden Hydra-style: aiayn train model=base trainer.max_steps=50",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=base trainer.max_steps=50")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.overrides)
    except ConfigCompositionException as err:  # a bad override: say which, without a Hydra traceback
        cause = f" ({err.__cause__})" if err.__cause__ else ""
        parser.exit(2, f"aiayn {args.command}: {err}{cause}\n")
    COMMANDS[args.command][0](cfg)


if __name__ == "__main__":
    main()
