"""`aiayn data stats`: what a prepared dataset holds, from its manifest plus one pass over its shards.

Per split: pairs, source/target tokens, length percentiles (p50/p90/p99/max BPE tokens) per side, the unk rate
(share of tokens that are the unknown id: ~0 with character_coverage=1.0 on train, higher on text with unseen
characters), CRLF lines normalized, and how many pairs each cleaning step removed or changed.
Reads token arrays memory-mapped, a chunk at a time: flat memory at any size. Needs numpy only, never torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from data.manifest import read_manifest, verify_spm_model
from data.shards import ShardedPairs

CHUNK = 1 << 24  # tokens compared against the unk id at a time


def _percentiles(lengths: np.ndarray) -> dict[str, int]:
    if len(lengths) == 0:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99], method="higher")
    return {"p50": int(p50), "p90": int(p90), "p99": int(p99), "max": int(lengths.max())}


def _count(pairs: ShardedPairs, kind: str, token: int) -> int:
    total = 0
    for shard in pairs.shards:
        tokens = np.load(pairs.dataset_dir / shard["files"][kind]["file"], mmap_mode="r")
        for start in range(0, len(tokens), CHUNK):
            total += int(np.count_nonzero(tokens[start : start + CHUNK] == token))
    return total


def dataset_stats(dataset_dir: str | Path) -> dict[str, Any]:
    """{"dataset": folder, "vocab_size": n, "splits": {split: {...}}}; verifies every checksum on the way."""
    dataset_dir = Path(dataset_dir)
    manifest = read_manifest(dataset_dir)
    verify_spm_model(dataset_dir, manifest)
    unk = manifest["special_ids"]["unk"]
    splits = {}
    for split, entry in manifest["splits"].items():
        pairs = ShardedPairs(dataset_dir, split)  # checks each shard's sha256 against the manifest
        unk_src, unk_tgt = _count(pairs, "src", unk), _count(pairs, "tgt", unk)
        tokens = entry["src_tokens"] + entry["tgt_tokens"]
        removed = dict(entry.get("clean", {}).get("removed", {}))
        removed.update(max_len=entry.get("dropped_too_long", 0), empty_after_bpe=entry.get("dropped_empty", 0))
        splits[split] = {
            "lines": entry["lines"],
            "pairs": len(pairs),
            "src_tokens": entry["src_tokens"],
            "tgt_tokens": entry["tgt_tokens"],
            "src_len": _percentiles(pairs.src_lengths),
            "tgt_len": _percentiles(pairs.tgt_lengths),
            "unk_rate": {"src": unk_src / max(1, entry["src_tokens"]), "tgt": unk_tgt / max(1, entry["tgt_tokens"])},
            "unk_tokens": unk_src + unk_tgt,
            "tokens": tokens,
            "crlf_lines": entry.get("crlf_lines", 0),
            "removed": {k: v for k, v in removed.items() if v},
            "changed": entry.get("clean", {}).get("changed", {}),
        }
    return {"dataset": str(dataset_dir), "vocab_size": manifest["spm_model"]["vocab_size"], "splits": splits}


def format_stats(stats: dict[str, Any]) -> str:
    """The stats as an aligned plain-text report."""
    lines = [f"dataset {stats['dataset']}  (joint BPE vocabulary: {stats['vocab_size']})"]
    for split, s in stats["splits"].items():
        lines.append(
            f"{split}: {s['pairs']:,} pairs of {s['lines']:,} lines; tokens src {s['src_tokens']:,} "
            f"tgt {s['tgt_tokens']:,}; unk rate src {s['unk_rate']['src']:.4%} tgt {s['unk_rate']['tgt']:.4%}"
        )
        for side in ("src", "tgt"):
            p = s[f"{side}_len"]
            lines.append(f"  {side} length (tokens): p50 {p['p50']}  p90 {p['p90']}  p99 {p['p99']}  max {p['max']}")
        removed = ", ".join(f"{k} {v:,}" for k, v in sorted(s["removed"].items())) or "none"
        changed = ", ".join(f"{k} {v:,}" for k, v in sorted(s["changed"].items())) or "none"
        lines.append(f"  pairs removed: {removed}")
        lines.append(f"  lines changed: {changed}; CRLF line ends normalized: {s['crlf_lines']:,}")
    return "\n".join(lines)
