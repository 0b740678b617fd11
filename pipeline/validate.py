"""One check of the composed config before a command starts: a mistake in an override or a value is one line that
names the key and the fix (`aiayn` prints it and exits with code 2; pipeline/cli.py).

Two steps:
- `load_checked(overrides)` composes the config (pipeline/config.py) and turns every way an override can be wrong
  into a ConfigError: Hydra's grammar (`model.d_model` without `=`), a config group option that does not exist
  (`model=bsae`), a key that does not exist (`model.d_modle=256`, with a did-you-mean), a `${...}` that does not
  resolve.
- `validate(cfg, command)` checks the values the command reads (READS): each key of RULES (type and range, or the
  allowed values), the keys of the closed sections (CLOSED: a `+model.d_modle=256` that Hydra accepts), the
  folders on disk (a run.dir that is a file; an output folder or run folder that cannot be written), then the
  cross-key rules (CROSS_CHECKS: divisibility, vocabulary against the tokenizer, tokens per update against world x
  max_tokens, checkpoints kept against checkpoints averaged, precision against the device, ...). Keys a command
  does not read never block it (`aiayn prepare data=tiny` does not care about model.vocab_size).

The config tree itself (conf/) is the schema of which keys exist; RULES holds only what YAML cannot say.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.costs import ACCELERATORS


class ConfigError(ValueError):
    """A config value that cannot run: `<key>=<value>: <what is wrong>; <the fix>`."""

    def __init__(self, key: str, value: Any, problem: str, fix: str) -> None:
        self.key = key
        shown = key if value is _NO_VALUE else f"{key}={show(value)}"
        super().__init__(f"{shown}: {problem}; {fix}")


_NO_VALUE = object()  # an override without a value (`model.d_model`): the message shows the key alone


def show(value: Any) -> str:
    """A value as it is typed in an override: null, true/false, [a, b]."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=False)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return str(value)


# -- one key: type and range, or the allowed values -------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Check:
    expected: str  # what the fix asks for: "a positive integer"
    kind: str  # what a value of the wrong type is not: "an integer"
    is_kind: Callable[[Any], bool]
    in_range: Callable[[Any], bool] = lambda value: True
    why: Callable[[Any], str | None] = lambda value: None  # what an out-of-range value would do, if worth saying

    def problem(self, value: Any) -> str | None:
        if not self.is_kind(value):
            return f"not {self.kind}"
        if not self.in_range(value):
            why = self.why(value)
            return f"out of range ({why})" if why else "out of range"
        return None

    def fix(self, key: str, value: Any) -> str:
        return f"set {key} to {self.expected}"


@dataclass(frozen=True)
class OneOf(Check):
    choices: tuple = ()
    aliases: tuple = ()  # (alias, the choice it stands for): accepted too, not offered

    def problem(self, value: Any) -> str | None:
        # Strict: 1 is not true, "true" is not true (Hydra types `true` as a bool).
        accepted = (*self.choices, *(alias for alias, _ in self.aliases))
        ok = any(value == c and type(value) is type(c) for c in accepted)
        return None if ok else f"not one of {', '.join(show(c) for c in self.choices)}"

    def fix(self, key: str, value: Any) -> str:
        names = {show(c): show(c) for c in self.choices} | {show(a): show(c) for a, c in self.aliases}
        close = difflib.get_close_matches(str(value), list(names), n=1, cutoff=0.5)
        return f"did you mean {key}={names[close[0]]}?" if close else f"set {key} to one of them"


def one_of(*choices: Any, aliases: tuple = ()) -> OneOf:
    return OneOf(expected="", kind="", is_kind=lambda value: True, choices=choices, aliases=aliases)


def optional(check: Check) -> Check:
    return Check(
        f"{check.expected} or null",
        f"{check.kind} or null",
        lambda value: value is None or check.is_kind(value),
        lambda value: value is None or check.in_range(value),
    )


