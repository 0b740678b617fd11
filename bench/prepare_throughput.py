"""Benchmark `aiayn prepare` at 100k, 1M and 4.5M pairs (section 5.1's WMT14 size), side by side with fairseq.

    .venv/bin/python bench/prepare_throughput.py [--sizes 100000 1000000 4500000] [--fairseq-venv DIR]

Writes bench/prepare_throughput.json. For each size, in one run on one machine:
  ours      `prepare_dataset` (what `aiayn prepare` calls): read the text into Arrow, clean, train the joint BPE
            model on a bounded sample, encode on all cores and write the shards + manifest.
  fairseq   its preprocessing of the same corpus: `fairseq-preprocess --joined-dictionary --workers <cores>` on text
            that was BPE-encoded beforehand with our sentencepiece model (that encoding is timed separately as
            `spm_encode_s` and not charged to fairseq's pairs/s, so the comparison is generous to fairseq).
Each measurement runs in its own process: pairs/s is over the work itself (after imports), peak RSS is that
process's maximum resident memory (os.wait4). The batch sampler's cost is measured on the 4.5M-pair lengths.

The corpus is the real text of the corpora folder (Multi30k train + the WMT news sets, 55.7k pairs) repeated;
repeat r rotates every sentence's words by r places, so the pairs differ while the word statistics stay real.
All sizes use the same BPE sample (--spm-sample-lines, at most the smallest corpus's line count), so any growth
in peak memory with corpus size would come from the streaming stages, which must stay flat.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPORA = Path(os.environ.get("CORPORA_DIR", ROOT.parent / "shared" / "data"))


def base_pairs() -> list[tuple[str, str]]:
    """The real pairs the synthetic corpora are built from."""
    stems = [CORPORA / "multi30k" / "train"] + sorted(
        p.with_suffix("").with_suffix("") for p in (CORPORA / "wmt_news_extra").glob("*.en.gz")
    )
    pairs = []
    for stem in stems:
        with gzip.open(f"{stem}.en.gz", "rt", encoding="utf-8") as en, gzip.open(f"{stem}.de.gz", "rt") as de:
            pairs += [(s.rstrip("\n"), t.rstrip("\n")) for s, t in zip(en, de, strict=True)]
    return pairs


def rotate(sentence: str, r: int) -> str:
    words = sentence.split(" ")
    r %= max(1, len(words))
    return " ".join(words[r:] + words[:r])


def make_corpus(n: int, folder: Path) -> tuple[Path, Path]:
    """n pairs as train.en / train.de plain text (made once, reused by later runs)."""
    folder.mkdir(parents=True, exist_ok=True)
    en, de = folder / "train.en", folder / "train.de"
    if en.is_file() and de.is_file():
        return en, de
    pairs = base_pairs()
    with open(f"{en}.tmp", "w", encoding="utf-8") as fen, open(f"{de}.tmp", "w", encoding="utf-8") as fde:
        for i in range(n):
            r, (s, t) = divmod(i, len(pairs))[0], pairs[i % len(pairs)]
            fen.write(rotate(s, r) + "\n")
            fde.write(rotate(t, r) + "\n")
    os.replace(f"{en}.tmp", en)
    os.replace(f"{de}.tmp", de)
    return en, de


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[dict, float, float]:
    """Run a child that prints one JSON line last; returns (that JSON, wall seconds, peak RSS in MiB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, cwd=ROOT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with status {status}")
    return json.loads(out.strip().splitlines()[-1]), wall, usage.ru_maxrss / 1024  # ru_maxrss is KiB on Linux


# -- children ----------------------------------------------------------------------------------------------
def child_ours(en: str, de: str, out: str, vocab: int, sample: int) -> None:
    sys.path.insert(0, str(ROOT))
    from data.prepare import prepare_dataset
    from pipeline.config import load_config

    overrides = [
        "data=wmt_news_local",
        "~data.splits.train",
        f"+data.splits.train={{src: {en}, tgt: {de}}}",
        f"model.vocab_size={vocab}",
        f"data.spm_sample_lines={sample}",
        "data.clean.dedup=false",  # the repeats are distinct pairs anyway; dedup's set is the one O(n) structure
    ]
    cfg = load_config(overrides)
    start = time.perf_counter()
    dataset_dir = prepare_dataset(cfg.data, out)
    seconds = time.perf_counter() - start
    manifest = json.loads((dataset_dir / "manifest.json").read_text())
    print(json.dumps({"seconds": seconds, "dataset": str(dataset_dir), "train_pairs": manifest["splits"]["train"]}))


def child_spm_encode(model: str, folder: str) -> None:
    """Encode train/valid/test text into space-separated pieces (fairseq's input), on all cores."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model)
    start = time.perf_counter()
    for name in os.listdir(folder):
        if not name.endswith((".en", ".de")) or name.startswith("bpe."):
            continue
        with open(Path(folder) / name, encoding="utf-8") as f, open(Path(folder) / f"bpe.{name}", "w") as out:
            while lines := [line.rstrip("\n") for line in islice(f, 100_000)]:
                pieces = sp.encode(lines, out_type=str, num_threads=os.cpu_count())
                out.writelines(" ".join(p) + "\n" for p in pieces)
    print(json.dumps({"seconds": time.perf_counter() - start}))


def child_fairseq(argv: list[str]) -> None:
    from fairseq_cli import preprocess  # imported before the clock starts, as ours is

    sys.argv = ["fairseq-preprocess", *argv]
    start = time.perf_counter()
    preprocess.cli_main()
    print(json.dumps({"seconds": time.perf_counter() - start}))


# -- the benchmark -----------------------------------------------------------------------------------------
def bench_size(n: int, args, env: dict) -> dict:
    work = Path(args.work)
    en, de = make_corpus(n, work / f"corpus-{n}")
    me = [sys.executable, __file__]
    ours, wall, rss = run_measured(
        [*me, "--child-ours", str(en), str(de), str(work / f"ours-{n}"), str(args.vocab), str(args.spm_sample_lines)],
        env,
    )
    train = ours["train_pairs"]
    result = {
        "pairs": n,
        "ours": {
            "seconds": round(ours["seconds"], 1),
            "pairs_per_s": round(n / ours["seconds"]),
            "peak_rss_mib": round(rss),
            "process_wall_s": round(wall, 1),
            "kept_pairs": train["pairs"],
            "shards": len(train["shards"]),
            "tokens": train["src_tokens"] + train["tgt_tokens"],
        },
    }
    print(f"{n:>9,} pairs  ours: {result['ours']}", flush=True)
    if args.fairseq_venv:
        result["fairseq"] = bench_fairseq(n, en, de, Path(ours["dataset"]), work, args)
        result["ratio_pairs_per_s"] = round(result["ours"]["pairs_per_s"] / result["fairseq"]["pairs_per_s"], 1)
        print(f"{n:>9,} pairs  fairseq: {result['fairseq']}  ours/fairseq {result['ratio_pairs_per_s']}×", flush=True)
    return result


def bench_fairseq(n: int, en: Path, de: Path, dataset_dir: Path, work: Path, args) -> dict:
    """fairseq-preprocess on the same pairs, BPE-encoded with our model (valid/test: newstest2013/2014)."""
    python = str(Path(args.fairseq_venv) / "bin" / "python")
    text = work / f"fairseq-text-{n}"
    text.mkdir(parents=True, exist_ok=True)
    for lang, path in (("en", en), ("de", de)):
        link = text / f"train.{lang}"
        if not link.exists():
            link.symlink_to(path)
        for split, year in (("valid", 2013), ("test", 2014)):
            with gzip.open(CORPORA / "wmt14" / f"newstest{year}.{lang}.gz", "rt") as f:
                (text / f"{split}.{lang}").write_text(f.read())
    encoded, _, _ = run_measured([python, __file__, "--child-spm-encode", str(dataset_dir / "spm.model"), str(text)])
    dest = work / f"fairseq-bin-{n}"
    argv = ["--source-lang", "en", "--target-lang", "de", "--joined-dictionary", "--destdir", str(dest)]
    argv += ["--workers", str(os.cpu_count())]
    argv += [f"--{split}pref={text}/bpe.{split}" for split in ("train", "valid", "test")]
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    out, wall, rss = run_measured([python, __file__, "--child-fairseq", *argv], env)
    return {
        "seconds": round(out["seconds"], 1),
        "pairs_per_s": round(n / out["seconds"]),
        "peak_rss_mib": round(rss),
        "process_wall_s": round(wall, 1),
        "spm_encode_s": round(encoded["seconds"], 1),
    }


def bench_sampler(n: int, max_tokens: int = 4096) -> dict:
    """TokenBatchSampler on n pairs with real length statistics: epoch plan time and cost per batch served."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from data.batching import TokenBatchSampler

    rng = np.random.default_rng(0)
    src = rng.lognormal(3.2, 0.6, n).clip(1, 256).astype(np.int32)  # ~WMT's BPE lengths: median ~25 tokens
    tgt = (src * rng.normal(1.1, 0.15, n)).clip(1, 256).astype(np.int32)
    sampler = TokenBatchSampler(src, tgt, max_tokens=max_tokens, seed=1, rank=0, world_size=8)
    start = time.perf_counter()
    sampler.set_epoch(0)
    batches = list(sampler)
    epoch_s = time.perf_counter() - start
    return {
        "pairs": n,
        "max_tokens": max_tokens,
        "world_size": 8,
        "batches_per_rank": len(batches),
        "epoch_plan_s": round(epoch_s, 2),
        "overhead_per_step_us": round(epoch_s / len(batches) * 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 4_500_000])
    parser.add_argument("--vocab", type=int, default=37000, help="joint BPE vocabulary (the paper's ~37000)")
    parser.add_argument("--spm-sample-lines", type=int, default=200_000)
    parser.add_argument("--fairseq-venv", help="a venv with fairseq-fixed==0.12.3.1 (the peer); omit to skip it")
    parser.add_argument("--work", default=str(ROOT / "outputs" / "bench" / "prepare"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "prepare_throughput.json"))
    parser.add_argument("--child-ours", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--child-spm-encode", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--child-fairseq", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_ours:
        en, de, out, vocab, sample = args.child_ours
        return child_ours(en, de, out, int(vocab), int(sample))
    if args.child_spm_encode:
        return child_spm_encode(*args.child_spm_encode)
    if args.child_fairseq is not None:
        return child_fairseq(args.child_fairseq)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run = {
        "command": " ".join(["python", "bench/prepare_throughput.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "vocab": args.vocab,
        "spm_sample_lines": args.spm_sample_lines,
    }
    # One entry per corpus size, each with the run that measured it: a later run at other sizes adds to the file.
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    for n in args.sizes:
        results.setdefault("sizes", {})[str(n)] = {**bench_size(n, args, env), "run": run}
        out.write_text(json.dumps(results, indent=2) + "\n")
    results["sampler"] = {**bench_sampler(max(args.sizes)), "run": run}
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["sampler"]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
