"""Token-count batching (section 5.1) and collation, checked against hand-computed batches and tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch
from torch.utils.data import DataLoader

from data import TokenBatchSampler, collate_pairs

MAX_TOKENS = 400


@pytest.fixture(scope="module")
def lengths() -> tuple[np.ndarray, np.ndarray]:
    """3000 pairs of 1..80 tokens (target ~ source +-5), plus 5 pairs longer than a whole batch."""
    rng = np.random.default_rng(0)
    src = rng.integers(1, 80, size=3000)
    tgt = np.clip(src + rng.integers(-5, 6, size=3000), 0, None)
    src[[10, 500, 1500, 2000, 2999]] = [450, 600, 399, 700, 500]  # 399 + eos = 400 still fits alone
    return src, tgt


def make(lengths, **kwargs) -> TokenBatchSampler:
    src, tgt = lengths
    return TokenBatchSampler(src, tgt, max_tokens=kwargs.pop("max_tokens", MAX_TOKENS), seed=7, **kwargs)


def test_pairs_of_one_size_are_ordered_by_source_then_target_length():
    """Four pairs of padded size 11 (the longer side 10, +1 for eos), two with the longer source and two with the
    longer target, and room for two per batch (22 tokens): ordered by size, then source, then target length, the
    batches are {(5, 10), (6, 10)} and {(10, 5), (10, 6)}, each padded by one token on one side. (Ordered by the
    shorter side instead, (10, 5) would share a batch with (5, 10): 5 padding tokens on each side.)"""
    src, tgt = np.array([10, 5, 10, 6]), np.array([5, 10, 6, 10])
    sampler = TokenBatchSampler(src, tgt, max_tokens=22, shuffle=False)
    assert [sorted(b.tolist()) for b in sampler.epoch_batches(0)] == [[1, 3], [0, 2]]


def test_batches_are_mostly_real_tokens(lengths):
    """On the fixture's corpus (target = source +-5 tokens), at least 95% of each side's padded positions are
    real tokens (bench/step_profile.py measures the same on Multi30k)."""
    src, tgt = lengths
    batches = make(lengths).epoch_batches(0)
    for side in (src, tgt):
        real = sum(int((side[b] + 1).sum()) for b in batches)
        padded = sum(len(b) * int(side[b].max() + 1) for b in batches)
        assert real / padded >= 0.95, real / padded


# -- collation ---------------------------------------------------------------------------------------------
def test_collate_matches_hand_written_tensors():
    pad, bos, eos = 0, 2, 3
    batch = collate_pairs([([5, 6, 7], [8]), (np.array([9], dtype=np.uint16), [10, 11])], pad, bos, eos)
    assert torch.equal(batch["src"], torch.tensor([[5, 6, 7, 3], [9, 3, 0, 0]]))
    assert torch.equal(batch["tgt_in"], torch.tensor([[2, 8, 0], [2, 10, 11]]))
    assert torch.equal(batch["tgt_out"], torch.tensor([[8, 3, 0], [10, 11, 3]]))
    assert all(batch[k].dtype == torch.long for k in ("src", "tgt_in", "tgt_out"))
    assert (int(batch["n_src_tokens"]), int(batch["n_tgt_tokens"])) == (6, 5)


# -- batch sizes -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shuffle", [True, False])
def test_padded_batches_stay_within_max_tokens(lengths, shuffle):
    src, tgt = lengths
    sampler = make(lengths, shuffle=shuffle)
    batches = list(sampler)
    for batch in batches:
        # the real tensors the model gets: (B, S) and (B, T) with eos/bos added
        pairs = [(np.ones(src[i], np.int64), np.ones(tgt[i], np.int64)) for i in batch]
        collated = collate_pairs(pairs, 0, 2, 3)
        if len(batch) > 1:  # only a pair longer than the whole budget may exceed it, alone
            assert collated["src"].numel() <= MAX_TOKENS and collated["tgt_in"].numel() <= MAX_TOKENS
    singletons = {b[0] for b in batches if len(b) == 1}
    assert {10, 500, 2000, 2999} <= singletons  # longer than max_tokens: each in its own batch
    # batches are reasonably full: the greedy fill wastes little (padded size > half the budget on average)
    padded = [len(b) * (max(src[b].max(), tgt[b].max()) + 1) for b in map(np.array, batches)]
    assert np.mean(padded) > MAX_TOKENS / 2


def test_greedy_fill_and_split_by_hand():
    # sizes (longer side + 1): [2, 2, 2, 2, 5, 5], max_tokens 10:
    # 4 x 2 = 8 fits, a 5th pair makes 5 x 5 = 25 -> [0, 1, 2, 3]; then 2 x 5 = 10 -> [4, 5].
    src = tgt = np.array([1, 1, 1, 1, 4, 4])
    one = TokenBatchSampler(src, tgt, max_tokens=10, shuffle=False)
    assert list(one) == [[0, 1, 2, 3], [4, 5]]
    # 3 ranks need 3 batches: the largest (padded 10 > 8) is split in two.
    ranks = [list(TokenBatchSampler(src, tgt, max_tokens=10, shuffle=False, rank=r, world_size=3)) for r in range(3)]
    assert ranks == [[[0, 1, 2, 3]], [[4]], [[5]]]


def test_validation_order_is_sorted_and_fixed(lengths):
    src, tgt = lengths
    sampler = make(lengths, shuffle=False)
    first = list(sampler)
    sizes = [max(src[b].max(), tgt[b].max()) + 1 for b in map(np.array, first)]
    assert sizes == sorted(sizes)
    sampler.set_epoch(5)
    assert list(sampler) == first


# -- ranks -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_ranks_get_equal_counts_and_every_pair_once(lengths, world_size):
    unsplit = len(make(lengths, world_size=1))
    per_rank = [list(make(lengths, rank=r, world_size=world_size)) for r in range(world_size)]
    counts = {len(batches) for batches in per_rank}
    assert len(counts) == 1  # same number of steps on every rank, or DDP would hang
    # only as many splits as needed to make the count divisible
    assert sum(len(b) for b in per_rank) == math.ceil(unsplit / world_size) * world_size
    seen = np.sort(np.concatenate([np.concatenate(batches) for batches in per_rank]))
    assert np.array_equal(seen, np.arange(len(lengths[0])))  # each pair exactly once
    for batches in per_rank:
        assert len(make(lengths, world_size=world_size)) == len(batches)


def test_too_few_pairs_for_ranks_is_an_error():
    with pytest.raises(ValueError, match="world_size=4"):
        TokenBatchSampler(np.array([3, 3]), np.array([3, 3]), max_tokens=100, world_size=4)


# -- epochs and determinism --------------------------------------------------------------------------------
def test_same_seed_and_epoch_same_batches_other_epoch_other_order(lengths):
    a, b = make(lengths), make(lengths)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    b.set_epoch(3)
    epoch3 = list(b)
    assert epoch3 != list(a)
    assert sorted(np.concatenate(epoch3)) == list(range(len(lengths[0])))
    other_seed = TokenBatchSampler(*lengths, max_tokens=MAX_TOKENS, seed=8)
    other_seed.set_epoch(2)
    assert list(other_seed) != list(a)


def test_lightning_sets_the_epoch(lengths):
    sampler = make(lengths)
    loader = DataLoader(range(len(lengths[0])), batch_sampler=sampler)
    _set_sampler_epoch(loader, 4)  # what Lightning's fit loop calls at every epoch start
    assert sampler.epoch == 4


# -- resuming mid-epoch ------------------------------------------------------------------------------------
def test_resume_yields_exactly_the_remaining_batches(lengths):
    first = make(lengths)
    first.set_epoch(3)
    full = list(make_epoch(lengths, 3))
    it = iter(first)
    consumed = [next(it) for _ in range(5)]
    assert consumed == full[:5]
    state = first.state_dict()
    assert state == {"epoch": 3, "batches_done": 5}

    resumed = make(lengths)
    resumed.load_state_dict(state)
    resumed.set_epoch(3)  # Lightning sets the epoch again before iterating: must not reset the position
    assert len(resumed) == len(full)  # __len__ is the whole epoch
    assert list(resumed) == full[5:]
    assert resumed.state_dict() == {"epoch": 3, "batches_done": len(full)}
    resumed.set_epoch(4)
    assert list(resumed) == list(make_epoch(lengths, 4))


def make_epoch(lengths, epoch: int) -> TokenBatchSampler:
    sampler = make(lengths)
    sampler.set_epoch(epoch)
    return sampler
