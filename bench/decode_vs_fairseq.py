"""Beam-4 decoding side by side with fairseq-generate: the same model size, data and search, in one run.

Both toolkits' small model (bench/train_throughput.py CONFIGS["small"]; fairseq's arguments in vs_fairseq.py) is
trained for --updates updates on Multi30k with the same schedule (Eq. 3 with warmup 1000, as conf/experiment/
multi30k.yaml: fairseq's inverse_sqrt with the same peak and warmup), batches of 4096 tokens and bf16-mixed (ours)
or fp32 (fairseq, which has no bf16 on CPU). Each checkpoint is made once and reused (--work); --ours-checkpoint
takes an existing one of ours instead.

Then the 1,000 Multi30k test sentences (test_2016_flickr) are translated, rounds alternating which goes first, with
beam 4, length penalty α 0.6, outputs up to source length + 50 tokens and batches of 4096 source tokens:
  ours     modules/decoding.translate_ids, pipeline/inference.make_search(evaluate.*) (as `aiayn evaluate` runs), timed
           around the decoding, in float32 and with evaluate.precision=bf16-mixed;
  fairseq  `fairseq-generate --beam 4 --lenpen 0.6 --max-len-a 1 --max-len-b 50 --max-tokens 4096 --cpu`, its
           own "Translated N sentences ... in T s" (decoding only, like ours).
Both use 2 threads. Both outputs are detokenized with the same SentencePiece model and scored with sacrebleu, so
that a speed is never bought with shorter or worse translations. Writes bench/decode_vs_fairseq.json (or --out).

    .venv/bin/python bench/decode_vs_fairseq.py --fairseq-venv DIR [--updates 628] [--rounds 3]
        [--ours-checkpoint CKPT]
"""

from __future__ import annotations

import argparse
import json
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

from vs_fairseq import eq3_train_command, fairseq_data, fairseq_env, fairseq_generate  # noqa: E402  (bench/ is first on sys.path)

MAX_TOKENS, WARMUP = 4096, 1000  # training batches and warmup of conf/experiment/multi30k.yaml


def train_fairseq(bin_dir: Path, venv: Path, save_dir: Path, updates: int, d_model: int) -> Path:
    """fairseq's small model after `updates` updates, with Eq. 3's schedule (peak d^-0.5 · warmup^-0.5)."""
    checkpoint = save_dir / "checkpoint_last.pt"
    if checkpoint.is_file():
        return checkpoint
    command = eq3_train_command(venv, bin_dir, d_model, WARMUP)
    command += ["--max-tokens", str(MAX_TOKENS), "--max-update", str(updates), "--save-dir", str(save_dir)]
    command += ["--no-epoch-checkpoints"]
    log = save_dir.with_suffix(".log")
    save_dir.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        subprocess.run(command, check=True, stdout=out, stderr=subprocess.STDOUT, env=fairseq_env(2))
    return checkpoint


def train_ours(run_dir: Path, updates: int) -> Path:
    """Our small model after `updates` updates: `aiayn train` of the default experiment, stopped by steps."""
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    if checkpoint.is_file():
        return checkpoint
    command = [sys.executable, "-m", "pipeline", "train", f"trainer.max_steps={updates}", "trainer.max_time=null"]
    command += [f"run.dir={run_dir}", "trainer.limit_val_batches=0", "run.val_bleu_sentences=0"]
    command += ["trainer.enable_progress_bar=false", "logger.wandb.enabled=false"]
    subprocess.run(command, check=True, cwd=ROOT)
    return checkpoint


