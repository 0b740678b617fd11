"""Quality per update beside fairseq: the same model, data, batches and schedule, scored at the same updates.

On a GPU cluster the budget is updates. Both toolkits train --model (small or base: bench/vs_fairseq.py's
FAIRSEQ_ARCH; both on the default experiment's 8,000-piece vocabulary, fairseq through its binarized copy of our
pieces) from each --seeds seed on Multi30k with Eq. 3's schedule as conf/experiment/multi30k.yaml sets it (warmup
1000; fairseq's inverse_sqrt with the same peak d^-0.5 · warmup^-0.5 and warmup), batches of 4096 tokens, label
smoothing 0.1, dropout 0.1: ours `aiayn train` of the default experiment (bf16-mixed), fairseq-train in fp32 (it has
no bf16 on CPU). Checkpoints at every --updates count are scored:

  valid_nll   the validation split's negative log-likelihood per target token (<eos> included), in nats: what each
              model learned, whatever the search. Ours: TranslationModule.batch_losses over the split; fairseq:
              fairseq-validate's nll_loss (bits) · ln 2.
  test        test_2016_flickr with beam 4 and the paper's α 0.6 (ours GNMT's ((5+|Y|)/6)^α; fairseq-generate's
              --lenpen 0.6, |Y|^α), outputs up to source length + 50: sacreBLEU, chrF, output words.
  tuned       the same after choosing α on the validation split from --alphas (each toolkit's own penalty), the
              best by BLEU, the first of equals in --alphas' order: the choice `aiayn evaluate
              evaluate.tune.enabled=true` makes, done here alike for both toolkits.
  same_search test with greedy search, the same search in both toolkits, so what differs is the model; and with
              beam 4 at α 0, where both rank by log P alone (both penalties are 1) but still stop differently
              (fairseq at the beam's 4th finished hypothesis, ours when no live one can beat the best finished).
The means over seeds (`summary_mean_over_seeds`) come with BLEU's standard deviation over the seeds: the noise of a
training run, against which a difference between the toolkits is read.

Each checkpoint is trained and scored once, and reused (--work, its scores/ folder). --ours-runs takes an existing
run of ours for a seed instead (`make train ARGS="checkpoint.every_n_train_steps=100 checkpoint.save_top_k=-1"` is
the default experiment at seed 1, the same training with more checkpoints kept). Writes bench/quality_per_update.json
(or --out).

    .venv/bin/python bench/quality_per_update.py --fairseq-venv DIR [--model small] [--seeds 1 2]
        [--updates 600 2000] [--ours-overrides KEY=VALUE ...] [--tag NAME] [--no-train]

DIR: a venv with fairseq (bench/vs_fairseq.py says how to make one).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.host import set_torch_environment  # noqa: E402

set_torch_environment()  # as `aiayn` does, before torch is imported (pipeline/host.py)

from vs_fairseq import (  # noqa: E402  (bench/ is first on sys.path)
    WHOLE_SPLIT,
    eq3_train_command,
    fairseq_data,
    fairseq_env,
    fairseq_generate,
)

MAX_TOKENS, WARMUP = 4096, 1000  # conf/experiment/multi30k.yaml's batches and warmup
# --model: d_model and our config overrides; both shapes use the 8,000-piece vocabulary of the default experiment
# (the one fairseq's binarized copy has), so that the shape is the only change.
MODELS = {"small": (256, ["model=small"]), "base": (512, ["model=base", "model.vocab_size=8000"])}
SAVE_EVERY = 200  # updates between checkpoints: every --updates count must be a multiple
ALPHAS = (0.6, 1.0, 1.4)  # α tried on valid: the paper's and larger (an early model ends sentences early)


def fairseq_checkpoints(save_dir: Path) -> dict[int, Path]:
    """{update: checkpoint} of a fairseq-train save dir."""
    return {int(path.stem.rsplit("_", 1)[1]): path for path in save_dir.glob("checkpoint_*_*.pt")}


def start_fairseq(
    bin_dir: Path, venv: Path, save_dir: Path, model: str, updates: int, seed: int, threads: int
) -> subprocess.Popen | None:
    """fairseq-train of `model` for `updates` updates, saving every SAVE_EVERY, started in the background with
    `threads` threads; None if its checkpoint at `updates` exists already. A save dir with a checkpoint_last.pt
    resumes from it (fairseq-train's --restore-file default)."""
    if updates in fairseq_checkpoints(save_dir):
        return None
    command = eq3_train_command(venv, bin_dir, MODELS[model][0], WARMUP, seed, model)
    command += ["--max-tokens", str(MAX_TOKENS), "--max-update", str(updates)]
    command += ["--save-dir", str(save_dir), "--no-epoch-checkpoints", "--save-interval-updates", str(SAVE_EVERY)]
    save_dir.mkdir(parents=True, exist_ok=True)
    log = open(save_dir.with_suffix(".log"), "w")  # noqa: SIM115  (the child writes it until it ends)
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=fairseq_env(threads))