POSITIVE_INT = Check("a positive integer", "an integer", _is_int, lambda v: v > 0)
NON_NEGATIVE_INT = Check("an integer >= 0", "an integer", _is_int, lambda v: v >= 0)
POSITIVE = Check("a positive number", "a number", _is_number, lambda v: v > 0)
NON_NEGATIVE = Check("a number >= 0", "a number", _is_number, lambda v: v >= 0)
PROBABILITY = Check("a number in [0, 1)", "a number", _is_number, lambda v: 0 <= v < 1)
FRACTION_OF_PEAK = Check("a number in (0, 1]", "a number", _is_number, lambda v: 0 < v <= 1)
BOOL = Check("true or false", "true or false", lambda v: isinstance(v, bool))
NOTHING_TRAINED = "nothing would be trained"  # a limit of 0 steps, epochs, batches or seconds
STEPS = Check(
    "a positive integer, or -1 (no limit)",
    "an integer",
    _is_int,
    lambda v: v > 0 or v == -1,
    lambda v: NOTHING_TRAINED if v == 0 else None,
)
MAX_EPOCHS = Check(
    "a positive integer, or -1 (no limit)",
    "an integer or null",
    lambda v: v is None or _is_int(v),
    lambda v: v is None or v > 0 or v == -1,  # null: Lightning's default (1000 epochs without max_steps)
    lambda v: NOTHING_TRAINED if v == 0 else None,
)
TRAIN_BATCHES = Check(
    "a positive integer (batches per epoch) or a fraction in (0, 1]",
    "a number",
    _is_number,
    lambda v: v > 0 and (_is_int(v) or v <= 1),
    lambda v: NOTHING_TRAINED if v == 0 else None,
)


def duration_seconds(value: Any) -> float | None:
    """trainer.max_time in seconds, as Lightning's Timer reads it: "DD:HH:MM:SS" or a dict of timedelta's
    arguments ({hours: 5}); None if it is neither."""
    from datetime import timedelta

    if isinstance(value, str):
        match = re.fullmatch(r"(\d+):(\d\d):(\d\d):(\d\d)", value.strip())
        if not match:
            return None
        days, hours, minutes, seconds = (int(g) for g in match.groups())
        return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds).total_seconds()
    if isinstance(value, dict):
        try:
            return timedelta(**value).total_seconds()
        except TypeError:
            return None
    return None


MAX_TIME = Check(
    'a duration "DD:HH:MM:SS" above zero, or null (no time limit)',
    'a duration "DD:HH:MM:SS" or null',
    lambda v: v is None or duration_seconds(v) is not None,
    lambda v: v is None or duration_seconds(v) > 0,
    lambda v: NOTHING_TRAINED,
)
NON_EMPTY_LIST_OF_POSITIVE_INTS = Check(
    "a non-empty list of positive integers, e.g. [4]",
    "a list of integers",
    lambda v: isinstance(v, list) and all(_is_int(b) for b in v),
    lambda v: len(v) > 0 and all(b > 0 for b in v),
)
NON_EMPTY_LIST_OF_NON_NEGATIVE = Check(
    "a non-empty list of numbers >= 0, e.g. [0.6, 1.0]",
    "a list of numbers",
    lambda v: isinstance(v, list) and all(_is_number(a) for a in v),
    lambda v: len(v) > 0 and all(a >= 0 for a in v),
)
TOP_K = Check("a positive integer, or -1 (keep all)", "an integer", _is_int, lambda v: v > 0 or v == -1)
BETAS = Check(
    "two numbers in [0, 1), e.g. [0.9, 0.98]",
    "a list of two numbers",
    lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_number(b) for b in v),
    lambda v: all(0 <= b < 1 for b in v),
)

# What Lightning's Trainer takes (lightning/fabric/plugins/precision/precision.py, _PRECISION_INPUT_STR and its
# aliases, less transformer-engine, which needs a package this project does not install); and decoding's
# (modules/decoding.py).
TRAINING_PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")
# Lightning's aliases (_PRECISION_INPUT_STR_ALIAS_CONVERSION; Hydra types a bare 32 as an integer)
PRECISION_ALIASES = (("32", "32-true"), ("16", "16-mixed"), ("bf16", "bf16-mixed"), ("64", "64-true"))
PRECISION_ALIASES += tuple((int(alias), choice) for alias, choice in PRECISION_ALIASES if alias.isdigit())
DECODING_PRECISIONS = ("32-true", "bf16-mixed")
KERNEL_CHOICES = ("auto", "plain", "cpu", "cuda")  # modules/kernels.py CHOICES (a test keeps them equal)
STRATEGY_NAMES = ("auto", "ddp", "deepspeed")  # pipeline/strategies.py STRATEGIES (a test keeps them equal)

