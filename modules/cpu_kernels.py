"""The CPU's kernels (modules/kernels.py): the same numbers as the plain formulas, computed the way torch's CPU
operators are fast: a softmax over a short last dimension padded to one vector's width, and dropout masks drawn
as 16 random bits per element."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# torch's CPU softmax over a last dimension shorter than this (one AVX-512 vector of float32) takes a slow path.
SHORT_SOFTMAX = 16


def padded_softmax_float32(scores: torch.Tensor) -> torch.Tensor:
    """softmax over the keys (last dimension) in float32, fewer than SHORT_SOFTMAX keys padded with -inf scores first
    and the padding dropped after: exp(-inf) is exactly 0, so the maximum, the sum and every real weight are
    unchanged, and it runs at the fast path's speed."""
    k_len = scores.size(-1)
    if k_len < SHORT_SOFTMAX:
        padded = F.pad(scores, (0, SHORT_SOFTMAX - k_len), value=float("-inf"))
        return F.softmax(padded, dim=-1, dtype=torch.float32)[..., :k_len]
    return F.softmax(scores, dim=-1, dtype=torch.float32)


MASK_BITS = 16  # random bits per element: four elements per 64-bit draw of the generator
# 1.0 as the int16 bit pattern of each 16-bit float type
ONE_BITS = {dtype: int(torch.tensor(1.0, dtype=dtype).view(torch.int16)) for dtype in (torch.bfloat16, torch.float16)}


def drop_levels(p: float) -> int:
    """P_drop as a count of the 2^16 values of an element's random bits: round(P_drop · 2^16)."""
    return round(p * (1 << MASK_BITS))


def keep_scale(p: float) -> float:
    """1 / (1 - P_drop') for P_drop' = P_drop rounded to a multiple of 2^-16, so the expectation stays exact."""
    levels = 1 << MASK_BITS
    dropped = drop_levels(p)
    return levels / (levels - dropped) if dropped < levels else 0.0


def keep_mask(shape: torch.Size, p: float, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """A CPU tensor of `shape`: 1 (True) where an element is kept, with probability 1 - round(P_drop · 2^16) / 2^16,
    else 0 (False), in `dtype`.

    Each element's 16 random bits come four at a time from 64-bit numbers of numpy's PCG64DXSM, seeded by one number
    from torch's generator (so `torch.manual_seed` makes masks reproducible): torch's own CPU dropout draws a
    Bernoulli number per element from a slower generator. The kept/dropped test is done in int16 arithmetic that
    leaves 1.0 or 0.0 in the activation's own dtype, since a bf16-times-bool multiply is a slow path.
    """
    n = shape.numel()
    seed = int(torch.randint(-(2**63), 2**63 - 1, ()))  # from torch's generator: torch.manual_seed applies
    words = np.random.Generator(np.random.PCG64DXSM(seed & (2**64 - 1))).integers(
        -(2**63), 2**63 - 1, size=(n + 3) // 4, dtype=np.int64, endpoint=True
    )  # every bit uniform
    bits = torch.from_numpy(words).view(torch.int16)[:n]  # uniform on [-2^15, 2^15)
    threshold = drop_levels(p) - (1 << (MASK_BITS - 1))  # kept when bits >= threshold
    if dtype == torch.bool:
        return (bits >= threshold).view(shape)
    # clamp to [threshold - 1, threshold] and shift down: 0 where dropped, 1 where kept, all in int16
    keep = bits.clamp_(threshold - 1, threshold).sub_(threshold - 1)
    if dtype.itemsize == 2:  # bf16, fp16: 0 and the bit pattern of 1.0 are the values 0.0 and 1.0
        return keep.mul_(ONE_BITS[dtype]).view(dtype).view(shape)
    return keep.to(dtype).view(shape)


def bitmask_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout of a CPU tensor with keep_mask's masks: x · mask / (1 - P_drop')."""
    scale = keep_scale(p)
    if scale == 0.0:  # P_drop = 1: nothing is kept
        return x * 0.0
    return (x * keep_mask(x.shape, p, x.dtype)).mul_(scale)
