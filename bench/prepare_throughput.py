"""Benchmark `aiayn prepare` at 100k, 1M and 4.5M pairs (section 5.1's WMT14 size), side by side with fairseq.

    .venv/bin/python bench/prepare_throughput.py [--sizes 100000 1000000 4500000] [--fairseq-venv DIR]

Writes bench/prepare_throughput.json (merged by size). For each size, in one run on one machine:
  ours      `prepare_dataset` (what `aiayn prepare` calls), timed over ALL its work: read the text into Arrow, clean,
            train the joint BPE model on a bounded sample, clean + encode every split in shards on a process pool
            (data.num_prepare_workers: one per core), write the shards + manifest. The stages are timed too.
  fairseq   `fairseq-preprocess --joined-dictionary --workers <cores>` on the same pairs, given as text that was
            already SentencePiece-encoded with our model (as fairseq is used with a SentencePiece vocabulary): its
            timing covers building the dictionary and binarizing. The encoding itself is timed separately
            (`spm_encode_s`, sentencepiece on all cores) and only counted in `pairs_per_s_with_spm_encode`; BPE
            training is not charged to fairseq at all, so the headline ratio is generous to fairseq.
Each measurement runs in its own process tree: pairs/s is over the work itself (after imports); memory is sampled
every 0.2 s over the whole tree (the preparing process, the pool's forkserver and its workers, fairseq's workers):
the peak of the summed RSS, of the summed PSS (shared pages counted once) and of the summed anonymous memory
(what the programs allocate, without the page cache of memory-mapped files). Ours runs twice per size: with
data.num_prepare_workers=1 (`ours_one_worker`: one process, so peak memory across sizes shows what the corpus size
costs) and with one worker per core (`ours`, the timed result, whose tree adds each worker's memory). The batch
sampler's cost is measured on the largest size's lengths. The load of the shared machine (os.getloadavg) is
recorded beside every number.

The corpus is the real text of the corpora folder (Multi30k train + the WMT news sets, 55.7k pairs) repeated;
repeat r rotates every sentence's words by r places, so the pairs differ while the word statistics stay real.
All sizes use the same BPE sample (--spm-sample-lines), so any growth in peak memory with corpus size would come
from the streaming stages, which must stay flat.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
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


class TreeMemory:
    """Samples the memory of a process and all its descendants every `interval` s; keeps the peaks (MiB)."""

    FIELDS = {"Rss:": "rss", "Pss:": "pss", "Anonymous:": "anon"}

    def __init__(self, pid: int, interval: float = 0.2):
        self.pid, self.interval = pid, interval
        self.peak = {"rss": 0.0, "pss": 0.0, "anon": 0.0}
        self.max_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
        tree, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo += children.get(pid, [])
        return tree

    def sample(self) -> None:
        total = dict.fromkeys(self.peak, 0.0)
        tree = self._tree()
        for pid in tree:
            try:
                text = Path(f"/proc/{pid}/smaps_rollup").read_text()
            except OSError:
                continue
            for line in text.splitlines():
                key, *rest = line.split()
                if key in self.FIELDS:
                    total[self.FIELDS[key]] += int(rest[0]) / 1024  # kB -> MiB
        for key, value in total.items():
            self.peak[key] = max(self.peak[key], value)
        self.max_processes = max(self.max_processes, len(tree))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def load() -> list[float]:
    """The machine's 1/5/15-minute load averages (it is shared: numbers measured under load are slower)."""
    return [round(x, 1) for x in os.getloadavg()]


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[dict, float, dict]:
    """Run a child that prints one JSON line last; returns (that JSON, wall seconds, memory of its process tree)."""
    start, load_before = time.perf_counter(), load()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, cwd=ROOT, text=True)
    with TreeMemory(proc.pid) as memory:
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with status {status}")
    mem = {
        "peak_tree_rss_mib": round(memory.peak["rss"]),
        "peak_tree_pss_mib": round(memory.peak["pss"]),
        "peak_tree_anon_mib": round(memory.peak["anon"]),
        "peak_rss_main_process_mib": round(usage.ru_maxrss / 1024),  # ru_maxrss is KiB on Linux
        "processes": memory.max_processes,
        "load_avg_1_5_15_before": load_before,
        "load_avg_1_5_15_after": load(),
    }
    return json.loads(out.strip().splitlines()[-1]), wall, mem