# key -> what it takes. A key absent from the composed config (strategy.stage outside DeepSpeed) is not checked.
RULES: dict[str, Check] = {
    "seed": Check("an integer", "an integer", _is_int),
    "model.vocab_size": POSITIVE_INT,
    "model.n_layers": POSITIVE_INT,
    "model.d_model": POSITIVE_INT,
    "model.d_ff": POSITIVE_INT,
    "model.n_heads": POSITIVE_INT,
    "model.d_k": optional(POSITIVE_INT),
    "model.d_v": optional(POSITIVE_INT),
    "model.dropout": PROBABILITY,
    "model.positional": one_of("sinusoidal", "learned"),
    "model.norm": one_of("post", "pre"),
    "model.share_embeddings": BOOL,
    "model.max_positions": POSITIVE_INT,
    "model.pad_id": NON_NEGATIVE_INT,
    "data.vocab_size": POSITIVE_INT,
    "data.max_len": POSITIVE_INT,
    "data.max_tokens": POSITIVE_INT,
    "data.spm_sample_lines": POSITIVE_INT,
    "data.shard_lines": POSITIVE_INT,
    "data.num_prepare_workers": optional(POSITIVE_INT),
    "data.num_workers": NON_NEGATIVE_INT,
    "optim.betas": BETAS,
    "optim.eps": POSITIVE,
    "optim.warmup_steps": POSITIVE_INT,
    "optim.lr_scale": POSITIVE,
    "optim.label_smoothing": PROBABILITY,
    "train.tokens_per_update": optional(POSITIVE_INT),
    "trainer.precision": one_of(*TRAINING_PRECISIONS, aliases=PRECISION_ALIASES),
    "trainer.max_steps": STEPS,
    "trainer.max_epochs": MAX_EPOCHS,
    "trainer.max_time": MAX_TIME,
    "trainer.limit_train_batches": TRAIN_BATCHES,
    "trainer.num_nodes": POSITIVE_INT,
    "trainer.accumulate_grad_batches": POSITIVE_INT,
    "trainer.log_every_n_steps": POSITIVE_INT,
    "trainer.gradient_clip_val": optional(NON_NEGATIVE),
    "strategy.name": one_of(*STRATEGY_NAMES),
    "strategy.stage": one_of(1, 2, 3),
    "device.kernels": one_of(*KERNEL_CHOICES),
    "device.compile": one_of("auto", True, False),
    "run.n_samples": NON_NEGATIVE_INT,
    "run.val_bleu_sentences": NON_NEGATIVE_INT,
    "run.val_beam": POSITIVE_INT,
    "checkpoint.every_n_train_steps": optional(POSITIVE_INT),
    "checkpoint.every_n_minutes": optional(POSITIVE),
    "checkpoint.save_top_k": TOP_K,
    "average.last_n": POSITIVE_INT,
    "evaluate.split": one_of("train", "valid", "test"),
    "evaluate.beam": POSITIVE_INT,
    "evaluate.alpha": NON_NEGATIVE,
    "evaluate.nbest": POSITIVE_INT,
    "evaluate.max_extra": NON_NEGATIVE_INT,
    "evaluate.max_tokens": POSITIVE_INT,
    "evaluate.precision": one_of(*DECODING_PRECISIONS),
    "evaluate.tune.enabled": BOOL,
    "evaluate.tune.split": one_of("train", "valid", "test"),
    "evaluate.tune.beams": NON_EMPTY_LIST_OF_POSITIVE_INTS,
    "evaluate.tune.alphas": NON_EMPTY_LIST_OF_NON_NEGATIVE,
    "evaluate.tune.metric": one_of("bleu", "chrf"),
    "translate.beam": POSITIVE_INT,
    "translate.alpha": NON_NEGATIVE,
    "translate.nbest": POSITIVE_INT,
    "translate.max_extra": NON_NEGATIVE_INT,
    "translate.max_tokens": POSITIVE_INT,
    "translate.precision": one_of(*DECODING_PRECISIONS),
    "cluster.nodes": POSITIVE_INT,
    "cluster.gpus": POSITIVE_INT,
    "cluster.gpus_per_node": POSITIVE_INT,
    "cluster.gpu": one_of(*ACCELERATORS),
    "cluster.mfu": optional(FRACTION_OF_PEAK),
    "cluster.hours": optional(POSITIVE),
    "plan.src_len": POSITIVE,
    "plan.tgt_len": POSITIVE,
    "plan.json": BOOL,
}

