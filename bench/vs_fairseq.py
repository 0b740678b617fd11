"""Training throughput side by side with fairseq: the same model, data, batches and schedule, in one run.

fairseq is the reference toolkit for this paper. Both trainers train the same Transformer on the same Multi30k
training pairs, BPE-encoded with the same SentencePiece model (fairseq reads them as pieces through
`fairseq-preprocess --joined-dictionary`, with our vocabulary as its dictionary), in batches of max_tokens padded
tokens grouped by length (both count n_sentences x the longer side, eos included), with Adam (0.9, 0.98) and an
inverse-sqrt schedule, label smoothing 0.1, dropout 0.1, shared embeddings. (The learning rates differ a little:
fairseq's 7e-4 peak, our Eq. 3; a step costs the same whatever the rate.)

The runs alternate, round after round, each in a process of its own (--updates timed updates after --warmup
untimed ones), so that the machine's noise hits all of them alike; the table holds medians over rounds:
  ours     `aiayn`'s Lightning training step (bench/train_throughput.measure) in 32-true and bf16-mixed;
  fairseq  `fairseq-train --cpu` in fp32 (fairseq has no bf16 training on CPU), target tokens/s from its own
           logged wps and ups over the timed updates (--log-interval 10).
Writes bench/vs_fairseq.json (or --out).

    .venv/bin/python bench/vs_fairseq.py --fairseq-venv DIR [--models small base] [--rounds 3] [--updates 100]

DIR: a venv with fairseq: `python3 -m venv DIR && DIR/bin/pip install torch==2.13.0 fairseq-fixed==0.12.3.1`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.host import set_torch_environment  # noqa: E402

set_torch_environment()  # as `aiayn` does, before torch is imported (pipeline/host.py)

from train_throughput import CONFIGS, MAX_TOKENS  # noqa: E402  (bench/, first on sys.path for a bench script)

# Our side of each model (config overrides, max_tokens) is bench/train_throughput.py's CONFIGS and MAX_TOKENS;
# here, the same architecture in fairseq's arguments.
FAIRSEQ_ARCH = {
    "small": "--encoder-layers 3 --decoder-layers 3 --encoder-embed-dim 256 --decoder-embed-dim 256 "
    "--encoder-ffn-embed-dim 1024 --decoder-ffn-embed-dim 1024 --encoder-attention-heads 4 --decoder-attention-heads 4",
    "base": "--encoder-layers 6 --decoder-layers 6 --encoder-embed-dim 512 --decoder-embed-dim 512 "
    "--encoder-ffn-embed-dim 2048 --decoder-ffn-embed-dim 2048 --encoder-attention-heads 8 --decoder-attention-heads 8",
}
SHARED = (
    "--arch transformer --share-all-embeddings --dropout 0.1 --criterion label_smoothed_cross_entropy "
    "--label-smoothing 0.1 --optimizer adam --adam-betas (0.9,0.98) --lr 7e-4 --lr-scheduler inverse_sqrt "
    "--warmup-updates 4000 --cpu --seed 1 --log-format json --log-interval 10 --disable-validation --no-save "
    "--num-workers 0"
)


def fairseq_env(threads: int | None = None) -> dict[str, str]:
    """fairseq's environment: `threads` OpenMP threads (default: every core); fairseq 0.12 loads its checkpoints with
    torch.load's old default (weights_only=False)."""
    threads = threads or os.cpu_count() or 1
    return {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", "OMP_NUM_THREADS": str(threads)}


def eq3_train_command(
    venv: Path, bin_dir: Path, d_model: int, warmup: int, seed: int = 1, model: str = "small"
) -> list[str]:
    """fairseq-train of `model` (FAIRSEQ_ARCH) with Eq. 3's schedule (inverse_sqrt with peak d^-0.5 · warmup^-0.5
    and that warmup), saving checkpoints, seeded; the caller adds batches, updates and where to save."""
    peak_lr = d_model**-0.5 * warmup**-0.5
    shared = SHARED.replace("--no-save", "").replace("--lr 7e-4", f"--lr {peak_lr:.6g}")
    shared = shared.replace("--warmup-updates 4000", f"--warmup-updates {warmup}").replace("--seed 1", f"--seed {seed}")
    return [str(venv / "bin" / "fairseq-train"), str(bin_dir), *shared.split(), *FAIRSEQ_ARCH[model].split()]


# fairseq 0.12's batch_by_size, with its default required_batch_size_multiple of 8, can leave sentences out of the
# batches (Multi30k's valid split: its 6 longest of 1,014), so fairseq-validate and fairseq-generate would score a
# smaller split than ours and the hypotheses would no longer line up with the references.
WHOLE_SPLIT = ("--required-batch-size-multiple", "1")


def fairseq_generate(
    venv: Path,
    bin_dir: Path,
    checkpoint: Path,
    subset: str,
    size: int,
    beam: int,
    lenpen: float,
    max_tokens: int,
    max_extra: int,
    threads: int | None = None,
) -> tuple[list[str], str]:
    """fairseq-generate's best hypotheses (SentencePiece pieces) of a binarized subset of `size` sentences, in its
    order, outputs up to source length + max_extra; and its whole log (stdout and stderr)."""
    command = [str(venv / "bin" / "fairseq-generate"), str(bin_dir), "--path", str(checkpoint), "--cpu"]
    command += ["--gen-subset", subset, "--beam", str(beam), "--lenpen", str(lenpen), "--max-tokens", str(max_tokens)]
    command += ["--max-len-a", "1", "--max-len-b", str(max_extra), "--num-workers", "0", *WHOLE_SPLIT]
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=fairseq_env(threads))
    hyps = {}
    for line in out.stdout.splitlines():
        if line.startswith("H-"):
            key, _, pieces = line.split("\t", 2)
            hyps[int(key[2:])] = pieces
    if sorted(hyps) != list(range(size)):
        raise SystemExit(f"fairseq-generate translated {len(hyps)} of the {size} sentences of {subset}")
    return [hyps[i] for i in range(size)], out.stdout + out.stderr


