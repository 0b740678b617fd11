"""Dropout, as section 5.4 ("Residual Dropout") applies it, with a mask that is cheap to draw on CPU."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MASK_BITS = 16  # random bits per element: four elements per 64-bit draw of the generator
# 1.0 as the int16 bit pattern of each 16-bit float type
ONE_BITS = {dtype: int(torch.tensor(1.0, dtype=dtype).view(torch.int16)) for dtype in (torch.bfloat16, torch.float16)}


class Dropout(nn.Module):
    """Dropout (Srivastava et al., 2014): in training, zero each element with probability P_drop and scale the
    survivors by 1 / (1 - P_drop), so that an activation's expectation is unchanged and inference needs no
    rescaling. "For the base model, we use a rate of P_drop = 0.1."

    On CPU the mask is drawn as 16 random bits per element, four elements from each 64-bit number, and an element
    is kept when its bits are at least round(P_drop · 2^16). torch's own dropout draws one Bernoulli number per
    element instead: on this 2-core CPU that drawing was 10 of the 12.5 ms a dropout of a 4096 x 512 bf16
    activation took, 32 times per base-model step. The 64-bit numbers come from numpy's PCG64DXSM, seeded by one
    number from torch's generator (so `torch.manual_seed` makes masks reproducible): it fills them in 0.8 ms where
    torch's CPU generator (a Mersenne Twister) takes 1.7 ms. The kept/dropped test is then done in int16
    arithmetic that leaves 1.0 or 0.0 in the activation's own dtype, since torch's bf16-times-bool multiply is a
    slow path: the whole dropout takes about 2 ms. P_drop is thereby rounded to a multiple of 2^-16 (0.1 becomes
    0.100006), and the scale uses the rounded value, so the output's expectation is still exact. Elsewhere (CUDA)
    torch's fused kernel is already fast and is used as it is.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p
        levels = 1 << MASK_BITS
        self.drop_levels = round(p * levels)  # an element is dropped when its bits (as unsigned) are below this
        self.keep_scale = levels / (levels - self.drop_levels) if self.drop_levels < levels else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        if self.keep_scale == 0.0:  # P_drop = 1: nothing is kept
            return x * 0.0
        return (x * self.keep_mask(x.shape, x.dtype)).mul_(self.keep_scale)

    def keep_mask(self, shape: torch.Size, dtype: torch.dtype = torch.bool) -> torch.Tensor:
        """A CPU tensor of `shape`: 1 (True) where the element is kept, with probability 1 - drop_levels / 2^16,
        else 0 (False), in `dtype`."""
        n = shape.numel()
        seed = int(torch.randint(-(2**63), 2**63 - 1, ()))  # from torch's generator: torch.manual_seed applies
        words = np.random.Generator(np.random.PCG64DXSM(seed & (2**64 - 1))).integers(
            -(2**63), 2**63 - 1, size=(n + 3) // 4, dtype=np.int64, endpoint=True
        )  # every bit uniform
        bits = torch.from_numpy(words).view(torch.int16)[:n]  # uniform on [-2^15, 2^15)
        threshold = self.drop_levels - (1 << (MASK_BITS - 1))  # kept when bits >= threshold
        if dtype == torch.bool:
            return (bits >= threshold).view(shape)
        # clamp to [threshold - 1, threshold] and shift down: 0 where dropped, 1 where kept, all in int16
        keep = bits.clamp_(threshold - 1, threshold).sub_(threshold - 1)
        if dtype.itemsize == 2:  # bf16, fp16: 0 and the bit pattern of 1.0 are the values 0.0 and 1.0
            return keep.mul_(ONE_BITS[dtype]).view(dtype).view(shape)
        return keep.to(dtype).view(shape)

    def extra_repr(self) -> str:
        return f"p={self.p}"