# Sections read by this project's code alone, key by key: a key there that the config tree (conf/) does not define
# is a typo that would be ignored (`+checkpoint.save_topk=5`) or refused later with a traceback (`+model.d_modle`).
# The others pass their keys on (trainer.* to Lightning, strategy.* to DDP/DeepSpeed, logger.*, cluster.* to
# sbatch) or hold free-form entries (data.splits), so a new key there may be meant.
CLOSED = (
    "model", "optim", "train", "run", "checkpoint", "average", "evaluate", "translate", "attention", "device", "plan",
)  # fmt: skip

# -- what each command reads: the keys validated for it, and what its --help lists ------------------------------
_TRAINING = (
    "seed", "model", "data", "optim", "train", "trainer", "strategy", "checkpoint", "run", "device", "logger",
    "paths", "cluster.gpu", "evaluate.alpha", "average.last_n",
)  # fmt: skip
_DECODING = ("run.dir", "data", "device.kernels", "paths")
READS: dict[str, tuple[str, ...]] = {
    "train": _TRAINING,
    "prepare": ("data", "paths"),
    "data stats": ("data", "paths"),
    "data check": ("data", "paths"),
    "params": ("model",),
    "plan": (
        "model",
        "data.max_tokens",
        "train.tokens_per_update",
        "trainer.precision",
        "trainer.max_steps",
        "trainer.accumulate_grad_batches",
        "strategy",
        "cluster",
        "device.kernels",
        "plan",
    ),
    "average": ("run.dir", "average", "paths"),
    "evaluate": (*_DECODING, "evaluate", "logger", "seed"),
    "translate": (*_DECODING, "model_dir", "translate"),
    "attention": (*_DECODING, "attention", "evaluate.checkpoint", "evaluate.max_extra"),
    "export": ("run.dir", "export", "evaluate.checkpoint", "data", "paths"),
    "config": ("",),  # everything: it prints the whole config
    "submit": (*_TRAINING, "cluster"),
    "run": (*_TRAINING, "cluster", "average", "evaluate"),
}


def reads(command: str | None, key: str) -> bool:
    """Whether `command` reads `key` (a command READS does not list reads everything)."""
    patterns = READS.get(command or "", ("",))
    return any(p == "" or key == p or key.startswith(p + ".") for p in patterns)


def describe_reads(command: str) -> str:
    """The keys a command reads, for its --help: `run.dir, evaluate.*, data.*, device.kernels`."""
    patterns = READS.get(command, ("",))
    if patterns == ("",):
        return "every key"
    leaves = ("seed", "model_dir")  # top-level keys that are values, not sections
    shown = [p for p in patterns if not any(p.startswith(q + ".") for q in patterns)]  # cluster.gpu in cluster.*
    return ", ".join(p if "." in p or p in leaves else f"{p}.*" for p in shown)


# -- cross-key rules --------------------------------------------------------------------------------------------
def _heads(cfg: DictConfig, command: str | None) -> ConfigError | None:
    model = cfg.model
    d_model, heads = model.d_model, model.n_heads
    if d_model % heads == 0 or (model.get("d_k") is not None and model.get("d_v") is not None):
        return None
    divisors = [h for h in range(1, d_model + 1) if d_model % h == 0]
    near = sorted(divisors, key=lambda h: (abs(h - heads), h))[:2]
    return ConfigError(
        "model.n_heads",
        heads,
        f"model.d_model={d_model} does not split into {heads} heads (d_k = d_v = {d_model} / {heads} = "
        f"{d_model / heads:.4g})",
        f"set model.n_heads to a divisor of {d_model} ({' or '.join(map(str, sorted(near)))}), or set model.d_k "
        "and model.d_v",
    )