# -- children ----------------------------------------------------------------------------------------------
def child_ours(en: str, de: str, out: str, vocab: int, sample: int, workers: str) -> None:
    sys.path.insert(0, str(ROOT))
    import data.prepare
    from pipeline.config import load_config

    overrides = [
        "data=wmt_news_local",
        "~data.splits.train",
        f"+data.splits.train={{src: {en}, tgt: {de}}}",
        f"model.vocab_size={vocab}",
        f"data.spm_sample_lines={sample}",
        "data.clean.dedup=false",  # the repeats are distinct pairs anyway; dedup's set is the one O(n) structure
        f"data.num_prepare_workers={workers}",
    ]
    cfg = load_config(overrides)
    stages: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                stages[name] = stages.get(name, 0.0) + time.perf_counter() - start

        return wrapper

    data.prepare.train_bpe = timed("bpe_s", data.prepare.train_bpe)
    data.prepare.encode_split = timed("encode_s", data.prepare.encode_split)
    start = time.perf_counter()
    dataset_dir = data.prepare.prepare_dataset(cfg.data, out)
    seconds = time.perf_counter() - start
    stages["read_and_check_s"] = seconds - stages["bpe_s"] - stages["encode_s"]
    manifest = json.loads((dataset_dir / "manifest.json").read_text())
    print(
        json.dumps(
            {
                "seconds": seconds,
                "stages": stages,
                "workers": cfg.data.get("num_prepare_workers") or os.cpu_count(),
                "dataset": str(dataset_dir),
                "train_pairs": manifest["splits"]["train"],
            }
        )
    )


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

    def prepare(workers: str) -> tuple[dict, float, dict]:
        out = work / f"ours-{n}"
        shutil.rmtree(out, ignore_errors=True)  # a fresh run: its text is read into Arrow, BPE trained, all encoded
        child = ["--child-ours", str(en), str(de), str(out), str(args.vocab), str(args.spm_sample_lines), workers]
        return run_measured([*me, *child], env)

    # Memory is compared at one worker too: with a pool the tree holds the workers' own memory (a shard each),
    # which depends on how many run, not on the corpus size; one process shows what the corpus size costs.
    one, _, one_mem = prepare("1")
    ours, wall, mem = prepare("null")
    train = ours["train_pairs"]
    result = {
        "pairs": n,
        "ours": {
            "covers": "aiayn prepare: read text into Arrow + check, BPE training on the sample, clean + encode "
            "+ write shards of train/valid/test, manifest",
            "seconds": round(ours["seconds"], 1),
            "pairs_per_s": round(n / ours["seconds"]),
            "stages_s": {k: round(v, 1) for k, v in ours["stages"].items()},
            "encode_pairs_per_s": round(n / ours["stages"]["encode_s"]),
            "workers": ours["workers"],
            **mem,
            "process_wall_s": round(wall, 1),
            "kept_pairs": train["pairs"],
            "shards": len(train["shards"]),
            "tokens": train["src_tokens"] + train["tgt_tokens"],
        },
        "ours_one_worker": {
            "covers": "the same with data.num_prepare_workers=1: every shard encoded in the preparing process",
            "seconds": round(one["seconds"], 1),
            "pairs_per_s": round(n / one["seconds"]),
            **one_mem,
        },
    }
    print(f"{n:>9,} pairs  ours: {result['ours']}", flush=True)
    print(f"{n:>9,} pairs  ours, one worker: {result['ours_one_worker']}", flush=True)
    if args.fairseq_venv:
        result["fairseq"] = bench_fairseq(n, en, de, Path(ours["dataset"]), work, args)
        fair = result["fairseq"]
        result["ratio_pairs_per_s"] = round(result["ours"]["pairs_per_s"] / fair["pairs_per_s"], 2)
        result["ratio_pairs_per_s_vs_fairseq_with_spm_encode"] = round(
            result["ours"]["pairs_per_s"] / fair["pairs_per_s_with_spm_encode"], 2
        )
        print(f"{n:>9,} pairs  fairseq: {fair}  ours/fairseq {result['ratio_pairs_per_s']}x", flush=True)
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
    # The SentencePiece encoding is ours (this interpreter has sentencepiece; fairseq's venv need not).
    spm_encode = [sys.executable, __file__, "--child-spm-encode", str(dataset_dir / "spm.model"), str(text)]
    encoded, _, _ = run_measured(spm_encode)
    dest = work / f"fairseq-bin-{n}"
    shutil.rmtree(dest, ignore_errors=True)
    argv = ["--source-lang", "en", "--target-lang", "de", "--joined-dictionary", "--destdir", str(dest)]
    argv += ["--workers", str(os.cpu_count())]
    argv += [f"--{split}pref={text}/bpe.{split}" for split in ("train", "valid", "test")]
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    out, wall, mem = run_measured([python, __file__, "--child-fairseq", *argv], env)
    return {
        "covers": "fairseq-preprocess on SentencePiece-encoded text (train/valid/test): joined dictionary + "
        "binarize, --workers = cores; spm_encode_s (encoding the text with our model) is not in pairs_per_s",
        "seconds": round(out["seconds"], 1),
        "pairs_per_s": round(n / out["seconds"]),
        "spm_encode_s": round(encoded["seconds"], 1),
        "pairs_per_s_with_spm_encode": round(n / (out["seconds"] + encoded["seconds"])),
        **mem,
        "process_wall_s": round(wall, 1),
    }