def train_fairseq_seeds(
    bin_dir: Path, venv: Path, work: Path, model: str, updates: int, seeds: list[int]
) -> dict[int, dict]:
    """Every seed's fairseq run at once, one thread each (two single-threaded runs on two cores finish sooner than
    the same runs one after the other on both cores); {seed: {update: checkpoint}}."""
    threads = max(1, (os.cpu_count() or 1) // len(seeds))
    saves = {seed: work / f"fairseq-{model}-s{seed}" for seed in seeds}
    started = [start_fairseq(bin_dir, venv, saves[s], model, updates, s, threads) for s in seeds]
    for process in started:
        if process is not None and process.wait() != 0:
            raise SystemExit(f"fairseq-train failed: see {work}/fairseq-{model}-s*.log")
    return {seed: fairseq_checkpoints(save) for seed, save in saves.items()}


def fairseq_batches(log: Path) -> dict[str, float]:
    """Target tokens (wpb) and sentences (bsz) per update, mean over fairseq-train's epoch summaries."""
    epochs = []
    for line in log.read_text().splitlines():
        if "| train |" in line and "{" in line:
            epochs.append(json.loads(line[line.index("{") :]))
    if not epochs:
        return {}
    return {key: round(statistics.mean(float(e[f"train_{key}"]) for e in epochs), 1) for key in ("wpb", "bsz")}


def ours_batches(datamodule: Any) -> dict[str, float]:
    """The same for our sampler's first epoch of the training split (data/batching.py)."""
    import numpy as np

    from data.batching import TokenBatchSampler

    pairs = datamodule.splits["train"]
    src = np.array([len(pairs[i][0]) for i in range(len(pairs))])
    tgt = np.array([len(pairs[i][1]) for i in range(len(pairs))])
    batches = TokenBatchSampler(src, tgt, MAX_TOKENS, seed=1).epoch_batches(0)
    return {
        "wpb": round(float(np.mean([(tgt[b] + 1).sum() for b in batches])), 1),
        "bsz": round(float(np.mean([len(b) for b in batches])), 1),
    }


def train_ours(run_dir: Path, updates: int, seed: int, overrides: list[str]) -> dict[int, Path]:
    """`aiayn train` of the default experiment with `overrides` for `updates` steps; {step: checkpoint}. A run
    folder with a last.ckpt resumes from it."""
    if not (run_dir / "checkpoints" / f"step{updates:07d}.ckpt").is_file():
        command = [sys.executable, "-m", "pipeline", "train", f"trainer.max_steps={updates}", "trainer.max_time=null"]
        command += [f"run.dir={run_dir}", "trainer.limit_val_batches=0", "run.val_bleu_sentences=0", "run.n_samples=0"]
        command += ["trainer.enable_progress_bar=false", "logger.wandb.enabled=false", f"seed={seed}"]
        command += [f"checkpoint.every_n_train_steps={SAVE_EVERY}", "checkpoint.save_top_k=-1", *overrides]
        if (run_dir / "checkpoints" / "last.ckpt").is_file():  # stopped at fewer updates: continue it
            command.append("run.resume=last")
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(run_dir.with_suffix(".log"), "w") as out:
            subprocess.run(command, check=True, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    return run_checkpoints(run_dir)


def run_checkpoints(run_dir: Path) -> dict[int, Path]:
    """{step: checkpoint} of a run folder of ours (a link: the file it names, so the report says where it came from)."""
    return {int(p.stem[4:]): p.resolve() for p in (run_dir / "checkpoints").glob("step*.ckpt")}


def fairseq_valid_nll(bin_dir: Path, venv: Path, checkpoint: Path) -> float:
    """fairseq-validate's nll_loss on the valid split (bits per target token), in nats."""
    command = [str(venv / "bin" / "fairseq-validate"), str(bin_dir), "--path", str(checkpoint), "--cpu"]
    command += [
        "--task",
        "translation",
        "--valid-subset",
        "valid",
        "--max-tokens",
        str(MAX_TOKENS),
        "--num-workers",
        "0",
        *WHOLE_SPLIT,
    ]
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=fairseq_env())
    match = re.search(r"nll_loss ([\d.]+)", out.stdout + out.stderr)
    if match is None:
        raise SystemExit(f"no nll_loss in fairseq-validate's output:\n{(out.stdout + out.stderr)[-2000:]}")
    return float(match.group(1)) * math.log(2)


def fairseq_translate(
    bin_dir: Path, venv: Path, checkpoint: Path, subset: str, size: int, beam: int, lenpen: float
) -> list[str]:
    """fairseq-generate's hypotheses (SentencePiece pieces) of a subset of `size` sentences, in its order."""
    return fairseq_generate(venv, bin_dir, checkpoint, subset, size, beam, lenpen, MAX_TOKENS, 50)[0]


LR_STEPS = (1, 2, 10, 100, 500, 999, 1000, 1001, 2000)  # updates at which the two schedules are printed

FAIRSEQ_LR = """
import json, torch
from fairseq.optim import FairseqOptimizer
from fairseq.optim.lr_scheduler.inverse_square_root_schedule import (
    InverseSquareRootLRScheduleConfig, InverseSquareRootSchedule)
class Optimizer(FairseqOptimizer):  # the scheduler only sets and reads the rate
    def __init__(self):
        super().__init__(None)
        self._optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
schedule = InverseSquareRootSchedule(
    InverseSquareRootLRScheduleConfig(warmup_updates={warmup}, lr=[{peak}]), Optimizer())
schedule.step_begin_epoch(1)
# fairseq's Trainer: lr_step_begin_epoch() sets step_update(0) before the first update, set_num_updates(k) sets
# step_update(k) after the k-th: update k runs at step_update(k - 1).
print(json.dumps([schedule.step_update(k - 1) for k in {steps}]))
"""


def lr_curves(venv: Path, d_model: int) -> list[dict[str, float]]:
    """The rate of update k under our Eq. 3 scheduler (modules/schedule.py, as Lightning steps it) and fairseq's
    inverse_sqrt (run in its venv, stepped as its Trainer steps it), at LR_STEPS."""
    import torch

    from modules.schedule import inverse_sqrt_scheduler

    peak = d_model**-0.5 * WARMUP**-0.5
    code = FAIRSEQ_LR.format(peak=peak, warmup=WARMUP, steps=list(LR_STEPS))
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], check=True, capture_output=True, text=True)
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = inverse_sqrt_scheduler(optimizer, d_model, WARMUP)
    mine = {}
    for k in range(1, max(LR_STEPS) + 1):  # update k runs at the rate set before it
        mine[k] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
    return [{"update": k, "ours": mine[k], "fairseq": theirs[i]} for i, k in enumerate(LR_STEPS)]