def _vocabulary(cfg: DictConfig, command: str | None) -> ConfigError | None:
    model, bpe = cfg.model.vocab_size, cfg.data.vocab_size
    if model == bpe:
        return None
    why = (
        f"{model - bpe:,} embedding rows would never be trained"
        if model > bpe
        else f"token ids up to {bpe - 1} do not fit its {model} embedding rows"
    )
    return ConfigError(
        "model.vocab_size",
        model,
        f"data={cfg.data.get('name')} is tokenized with a {bpe}-piece BPE (data.vocab_size), so {why}",
        f"set model.vocab_size={bpe}",
    )


def _world_size(cfg: DictConfig, command: str | None) -> int | None:
    """Data-parallel ranks: the planner's machines (cluster.*), else the trainer's (None where Lightning picks)."""
    if command == "plan":
        return int(cfg.cluster.nodes) * int(cfg.cluster.gpus)
    devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1) or 1
    if isinstance(devices, (list, ListConfig)):
        devices = len(devices)
    if not _is_int(devices) or devices < 1 or not _is_int(nodes):
        return None  # "auto", -1: known when Lightning starts
    return devices * nodes


def _tokens_per_update(cfg: DictConfig, command: str | None) -> ConfigError | None:
    asked, max_tokens = cfg.train.tokens_per_update, cfg.data.max_tokens
    world = _world_size(cfg, command)
    if asked is None or world is None or asked >= max_tokens * world:
        return None
    return ConfigError(
        "train.tokens_per_update",
        asked,
        f"one micro-batch on each of the {world} devices already holds up to data.max_tokens x {world} = "
        f"{max_tokens * world:,} tokens, and accumulation cannot go below 1",
        f"lower data.max_tokens to {asked // world} (= tokens_per_update / world) or raise "
        f"train.tokens_per_update to {max_tokens * world}",
    )


def _accumulation(cfg: DictConfig, command: str | None) -> ConfigError | None:
    asked, accumulate = cfg.train.tokens_per_update, cfg.trainer.accumulate_grad_batches
    if asked is None or accumulate == 1:
        return None
    return ConfigError(
        "trainer.accumulate_grad_batches",
        accumulate,
        f"train.tokens_per_update={asked} sets the accumulation too",
        "drop one of them (trainer.accumulate_grad_batches=1, or train.tokens_per_update=null)",
    )


def _cadence(cfg: DictConfig, command: str | None) -> ConfigError | None:
    steps, minutes = cfg.checkpoint.every_n_train_steps, cfg.checkpoint.every_n_minutes
    if not (steps and minutes):
        return None
    return ConfigError(
        "checkpoint.every_n_minutes",
        minutes,
        f"checkpoint.every_n_train_steps={steps} sets the checkpoint cadence too",
        "set one of them to null",
    )


def _kept_for_averaging(cfg: DictConfig, command: str | None) -> ConfigError | None:
    kept, averaged = cfg.checkpoint.save_top_k, cfg.average.last_n
    if kept == -1 or kept >= averaged:
        return None
    return ConfigError(
        "checkpoint.save_top_k",
        kept,
        f"training keeps fewer checkpoints than `aiayn average` averages (average.last_n={averaged})",
        f"set checkpoint.save_top_k={averaged} (or more; -1 keeps all) or average.last_n={kept}",
    )


def precision_error(precision: Any, gpu: str) -> ConfigError | None:
    """trainer.precision that cannot train on cluster.gpu, None if it can: bf16 needs bf16 arithmetic, which the
    accelerator table (pipeline/costs.py) lists as the device's number format: not a P100 (fp32) or V100 (fp16).
    The planner (pipeline/plan.py) refuses it too, rather than label a P100's memory bf16-mixed."""
    accelerator = ACCELERATORS.get(gpu)
    if accelerator is None or not str(precision).startswith("bf16") or accelerator.dtype == "bf16":
        return None
    return ConfigError(
        "trainer.precision",
        precision,
        f"a {gpu} (cluster.gpu) has no bf16 arithmetic ({accelerator.dtype} is its fastest)",
        "set trainer.precision=16-mixed or 32-true",
    )


def _precision_on_device(cfg: DictConfig, command: str | None) -> ConfigError | None:
    return precision_error(cfg.trainer.precision, cfg.cluster.gpu)