def bench_sampler(dataset_dir: Path, max_tokens: int = 4096, world_size: int = 8) -> dict:
    """TokenBatchSampler over a prepared training split's real lengths: epoch plan time and cost per batch served."""
    sys.path.insert(0, str(ROOT))
    from data.batching import TokenBatchSampler
    from data.shards import ShardedPairs

    train = ShardedPairs(dataset_dir, "train", verify=False)
    sampler = TokenBatchSampler(
        train.src_lengths, train.tgt_lengths, max_tokens=max_tokens, seed=1, rank=0, world_size=world_size
    )
    load_before = load()
    start = time.perf_counter()
    sampler.set_epoch(0)
    batches = list(sampler)
    epoch_s = time.perf_counter() - start
    return {
        "pairs": len(train),
        "max_tokens": max_tokens,
        "world_size": world_size,
        "batches_per_rank": len(batches),
        "epoch_plan_s": round(epoch_s, 2),
        "overhead_per_step_us": round(epoch_s / len(batches) * 1e6, 1),
        "covers": "set_epoch (shuffle, length-sorted chunks, split across ranks) + iterating one rank's batches",
        "load_avg_1_5_15_before": load_before,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 4_500_000])
    parser.add_argument("--vocab", type=int, default=37000, help="joint BPE vocabulary (the paper's ~37000)")
    parser.add_argument("--spm-sample-lines", type=int, default=200_000)
    parser.add_argument("--fairseq-venv", help="a venv with fairseq-fixed==0.12.3.1 (the peer); omit to skip it")
    parser.add_argument("--work", default=str(ROOT / "outputs" / "bench" / "prepare"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "prepare_throughput.json"))
    parser.add_argument("--child-ours", nargs=6, help=argparse.SUPPRESS)
    parser.add_argument("--child-spm-encode", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--child-fairseq", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_ours:
        en, de, out, vocab, sample, workers = args.child_ours
        return child_ours(en, de, out, int(vocab), int(sample), workers)
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
    largest = max(args.sizes)
    dataset_dir = next((Path(args.work) / f"ours-{largest}" / "data").iterdir())
    results["sampler"] = {**bench_sampler(dataset_dir), "run": run}
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["sampler"]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
