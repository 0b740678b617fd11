"""Token-count batching, section 5.1.

"Sentence pairs were batched together by approximate sequence length. Each training batch contained a set of
sentence pairs containing approximately 25000 source tokens and 25000 target tokens."

So a batch is not a fixed number of sentences but a fixed budget of tokens: many short pairs or a few long
ones. We count PADDED tokens, n_sentences * longest_sentence, because that is what the GPU computes on;
grouping pairs of similar length keeps the padding (wasted work) small.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


class TokenBatchSampler(Sampler[list[int]]):
    """Yields lists of pair indices whose padded size n * max_len stays <= max_tokens, split across ranks.

    Each epoch (seeded by (seed, epoch), so every rank computes the same batches without communicating):
      1. shuffle all pairs, cut them into chunks of about `chunk_batches` batches;
      2. sort each chunk by length (padded size, then source, then target length), so neighbours have similar
         lengths on both sides (little padding), while the chunking keeps some randomness in which pairs share a
         batch;
      3. greedily fill batches up to max_tokens padded tokens, then shuffle the batch order;
      4. give rank r the batches r, r + world_size, ...: every rank gets the same number of batches and
         together they see every pair exactly once.
    With gradient accumulation over `accumulation` micro-batches, optimizer update u is made of the epoch's
    batches [u * A * W, (u + 1) * A * W) (A = accumulation, W = world_size): rank r's i-th batch belongs to
    update i // A. The batch count is made divisible by A * W, so every update is complete, and every rank
    knows, without communicating, how many target tokens the whole update holds (`update_target_tokens`):
    the loss is normalized by that number, as fairseq does (modules/lightning.py).
    A length counts the eos (source, target output) or bos (target input) that collation adds: +1.
    With shuffle=False (validation) all pairs are sorted by length once and the order never changes.
    """

    def __init__(
        self,
        src_lengths: np.ndarray,
        tgt_lengths: np.ndarray,
        max_tokens: int,
        seed: int = 1,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        chunk_batches: int = 100,
        accumulation: int = 1,
    ):
        super().__init__()
        src_lengths, tgt_lengths = np.asarray(src_lengths, np.int64), np.asarray(tgt_lengths, np.int64)
        if src_lengths.shape != tgt_lengths.shape:
            raise ValueError(f"src_lengths {src_lengths.shape} and tgt_lengths {tgt_lengths.shape} differ in shape")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if len(src_lengths) < world_size * accumulation:
            raise ValueError(
                f"{len(src_lengths)} pairs cannot give each of world_size={world_size} ranks "
                f"accumulation={accumulation} batches per update"
            )
        # The longer side (+1 for eos/bos) decides a pair's padded size: the batch budget counts it.
        self.sizes = np.maximum(src_lengths, tgt_lengths) + 1  # (num_pairs,)
        self.src_lengths, self.tgt_lengths = src_lengths, tgt_lengths
        self.max_tokens, self.seed, self.shuffle = max_tokens, seed, shuffle
        self.rank, self.world_size, self.chunk_batches = rank, world_size, chunk_batches
        self.accumulation = int(accumulation)
        self.tgt_tokens = tgt_lengths + 1  # (num_pairs,) target positions the loss counts: the tokens + eos
        self.epoch = 0
        self.batches_done = 0  # batches yielded so far in this epoch (including ones skipped on resume)
        self._resume = False  # True after load_state_dict: the next __iter__ skips batches_done batches
        # (epoch, this rank's batches, each batch's update target tokens)
        self._cache: tuple[int, list[np.ndarray], np.ndarray] | None = None

    # -- per-epoch state ---------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """New epoch -> new shuffle. Setting the epoch we are already in keeps a loaded resume position."""
        if epoch != self.epoch:
            self.epoch, self.batches_done, self._resume = epoch, 0, False

    @property
    def sampler(self) -> TokenBatchSampler:
        # Lightning calls set_epoch on `dataloader.batch_sampler.sampler` at every epoch start
        # (lightning.fabric.utilities.data._set_sampler_epoch): point it at ourselves.
        return self

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue mid-epoch: the next iteration of epoch state["epoch"] starts at batch state["batches_done"]."""
        self.epoch, self.batches_done, self._resume = int(state["epoch"]), int(state["batches_done"]), True

    # -- iteration -----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Batches of this rank in the current epoch (the full epoch, also when resuming mid-way)."""
        return len(self._rank_batches())

    def __iter__(self) -> Iterator[list[int]]:
        for batch, _ in self.with_update_tokens():
            yield batch

    def with_update_tokens(self) -> Iterator[tuple[list[int], int]]:
        """(pair indices, target tokens of the whole optimizer update it belongs to) for this rank's batches."""
        self._rank_batches()
        _, batches, update_tokens = self._cache
        start = self.batches_done if self._resume else 0
        self.batches_done, self._resume = start, False
        for i in range(start, len(batches)):
            self.batches_done += 1
            yield batches[i].tolist(), int(update_tokens[i])

    def update_target_tokens(self) -> np.ndarray:
        """(this rank's batches,) target tokens of the update each batch belongs to, summed over all ranks."""
        self._rank_batches()
        return self._cache[2]

    def _rank_batches(self) -> list[np.ndarray]:
        if self._cache is None or self._cache[0] != self.epoch:
            batches = self.epoch_batches(self.epoch)
            tokens = np.array([self.tgt_tokens[b].sum() for b in batches], dtype=np.int64)  # (num_batches,)
            per_update = tokens.reshape(-1, self.world_size * self.accumulation).sum(axis=1)  # (num_updates,)
            # rank r's i-th batch is batch i * W + r of the epoch, in update (i * W + r) // (W * A) = i // A
            mine = np.repeat(per_update, self.accumulation)  # (num_batches / W,)
            self._cache = (self.epoch, batches[self.rank :: self.world_size], mine)
        return self._cache[1]

    # -- the batching itself -------------------------------------------------------------------------------
    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """All ranks' batches of one epoch, in the order they are dealt out (rank r takes r::world_size)."""
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.sizes)
        if self.shuffle:
            # about chunk_batches batches' worth of pairs per chunk
            pairs_per_batch = max(1, self.max_tokens // max(1, int(self.sizes.mean())))
            chunk = max(1, self.chunk_batches * pairs_per_batch)
            order = rng.permutation(n)
            chunks = [order[i : i + chunk] for i in range(0, n, chunk)]
        else:
            chunks = [np.arange(n)]
        batches = []
        for idx in chunks:
            idx = idx[self._length_order(idx)]
            batches += self._fill(idx)
        batches = self._split_until_divisible(batches)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def _length_order(self, idx: np.ndarray) -> np.ndarray:
        """The order of pairs `idx` in which batches are cut: ascending by padded size, then by source length,
        then by target length. Pairs of one size have either side as their longer one; ordering them by the source
        next keeps pairs whose source and target lengths both agree together, so that neither side of a batch is
        padded much (breaking ties by the shorter side pads both sides more). np.lexsort is stable: equal keys keep
        their shuffled order, and every rank, whatever its CPU, computes the same batches."""
        return np.lexsort((self.tgt_lengths[idx], self.src_lengths[idx], self.sizes[idx]))  # last key = primary

    def _fill(self, idx: np.ndarray) -> list[np.ndarray]:
        """Greedy batches over indices sorted by ascending size: grow a batch while n * size <= max_tokens.

        Sorted ascending, the last pair added is the longest, so a batch [j, k] costs (k - j + 1) * size[k],
        which grows with k: the largest valid k is found with one vectorised comparison per batch.
        """
        sizes = self.sizes[idx]
        batches, j = [], 0
        while j < len(idx):
            if sizes[j] > self.max_tokens:  # longer than a whole batch: it goes alone
                batches.append(idx[j : j + 1])
                j += 1
                continue
            window = sizes[j : j + self.max_tokens // sizes[j]]  # a batch can't hold more pairs than this
            fits = np.arange(1, len(window) + 1) * window <= self.max_tokens  # True...True False...False
            k = j + int(fits.sum())
            batches.append(idx[j:k])
            j = k
        return batches

    def _split_until_divisible(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        """Split the largest batches in two until world_size * accumulation divides the count: every rank gets
        the same number of batches and every update is whole; no pair is dropped or repeated."""
        while len(batches) % (self.world_size * self.accumulation):
            padded = [len(b) * int(self.sizes[b].max()) if len(b) > 1 else -1 for b in batches]
            i = int(np.argmax(padded))
            if padded[i] < 0:
                raise ValueError(
                    f"cannot deal {len(batches)} single-pair batches evenly to world_size={self.world_size} "
                    f"ranks x accumulation={self.accumulation}; raise data.max_tokens or use fewer devices"
                )
            b = batches[i]  # sorted by size: both halves stay length-homogeneous
            batches[i : i + 1] = [b[: len(b) // 2], b[len(b) // 2 :]]
        return batches