def _nbest(section: str) -> Callable[[DictConfig, str | None], ConfigError | None]:
    def check(cfg: DictConfig, command: str | None) -> ConfigError | None:
        nbest, beam = cfg[section].nbest, cfg[section].beam
        if nbest <= beam:
            return None
        return ConfigError(
            f"{section}.nbest",
            nbest,
            f"more hypotheses than the beam keeps ({section}.beam={beam})",
            f"set {section}.nbest to at most {beam}, or raise {section}.beam",
        )

    return check


def _tune_split(cfg: DictConfig, command: str | None) -> ConfigError | None:
    tune = cfg.evaluate.tune
    if not tune.enabled or tune.split != cfg.evaluate.split:
        return None
    return ConfigError(
        "evaluate.tune.split",
        tune.split,
        "is the split being scored (evaluate.split): a setting chosen on it would flatter its score",
        "tune on another split, e.g. evaluate.tune.split=valid",
    )


def _tune_nbest(cfg: DictConfig, command: str | None) -> ConfigError | None:
    tune, nbest = cfg.evaluate.tune, cfg.evaluate.nbest
    if not tune.enabled or nbest <= min(tune.beams):
        return None
    return ConfigError(
        "evaluate.nbest",
        nbest,
        f"more hypotheses than the smallest tuned beam keeps (evaluate.tune.beams={list(tune.beams)})",
        f"set evaluate.nbest to at most {min(tune.beams)}, or drop the smaller beams",
    )


# (the keys a rule reads, the rule): run for a command that reads all of them, after every key passed RULES.
CROSS_CHECKS: tuple[tuple[tuple[str, ...], Callable[[DictConfig, str | None], ConfigError | None]], ...] = (
    (("model.d_model", "model.n_heads", "model.d_k", "model.d_v"), _heads),
    (("model.vocab_size", "data.vocab_size"), _vocabulary),
    (("train.tokens_per_update", "data.max_tokens"), _tokens_per_update),
    (("train.tokens_per_update", "trainer.accumulate_grad_batches"), _accumulation),
    (("checkpoint.every_n_train_steps", "checkpoint.every_n_minutes"), _cadence),
    (("checkpoint.save_top_k", "average.last_n"), _kept_for_averaging),
    (("trainer.precision", "cluster.gpu"), _precision_on_device),
    (("evaluate.nbest", "evaluate.beam"), _nbest("evaluate")),
    (("translate.nbest", "translate.beam"), _nbest("translate")),
    (("evaluate.tune.enabled", "evaluate.tune.split", "evaluate.split"), _tune_split),
    (("evaluate.tune.enabled", "evaluate.tune.beams", "evaluate.nbest"), _tune_nbest),
)


# -- the checks -------------------------------------------------------------------------------------------------
_ABSENT = object()


def _select(cfg: DictConfig, key: str) -> Any:
    """The resolved value of key, _ABSENT if the config has no such key; a ${...} that fails is a ConfigError."""
    try:
        value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_resolution_failure=True)
    except OmegaConfBaseException as err:
        raw: Any = OmegaConf.to_container(cfg, resolve=False)
        for part in key.split("."):
            raw = raw.get(part) if isinstance(raw, dict) else None
        raise ConfigError(key, raw, f"cannot be resolved ({_first_line(err)})", "fix or drop the ${...}") from None
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


@functools.cache
def known_keys(section: str) -> frozenset[str]:
    """The keys the config tree defines for a closed section: conf/config.yaml's, its group's files' (conf/<section>/
    *.yaml) and the experiments' (conf/experiment/*.yaml, global package); model's are TransformerConfig's fields."""
    from pipeline.config import CONF_DIR

    if section == "model":
        from dataclasses import fields

        from modules.config import TransformerConfig

        return frozenset(f.name for f in fields(TransformerConfig))
    trees = [OmegaConf.load(CONF_DIR / "config.yaml")]
    trees += [OmegaConf.load(p) for p in sorted((CONF_DIR / "experiment").glob("*.yaml"))]
    keys = {str(k) for tree in trees if isinstance(tree.get(section), DictConfig) for k in tree[section]}
    keys |= {str(k) for p in sorted((CONF_DIR / section).glob("*.yaml")) for k in OmegaConf.load(p) if k != "defaults"}
    return frozenset(keys)


