"""Beam search (section 6.1: beam 4, α = 0.6, output up to input length + 50) sentences/s of a checkpoint, with
and without the decoder's key/value cache.

Translates the first --sentences sentences of a prepared split (default: Multi30k test, 1,000 sentences) the way
`aiayn evaluate` does (pipeline/inference.py: its model loading, length-sorted batches of --max-tokens padded source
tokens), once per round with each decoding, alternating which goes first so that machine noise hits both alike.
Without the cache the decoder reruns every whole prefix at each step (modules/beam.py, use_cache=False). Both
outputs are scored with sacrebleu against the references: they are the same hypotheses, so the same BLEU.
Writes bench/decode_speed.json (or --out).

    .venv/bin/python bench/decode_speed.py --checkpoint outputs/runs/<run>/averaged.ckpt [--split test]
        [--sentences 1000] [--max-tokens 4096] [--threads 2] [--rounds 2] [hydra overrides of the run's data ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

# This checkout's packages, not those an editable install of another checkout maps (`python bench/...` puts bench/,
# not the repository, first on sys.path).
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.host import set_torch_environment  # noqa: E402

set_torch_environment()  # as `aiayn` does, before torch is imported (pipeline/host.py)

import torch  # noqa: E402

from modules.beam import beam_search  # noqa: E402
from modules.decoding import translate_ids  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.inference import load_for_inference, prepared_split  # noqa: E402
from pipeline.scores import score  # noqa: E402

BEAM, ALPHA, MAX_EXTRA = 4, 0.6, 50  # section 6.1


def load_average() -> list[float]:
    """The machine's 1/5/15-minute load averages (it is shared: numbers measured under load are slower)."""
    return [round(x, 1) for x in os.getloadavg()]


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint file, averaged.ckpt or folder")
    parser.add_argument("--split", default="test", help="a prepared split of the data config (default: test)")
    parser.add_argument("--sentences", type=int, default=1000, help="the split's first N sentences (default 1000)")
    parser.add_argument("--max-tokens", type=int, default=4096, help="padded source tokens per decoding batch")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--rounds", type=int, default=2, help="passes over the sentences with each decoding")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("decode_speed.json"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the data, as the run was trained with")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cfg = load_config(args.overrides)
    model, checkpoint, datamodule = load_for_inference(cfg, args.checkpoint, "evaluate")
    sources, references = prepared_split(datamodule, args.split)
    sources, references = sources[: args.sentences], references[: args.sentences]
    tokenizer, device = datamodule.tokenizer, torch.device("cpu")

    def decoding(use_cache: bool):
        def search(model, src):
            bos, eos = tokenizer.bos_id, tokenizer.eos_id
            return beam_search(
                model, src, bos, eos, beam_size=BEAM, alpha=ALPHA, max_extra=MAX_EXTRA, use_cache=use_cache
            )

        return search

    names = {"cache": True, "no_cache": False}
    seconds: dict[str, list[float]] = {name: [] for name in names}
    hypotheses: dict[str, list[str]] = {}
    load = {"start": load_average()}
    for round_ in range(args.rounds):
        order = list(names) if round_ % 2 == 0 else list(names)[::-1]
        for name in order:
            started = time.perf_counter()
            nbest = translate_ids(
                model, sources, decoding(names[name]), tokenizer.pad_id, tokenizer.eos_id, args.max_tokens, device
            )
            seconds[name].append(time.perf_counter() - started)
            hypotheses[name] = tokenizer.decode([hyps[0].tokens for hyps in nbest])
            print(f"round {round_}: {name:8s} {len(sources) / seconds[name][-1]:8.2f} sentences/s", flush=True)
    load["end"] = load_average()

    speed = {name: round(len(sources) * args.rounds / sum(times), 3) for name, times in seconds.items()}
    bleu = {name: score(hyps, references)["bleu"] for name, hyps in hypotheses.items()}
    report = {
        "what": f"beam search (beam {BEAM}, alpha {ALPHA}, max_extra {MAX_EXTRA}) sentences/s, with and without "
        "the decoder's key/value cache, the same sentences alternating",
        "command": " ".join(["python", "bench/decode_speed.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "load_average_1_5_15min": load,
        "checkpoint": str(args.checkpoint),
        "global_step": checkpoint.get("global_step"),
        "model": {k: getattr(model.cfg, k) for k in ("n_layers", "d_model", "n_heads", "d_ff", "vocab_size")},
        "split": args.split,
        "dataset_dir": str(datamodule.dataset_dir),
        "sentences": len(sources),
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "sentences_per_sec": speed,
        "cache_speedup": round(speed["cache"] / speed["no_cache"], 2),
        "seconds_per_round": {name: [round(t, 2) for t in times] for name, times in seconds.items()},
        "bleu": bleu,
        "identical_hypotheses": sum(a == b for a, b in zip(hypotheses["cache"], hypotheses["no_cache"], strict=True)),
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("sentences_per_sec", "cache_speedup", "bleu")}, indent=2))
    print(args.out)


if __name__ == "__main__":
    main()