class Ours:
    """Our checkpoints scored in this process: validation NLL, and translations through modules/decoding.py."""

    def __init__(self) -> None:
        from pipeline.config import load_config

        self.cfg = load_config([])
        self.datamodule: Any = None
        self.splits: dict[str, tuple[list, list[str]]] = {}

    def load_data(self) -> None:
        """The default experiment's prepared data: the valid and test splits' source ids and raw references."""
        from data import TranslationDataModule
        from pipeline.config import output_dir
        from pipeline.inference import prepared_split

        self.datamodule = TranslationDataModule(self.cfg.data, output_dir(self.cfg), seed=self.cfg.seed)
        self.datamodule.prepare_data()
        self.datamodule.setup()
        self.splits = {split: prepared_split(self.datamodule, split) for split in ("valid", "test")}

    def module(self, checkpoint: Path) -> Any:
        from pipeline.inference import load_module

        module = load_module(checkpoint)[0]
        module.use_device("cpu")
        return module

    def valid_nll(self, checkpoint: Path) -> float:
        """Summed NLL over the valid split's target tokens (<eos> included) / their number, in float32."""
        import numpy as np
        import torch

        from data.collate import collate_pairs
        from modules.decoding import length_batches

        module, pairs, tokenizer = self.module(checkpoint), self.datamodule.splits["valid"], self.datamodule.tokenizer
        lengths = np.array([max(len(pairs[i][0]), len(pairs[i][1])) + 1 for i in range(len(pairs))])
        nll = tokens = 0.0
        with torch.no_grad():
            for batch in length_batches(lengths, MAX_TOKENS):
                chosen = [pairs[int(i)] for i in batch]
                tensors = collate_pairs(chosen, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id)
                _, nll_sum, n_tokens = module.batch_losses(tensors)
                nll, tokens = nll + float(nll_sum), tokens + float(n_tokens)
        return nll / tokens

    def translate(self, checkpoint: Path, split: str, beam: int, alpha: float) -> list[str]:
        """Beam search with GNMT's penalty at alpha, source length + 50, float32 (`aiayn evaluate`'s defaults)."""
        import torch

        from modules.decoding import Decoding, translate_ids
        from pipeline.inference import load_model

        (model, _), tokenizer = load_model(checkpoint), self.datamodule.tokenizer
        search = Decoding(beam=beam, alpha=alpha).search(tokenizer.bos_id, tokenizer.eos_id)
        sources = self.splits[split][0]
        nbest = translate_ids(
            model, sources, search, tokenizer.pad_id, tokenizer.eos_id, MAX_TOKENS, torch.device("cpu")
        )
        return tokenizer.decode([hyps[0].tokens for hyps in nbest])