def _closed_keys(cfg: DictConfig, command: str | None) -> None:
    for section in CLOSED:
        node = cfg.get(section)
        if not isinstance(node, DictConfig):
            continue
        present = [str(k) for k in node if reads(command, f"{section}.{k}")]
        if not present:
            continue
        known = known_keys(section)
        for key in present:
            if key not in known:
                value = OmegaConf.select(cfg, f"{section}.{key}", throw_on_resolution_failure=False)
                raise unknown_key(f"{section}.{key}", value, (f"{section}.{k}" for k in known), closed=True)


def unknown_key(key: str, value: Any, known: Iterable[str], closed: bool) -> ConfigError:
    """No such key: did you mean the closest known one?"""

    def typed(name: str) -> str:
        return name if value is _NO_VALUE else f"{name}={show(value)}"

    close = difflib.get_close_matches(key, sorted(set(known)), n=1, cutoff=0.6)
    if close:
        fix = f"did you mean {typed(close[0])}?"
    elif closed:
        fix = f"`aiayn config` prints the keys of {key.split('.')[0]}"
    else:
        fix = f"`aiayn config` prints the keys; +{typed(key)} adds a new one"
    return ConfigError(key, value, "no such key", fix)


# -- places on disk ---------------------------------------------------------------------------------------------
# Commands that write under paths.output_dir (prepared data, run folders), and those of them that write a run folder.
WRITERS = ("train", "prepare", "run", "submit")
RUN_WRITERS = ("train", "run", "submit")


def unwritable(folder: Path) -> tuple[str, Path, bool] | None:
    """None if a file can be created in `folder` (where it does not exist yet: in the nearest folder above it, where
    it would be created); else what is wrong, that folder, and whether it can be fixed by making it writable (not
    when it is a file). The probe is an anonymous temporary file: nothing is left behind."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return (
            ("a file, not a folder" if existing == folder else f"{existing} is a file, not a folder"),
            existing,
            False,
        )
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        why = err.strerror or type(err).__name__
        problem = f"cannot be written ({why})" if existing == folder else f"cannot be created in {existing} ({why})"
        return problem, existing, True
    return None


def _refuse_unwritable(key: str, value: Any, folder: Path, also: str = "") -> None:
    found = unwritable(folder)
    if found is not None:
        problem, where, fixable = found
        fix = f"set {key}{also} to a folder you can write to" + (f", or make {where} writable" if fixable else "")
        raise ConfigError(key, value, problem, fix)


def _places(cfg: DictConfig, command: str | None) -> None:
    """run.dir names no file; the folders a writing command writes to can be written (a read-only output folder would
    otherwise fail with a traceback once the run started)."""
    run_dir = _select(cfg, "run.dir") if reads(command, "run.dir") else None
    run_dir = None if run_dir is _ABSENT or not run_dir else Path(str(run_dir)).expanduser()
    if run_dir is not None and run_dir.is_file():
        fix = (
            "set run.dir to a new folder's path (or to a run's folder, with run.resume=last to continue it)"
            if command in RUN_WRITERS
            else "set run.dir to a run's folder (the one `aiayn train` printed)"
        )
        raise ConfigError("run.dir", cfg.run.dir, "a file, not a folder", fix)
    if command not in WRITERS:
        return
    output = _select(cfg, "paths.output_dir")
    if output is not _ABSENT and output:
        _refuse_unwritable(
            "paths.output_dir", output, Path(str(output)).expanduser().resolve(), " (or AIAYN_OUTPUT_DIR)"
        )
    if command in RUN_WRITERS and run_dir is not None:
        _refuse_unwritable("run.dir", cfg.run.dir, run_dir.resolve())


def validate(cfg: DictConfig, command: str | None = None, started: bool = False) -> None:
    """Raise a ConfigError for the first key `command` reads (every key if None) that cannot run.

    started: the config of a run that started before (training resumed in its folder, whose config.yaml holds its
    settings and refuses others): its values are checked, but not the cross-key rules, which are for new runs (a
    run started before a rule existed could not be resumed, and could not be changed to pass it)."""
    for key, check in RULES.items():
        if not reads(command, key):
            continue
        value = _select(cfg, key)
        if value is _ABSENT:
            continue
        problem = check.problem(value)
        if problem:
            raise ConfigError(key, value, problem, check.fix(key, value))
    _closed_keys(cfg, command)
    _places(cfg, command)
    for keys, rule in () if started else CROSS_CHECKS:
        if all(reads(command, k) for k in keys) and all(_select(cfg, k) is not _ABSENT for k in keys):
            error = rule(cfg, command)
            if error is not None:
                raise error


# -- overrides --------------------------------------------------------------------------------------------------
def _all_keys(node: Any, prefix: str = "") -> Iterable[str]:
    """Every dotted key of a plain container: model, model.d_model, data.splits.train.src, ..."""
    if isinstance(node, dict):
        for k, child in node.items():
            yield f"{prefix}{k}"
            yield from _all_keys(child, f"{prefix}{k}.")


def _groups() -> dict[str, list[str]]:
    """conf/'s config groups and their options: {"model": ["base", "big", "small"], ...}."""
    from pipeline.config import CONF_DIR

    return {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in sorted(CONF_DIR.iterdir()) if d.is_dir()}


