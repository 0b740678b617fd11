"""De-duplication (data.clean.dedup) over shards that were encoded in parallel, applied in shard order.

A pair is a duplicate if an EARLIER pair with the same cleaned text passed the cleaning filters: that is a global,
ordered question, so workers cannot answer it (data/encode.py). Each worker writes a candidate shard with, for
every pair that passed the other filters, its 8-byte hash (data.clean.pair_hash) and fate (written, too long,
empty side). This process walks the candidates in shard order with one set of the hashes seen so far and keeps
exactly what a single sequential pass would: the same pairs, the same counts, byte-identical shards.

Like the sequential pass, a pair that passed the filters enters the memory even if it is then dropped for its
length; a later copy of it counts as a duplicate, not as too long. Each final shard stores the hashes it added
(`keys`), so a resumed prepare rebuilds the memory from them without reading or cleaning the text again.
Memory: one Python int per distinct pair, ~70 bytes (~320 MB for WMT14's 4.5M pairs).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from data.encode import EMPTY, TOO_LONG, WRITTEN

Tokens = tuple[np.ndarray, np.ndarray]  # (flat ids, length of each pair): data.shards.write_shard's src/tgt


class Deduplicator:
    """The hashes of every pair kept so far, and the filter that drops later copies from candidate shards."""

    def __init__(self) -> None:
        self.seen: set[int] = set()

    def replay(self, keys: np.ndarray) -> None:
        """Add a finished shard's keys (a resumed run does not encode that shard again)."""
        self.seen.update(keys.tolist())

    def duplicates(self, hashes: np.ndarray) -> np.ndarray:
        """(M,) bool: which of these hashes, in order, were seen before (earlier shards or earlier in this one)."""
        seen, dup = self.seen, np.zeros(len(hashes), dtype=bool)
        for i, key in enumerate(hashes.tolist()):
            if key in seen:
                dup[i] = True
            else:
                seen.add(key)
        return dup

    def filter(self, arrays: dict[str, np.ndarray], record: dict[str, Any]) -> tuple[Tokens, Tokens, np.ndarray, dict]:
        """A candidate shard (its arrays and record, data/encode.py) -> what the final shard holds.

        Returns (src, tgt, keys, info): the pairs that are not duplicates, the hashes this shard added to the
        memory, and the record fields with the duplicates counted under clean.removed.dedup.
        """
        hashes, fate = arrays["hash"], arrays["fate"]  # (M,) over the pairs that passed the other filters
        dup = self.duplicates(hashes)
        keep = ~dup[fate == WRITTEN]  # (N,) over the candidate's written pairs
        offsets = np.asarray(arrays["idx"])  # (N + 1, 2)
        lengths = np.diff(offsets, axis=0)  # (N, 2)
        src = np.asarray(arrays["src"])[np.repeat(keep, lengths[:, 0])], lengths[keep, 0]
        tgt = np.asarray(arrays["tgt"])[np.repeat(keep, lengths[:, 1])], lengths[keep, 1]
        removed = dict(record["clean"]["removed"])
        if n_dup := int(dup.sum()):
            removed["dedup"] = n_dup
        info = {
            "lines": record["lines"],
            "spm_sha256": record["spm_sha256"],
            "clean": {"changed": record["clean"]["changed"], "removed": removed},
            "dropped_too_long": record["dropped_too_long"] - int((dup & (fate == TOO_LONG)).sum()),
            "dropped_empty": record["dropped_empty"] - int((dup & (fate == EMPTY)).sum()),
        }
        return src, tgt, np.asarray(hashes[~dup]), info