def scored(hyps: list[str], references: list[str]) -> dict[str, float]:
    from pipeline.scores import score

    result = score(hyps, references)
    return {
        "bleu": round(result["bleu"], 2),
        "chrf": round(result["chrf"], 2),
        "length_ratio": round(result["length_ratio"], 3),
        "words": sum(len(h.split()) for h in hyps),
    }


def evaluate(translate: Any, references: dict[str, list[str]], alphas: list[float]) -> dict[str, Any]:
    """translate(split, beam, alpha) -> hypotheses: test at beam 4 and α 0.6; test at the α best by BLEU on valid;
    and test with greedy search (the same in both toolkits) and beam 4 ranked by log P alone (α 0: both length
    penalties are 1)."""
    paper = scored(translate("test", 4, 0.6), references["test"])
    on_valid = {alpha: scored(translate("valid", 4, alpha), references["valid"])["bleu"] for alpha in alphas}
    best = max(alphas, key=on_valid.__getitem__)  # the first best in --alphas' order, as evaluate.tune picks
    tuned = paper if best == 0.6 else scored(translate("test", 4, best), references["test"])
    same_search = {
        "greedy": scored(translate("test", 1, 0.0), references["test"]),
        "beam4_alpha0": scored(translate("test", 4, 0.0), references["test"]),
    }
    return {"test": paper, "tuned": {"alpha": best, "valid_bleu": on_valid, **tuned}, "same_search": same_search}