def run_fairseq_generate(
    bin_dir: Path, venv: Path, checkpoint: Path, size: int, decoding: Any
) -> tuple[float, list[str]]:
    """(sentences/s as fairseq-generate reports it, best hypotheses as pieces in test-set order), with our
    evaluate.* decoding settings (`decoding`) in fairseq's arguments."""
    pieces, text = fairseq_generate(
        venv, bin_dir, checkpoint, "test", size, decoding.beam, decoding.alpha, decoding.max_tokens,
        decoding.max_extra,
    )  # fmt: skip
    timing = re.search(r"Translated ([\d,]+) sentences .* in ([\d.]+)s \(([\d.]+) sentences/s", text)
    if timing is None:
        raise SystemExit(f"no 'Translated ... sentences/s' line in fairseq-generate's output:\n{text[-2000:]}")
    return float(timing.group(3)), pieces


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fairseq-venv", type=Path, required=True, help="a venv with fairseq (make bench builds it)")
    parser.add_argument("--updates", type=int, default=628, help="training updates of both models")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ours-checkpoint", type=Path, help="an existing checkpoint of ours instead of training")
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "bench" / "decode_vs_fairseq")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("decode_vs_fairseq.json"))
    args = parser.parse_args()

    import torch

    from modules.decoding import translate_ids
    from pipeline.config import load_config
    from pipeline.host import reuse_freed_memory
    from pipeline.inference import load_for_inference, make_search, prepared_split
    from pipeline.scores import score

    torch.set_num_threads(2)
    reuse_freed_memory()  # as `aiayn evaluate` does on CPU
    bin_dir = fairseq_data(ROOT / "outputs" / "bench" / "vs_fairseq", args.fairseq_venv, 8000, splits=("test",))
    fairseq_checkpoint = train_fairseq(
        bin_dir, args.fairseq_venv, args.work / f"fairseq-small-u{args.updates}", args.updates, d_model=256
    )
    ours_checkpoint = args.ours_checkpoint or train_ours(args.work / f"ours-small-u{args.updates}", args.updates)

    cfg = load_config([])
    model, checkpoint, datamodule = load_for_inference(cfg, ours_checkpoint, "evaluate")
    sources, references = prepared_split(datamodule, "test")
    tokenizer = datamodule.tokenizer
    decoding = cfg.evaluate  # section 6.1: beam 4, alpha 0.6, source length + 50; batches of 4096 tokens
    search, _ = make_search(decoding, tokenizer.bos_id, tokenizer.eos_id)  # what `aiayn evaluate` decodes with

    names = ("ours/32-true", "ours/bf16-mixed", "fairseq/fp32")
    speed: dict[str, list[float]] = {name: [] for name in names}
    outputs: dict[str, list[str]] = {}
    for round_ in range(args.rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            if name.startswith("ours"):
                started = time.perf_counter()
                nbest = translate_ids(
                    model, sources, search, tokenizer.pad_id, tokenizer.eos_id, decoding.max_tokens,
                    torch.device("cpu"), precision=name.split("/")[1],
                )  # fmt: skip
                speed[name].append(len(sources) / (time.perf_counter() - started))
                outputs[name] = tokenizer.decode([hyps[0].tokens for hyps in nbest])
            else:
                sentences_per_sec, pieces = run_fairseq_generate(
                    bin_dir, args.fairseq_venv, fairseq_checkpoint, len(sources), decoding
                )
                speed[name].append(sentences_per_sec)
                outputs[name] = [tokenizer.sp.decode_pieces(p.split()) for p in pieces]
            print(f"round {round_}: {name:16s} {speed[name][-1]:8.2f} sentences/s", flush=True)

    medians = {name: round(statistics.median(values), 2) for name, values in speed.items()}
    quality = {}
    for name, hyps in outputs.items():
        result = score(hyps, references)
        words = sum(len(h.split()) for h in hyps)
        quality[name] = {"bleu": round(result["bleu"], 2), "chrf": round(result["chrf"], 2), "hyp_words": words}
    report = {
        "what": f"beam search sentences/s (beam {decoding.beam}, alpha {decoding.alpha}, source length + "
        f"{decoding.max_extra}, batches of {decoding.max_tokens} tokens) on the {len(sources)} Multi30k test "
        "sentences: ours vs fairseq-generate, same model size, same data, same number of training updates",
        "command": "python bench/decode_vs_fairseq.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, 2 torch threads each",
        "checkpoints": {
            "ours": str(ours_checkpoint),
            "ours_global_step": checkpoint.get("global_step"),
            "fairseq": str(fairseq_checkpoint),
        },
        "sentences_per_sec": medians,
        "ratios": {f"{name} / fairseq fp32": round(medians[name] / medians["fairseq/fp32"], 2) for name in names[:2]},
        "runs": {name: [round(v, 2) for v in values] for name, values in speed.items()},
        "quality": quality,
        "reference_words": sum(len(r.split()) for r in references),
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("sentences_per_sec", "ratios", "quality")}, indent=2))


if __name__ == "__main__":
    main()