def fairseq_data(work: Path, venv: Path, vocab_size: int, splits: tuple[str, ...] = ("train", "valid")) -> Path:
    """Multi30k `splits` as SentencePiece pieces, binarized by fairseq-preprocess with our vocabulary padded to
    vocab_size entries; each split made once per vocabulary size."""
    from data import TranslationDataModule
    from pipeline.config import load_config, output_dir

    bin_dir = work / f"bin-{vocab_size}"
    missing = [split for split in splits if not (bin_dir / f"{split}.en-de.de.bin").is_file()]
    if not missing:
        return bin_dir
    cfg = load_config([])
    datamodule = TranslationDataModule(cfg.data, output_dir(cfg), seed=cfg.seed)
    datamodule.setup()
    tokenizer = datamodule.tokenizer
    text = work / "text"
    text.mkdir(parents=True, exist_ok=True)
    for split in missing:
        pairs = datamodule.splits[split]
        for side, lang in ((0, "en"), (1, "de")):
            with open(text / f"{split}.{lang}", "w", encoding="utf-8") as f:
                for i in range(len(pairs)):
                    f.write(" ".join(tokenizer.sp.id_to_piece(int(t)) for t in pairs[i][side]) + "\n")
    # fairseq's dictionary: its 4 specials, then ours (without our specials), then fillers up to vocab_size.
    specials = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id}
    words = [tokenizer.sp.id_to_piece(i) for i in range(tokenizer.vocab_size) if i not in specials]
    words += [f"madeupfiller{i}" for i in range(vocab_size - 4 - len(words))]
    dictionary = work / f"dict-{vocab_size}.txt"
    dictionary.write_text("".join(f"{w} 1\n" for w in words), encoding="utf-8")
    prefixes = [arg for split in missing for arg in (f"--{split}pref", str(text / split))]
    for lang in ("en", "de"):  # fairseq-preprocess refuses to overwrite them; they are the same dictionary
        (bin_dir / f"dict.{lang}.txt").unlink(missing_ok=True)
    subprocess.run(
        [str(venv / "bin" / "fairseq-preprocess"), "--source-lang", "en", "--target-lang", "de", *prefixes,
         "--destdir", str(bin_dir), "--srcdict", str(dictionary), "--joined-dictionary", "--workers", "2"],
        check=True, capture_output=True,
    )  # fmt: skip
    return bin_dir