def score_checkpoint(
    toolkit: str, checkpoint: Path, ours: Ours, bin_dir: Path, venv: Path, alphas: list[float]
) -> dict[str, Any]:
    """valid_nll, test and tuned (module docstring) of one checkpoint of `toolkit`."""
    if toolkit == "ours":
        nll = ours.valid_nll(checkpoint)

        def translate(split: str, beam: int, alpha: float) -> list[str]:
            return ours.translate(checkpoint, split, beam, alpha)
    else:
        nll = fairseq_valid_nll(bin_dir, venv, checkpoint)
        sp = ours.datamodule.tokenizer.sp

        def translate(split: str, beam: int, alpha: float) -> list[str]:
            pieces = fairseq_translate(bin_dir, venv, checkpoint, split, len(ours.splits[split][1]), beam, alpha)
            return [sp.decode_pieces(p.split()) for p in pieces]

    references = {split: ours.splits[split][1] for split in ("valid", "test")}
    return {"valid_nll": round(nll, 4), **evaluate(translate, references, alphas)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fairseq-venv", type=Path, required=True)
    parser.add_argument("--model", choices=sorted(MODELS), default="small", help="the shape both toolkits train")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--updates", type=int, nargs="+", default=[600, 2000])
    parser.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS))
    parser.add_argument("--ours-overrides", nargs="*", default=[], help="config overrides of our runs")
    parser.add_argument("--tag", default="", help="names our runs apart when --ours-overrides change them")
    parser.add_argument(
        "--ours-runs",
        nargs="*",
        default=[],
        metavar="SEED=RUN_DIR",
        help="an existing run of ours for a seed instead of training one (`make train` with "
        f"checkpoint.every_n_train_steps={SAVE_EVERY // 2} is seed 1's)",
    )
    parser.add_argument("--no-train", action="store_true", help="score the checkpoints there are; train none")
    parser.add_argument("--skip-fairseq", action="store_true", help="only our runs (a change of ours, measured)")
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "bench" / "quality_per_update")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("quality_per_update.json"))
    args = parser.parse_args()
    if any(u % SAVE_EVERY for u in args.updates):
        raise SystemExit(f"--updates must be multiples of {SAVE_EVERY} (the checkpoint interval)")

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    last = max(args.updates)
    bin_dir = fairseq_data(
        ROOT / "outputs" / "bench" / "vs_fairseq", args.fairseq_venv, 8000, ("train", "valid", "test")
    )
    curves = lr_curves(args.fairseq_venv, MODELS[args.model][0])
    print(
        "learning rate of update k:\n"
        + "\n".join(f"  {r['update']:5d} {r['ours']:.6e} {r['fairseq']:.6e}" for r in curves)
    )
    ours = Ours()
    ours.load_data()
    rows: list[dict[str, Any]] = []
    if args.skip_fairseq:
        fairseq = {}
    elif args.no_train:
        fairseq = {seed: fairseq_checkpoints(args.work / f"fairseq-{args.model}-s{seed}") for seed in args.seeds}
    else:
        fairseq = train_fairseq_seeds(bin_dir, args.fairseq_venv, args.work, args.model, last, args.seeds)
    missing: list[str] = []
    for seed in args.seeds:
        runs = {} if args.skip_fairseq else {"fairseq": fairseq[seed]}
        given = dict(item.split("=", 1) for item in args.ours_runs)
        if str(seed) in given:
            runs["ours"] = run_checkpoints(Path(given[str(seed)]))
        elif args.no_train:
            runs["ours"] = run_checkpoints(args.work / f"ours-{args.model}-s{seed}{args.tag}")
        else:
            overrides = MODELS[args.model][1] + args.ours_overrides
            runs["ours"] = train_ours(args.work / f"ours-{args.model}-s{seed}{args.tag}", last, seed, overrides)
        for toolkit, checkpoints in runs.items():
            for updates in args.updates:
                if updates not in checkpoints:
                    missing.append(f"{toolkit} seed {seed} at {updates} updates")
                    continue
                started = time.perf_counter()
                row = {"toolkit": toolkit, "seed": seed, "updates": updates, "checkpoint": str(checkpoints[updates])}
                cached = (
                    args.work
                    / "scores"
                    / f"{toolkit}-{args.model}-s{seed}{args.tag if toolkit == 'ours' else ''}-u{updates}.json"
                )
                previous = json.loads(cached.read_text()) if cached.is_file() else {}
                if (
                    previous.get("checkpoint") == row["checkpoint"]
                    and previous.get("alphas") == args.alphas
                    and "same_search" in previous
                ):
                    row = previous  # scored by an earlier run: the same checkpoint, α grid and searches
                else:
                    row |= score_checkpoint(
                        toolkit, checkpoints[updates], ours, bin_dir, args.fairseq_venv, args.alphas
                    )
                    row["alphas"] = args.alphas
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    cached.write_text(json.dumps(row, indent=2) + "\n")
                rows.append(row)
                test, tuned, same = row["test"], row["tuned"], row["same_search"]
                print(
                    f"{toolkit:8s} seed {seed} {updates:5d} updates: valid nll {row['valid_nll']:.4f}, test α 0.6 "
                    f"BLEU {test['bleu']:.2f} chrF {test['chrf']:.2f} ratio {test['length_ratio']:.3f}; tuned α "
                    f"{tuned['alpha']}: BLEU {tuned['bleu']:.2f} chrF {tuned['chrf']:.2f}; greedy BLEU "
                    f"{same['greedy']['bleu']:.2f}, beam 4 α 0 BLEU {same['beam4_alpha0']['bleu']:.2f} "
                    f"({time.perf_counter() - started:.0f} s)",
                    flush=True,
                )
    summary = {}
    for toolkit in sorted({row["toolkit"] for row in rows}):
        for updates in args.updates:
            mine = [row for row in rows if row["toolkit"] == toolkit and row["updates"] == updates]
            if not mine:
                continue
            searches = {
                "test": [row["test"] for row in mine],
                "tuned": [row["tuned"] for row in mine],
                **{name: [row["same_search"][name] for row in mine] for name in ("greedy", "beam4_alpha0")},
            }
            summary[f"{toolkit}/{updates}"] = {
                "seeds": [row["seed"] for row in mine],
                "valid_nll": round(statistics.mean(row["valid_nll"] for row in mine), 4),
                **{
                    f"{kind}_{metric}": round(statistics.mean(result[metric] for result in results), 2)
                    for kind, results in searches.items()
                    for metric in ("bleu", "chrf", "length_ratio")
                },
                # run-to-run noise: the standard deviation of BLEU over the seeds
                **{
                    f"{kind}_bleu_sd": round(statistics.stdev(result["bleu"] for result in results), 2)
                    for kind, results in searches.items()
                    if len(results) > 1
                },
            }
    report = {
        "what": f"quality at equal updates, ours vs fairseq-train: {args.model} model, Multi30k, same data, batches "
        "and schedule; valid NLL per target token (nats), test_2016_flickr beam 4 at α 0.6 and at the α tuned on valid",
        "command": "python bench/quality_per_update.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "ours_overrides": args.ours_overrides,
        "summary_mean_over_seeds": summary,
        "learning_rate": curves,
        "batches_per_update": {
            "ours": ours_batches(ours.datamodule),
            "fairseq": fairseq_batches(args.work / f"fairseq-{args.model}-s{args.seeds[0]}.log")
            if not args.skip_fairseq
            else {},
        },
        "rows": rows,
        "not_run": missing,
        "reference_words": sum(len(r.split()) for r in ours.splits["test"][1]),
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