def _parse(overrides: list[str]) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    parsed = []
    for text in overrides:
        try:
            parsed.append(parser.parse_overrides([text])[0])
        except HydraException as err:
            lines = [line.strip() for line in str(err).splitlines() if line.strip().strip("^")]
            lines = [ln for ln in lines if not ln.startswith(("Error parsing override", "See https://"))]
            reason = lines[0] if lines and not lines[0].startswith("LexerNoViableAlt") else "Hydra's grammar"
            key = text.lstrip("+~")
            if "=" in text:
                fix = "quote a value holding spaces, commas, brackets or quotes: key='a value'"
            elif " " in text.strip():
                fix = 'overrides are key=value words; a sentence goes to `aiayn attention "<sentence>"` or on stdin'
                fix += " to `aiayn translate`"
            else:
                fix = f"write {key}=<value>, or ~{key} to delete it"
            raise ConfigError(text, _NO_VALUE, f"not a key=value override ({reason})", fix) from None
    return parsed


def load_checked(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """pipeline/config.py's load_config, with every way an override can be wrong as one ConfigError."""
    from hydra.errors import HydraException

    from pipeline.cluster import ClusterConfigError
    from pipeline.config import load_config

    parsed = _parse(list(overrides))
    groups = _groups()
    for override in parsed:  # a group option that does not exist: conf/<group>/<option>.yaml
        group = override.key_or_group
        if group in groups and not override.is_delete() and isinstance(override.value(), str):
            option = override.value()
            if option not in groups[group]:
                close = difflib.get_close_matches(option, groups[group], n=1, cutoff=0.5)
                fix = f"did you mean {group}={close[0]}?" if close else f"use one of {', '.join(groups[group])}"
                raise ConfigError(group, option, f"no such {group} config in conf/{group}/", fix)
    try:
        return load_config(overrides)
    except (HydraException, OmegaConfBaseException) as err:
        failure = err
    # Which value override names a key the tree does not have? Compose with the group choices alone to see.
    values = [o for o in parsed if o.key_or_group not in groups and not o.is_add() and not o.is_force_add()]
    base_overrides = [o.input_line for o in parsed if o.key_or_group in groups]
    try:
        base = load_config(base_overrides)
    except (HydraException, OmegaConfBaseException, ClusterConfigError):
        base = None
    if base is not None:
        known = set(_all_keys(OmegaConf.to_container(base, resolve=False)))
        for override in parsed:
            if override.is_add() and override.key_or_group in known and override.key_or_group not in groups:
                key, value = override.key_or_group, override.get_value_element_as_str()
                fix = f"drop the +: {key}={value} (++{key}={value} adds or sets)"
                raise ConfigError(key, value, "already in the config, and + adds a new key", fix) from None
        for override in values:
            if override.key_or_group not in known:
                value = _NO_VALUE if override.is_delete() else override.get_value_element_as_str()
                section = override.key_or_group.split(".")[0]
                raise unknown_key(override.key_or_group, value, known, closed=section in CLOSED) from None
    key = getattr(failure, "full_key", None) or getattr(failure.__cause__, "full_key", None) or "config"
    lines = [line.strip() for line in str(failure).splitlines() if line.strip()]
    problem = lines[0] + (f" ({_first_line(failure.__cause__)})" if failure.__cause__ else "")
    fix = " ".join(lines[1:]) or "check that override against `aiayn config`"
    raise ConfigError(key, _NO_VALUE, problem, fix) from None