def run_fairseq(bin_dir: Path, venv: Path, model: str, warmup: int, updates: int) -> float:
    """Target tokens/s of fairseq-train over updates (warmup, warmup + updates]: sum(wpb * n) / sum(n / ups)."""
    command = [str(venv / "bin" / "fairseq-train"), str(bin_dir), *SHARED.split(), *FAIRSEQ_ARCH[model].split()]
    command += ["--max-tokens", str(MAX_TOKENS[model]), "--max-update", str(warmup + updates)]
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    tokens = seconds = 0.0
    previous = 0
    for line in (out.stdout + out.stderr).splitlines():
        if '"wps"' not in line or '"ups"' not in line:
            continue  # train_inner lines carry both; the epoch summary has no ups
        record = json.loads(line[line.index("{") :])
        done = int(record.get("num_updates", 0))
        if "ups" in record and "wpb" in record and done > warmup and previous >= warmup:
            n = done - previous
            tokens += float(record["wpb"]) * n
            seconds += n / float(record["ups"])
        previous = done
    if not seconds:
        raise SystemExit(f"no fairseq train_inner logs after update {warmup}:\n{out.stdout[-2000:]}")
    return tokens / seconds


def run_ours(model: str, precision: str, warmup: int, updates: int) -> float:
    """Target tokens/s of our training step, in a process of its own (like fairseq's)."""
    command = [sys.executable, __file__, "--child", model, precision, str(warmup), str(updates)]
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def child(model: str, precision: str, warmup: int, updates: int) -> None:
    import torch
    from train_throughput import measure

    from data import TranslationDataModule
    from pipeline.config import load_config, output_dir

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = load_config(CONFIGS[model])
    datamodule = TranslationDataModule(cfg.data, output_dir(cfg), seed=cfg.seed)
    datamodule.prepare_data()
    datamodule.setup("fit")
    print(measure(model, precision, datamodule, updates, warmup))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fairseq-venv", type=Path, help="a venv with fairseq (required)")
    parser.add_argument("--models", nargs="+", default=["small", "base"], choices=sorted(FAIRSEQ_ARCH))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--updates", type=int, default=100, help="timed updates per run")
    parser.add_argument("--warmup", type=int, default=10, help="untimed updates first")
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "bench" / "vs_fairseq")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("vs_fairseq.json"))
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, precision, warmup, updates = args.child
        return child(model, precision, int(warmup), int(updates))
    if args.fairseq_venv is None:
        parser.error("--fairseq-venv DIR is required (make bench builds one)")

    runs: dict[str, list[float]] = {}
    bins = {m: fairseq_data(args.work, args.fairseq_venv, 37000 if m == "base" else 8000) for m in args.models}
    for round_ in range(args.rounds):
        for model in args.models:
            for name in ("fairseq/fp32", "ours/32-true", "ours/bf16-mixed"):
                if name == "fairseq/fp32":
                    tps = run_fairseq(bins[model], args.fairseq_venv, model, args.warmup, args.updates)
                else:
                    tps = run_ours(model, name.split("/")[1], args.warmup, args.updates)
                key = f"{model}/{name}"
                runs.setdefault(key, []).append(tps)
                print(f"round {round_}: {key:24s} {runs[key][-1]:8.0f} target tokens/s", flush=True)

    medians = {key: round(statistics.median(values)) for key, values in runs.items()}
    ratios = {}
    for model in args.models:
        fairseq = medians[f"{model}/fairseq/fp32"]
        for precision in ("32-true", "bf16-mixed"):
            ratios[f"{model}/ours {precision} / fairseq fp32"] = round(
                medians[f"{model}/ours/{precision}"] / fairseq, 2
            )
    report = {
        "what": "target tokens/s of training updates, ours vs fairseq-train, same model/data/batches/schedule",
        "command": "python bench/vs_fairseq.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "max_tokens": {m: MAX_TOKENS[m] for m in args.models},
        "updates_timed": args.updates,
        "updates_warmup": args.warmup,
        "tokens_per_sec": medians,
        "ratios": ratios,
        "runs": runs,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"tokens_per_sec": medians, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
