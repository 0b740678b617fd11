"""modules/dropout.Dropout (section 5.4) with the CPU kernels' masks (modules/cpu_kernels.py) against the definition of
dropout and torch's own nn.Dropout."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from modules.cpu_kernels import keep_mask, keep_scale
from modules.dropout import Dropout
from modules.kernels import CPU


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_each_element_is_dropped_with_probability_p_and_survivors_are_scaled(p):
    """Over 2^20 elements the dropped fraction is p within 5 standard deviations, in each of the four 16-bit
    lanes of the 64-bit random words (a lane with a biased bit, such as an always-0 sign bit, would fail), and
    kept elements are exactly x / (1 - p') with p' = p rounded to 2^-16."""
    torch.manual_seed(0)
    x = torch.rand(1024, 1024) + 1.0  # no zeros: a 0 in the output means dropped
    out = Dropout(p, CPU).train()(x)
    dropped = out.eq(0)
    sigma = math.sqrt(p * (1 - p) / x.numel())
    assert abs(dropped.float().mean().item() - p) < 5 * sigma
    lanes = dropped.reshape(-1, 4).float().mean(dim=0)  # element i of each 4 came from bits 16i..16i+15
    assert (lanes - p).abs().max().item() < 5 * 2 * sigma
    p_rounded = round(p * 65536) / 65536
    torch.testing.assert_close(out[~dropped], x[~dropped] / (1 - p_rounded), rtol=1e-6, atol=0)
    assert abs(p_rounded - p) <= 2**-17


def test_expectation_and_gradient_match_torch_dropout():
    """Averaged over many masks, the output is the input (as with nn.Dropout); the gradient flows through the
    kept elements only, with the same scale; bf16 stays bf16."""
    torch.manual_seed(0)
    x = torch.randn(64, 32, dtype=torch.bfloat16, requires_grad=True)
    ours, theirs = Dropout(0.1, CPU).train(), nn.Dropout(0.1).train()
    mean_ours = torch.stack([ours(x.detach()).float() for _ in range(2000)]).mean(0)
    mean_theirs = torch.stack([theirs(x.detach()).float() for _ in range(2000)]).mean(0)
    assert (mean_ours - x.detach().float()).abs().mean() < 0.02
    assert (mean_ours - x.detach().float()).abs().mean() < 1.5 * (mean_theirs - x.detach().float()).abs().mean()
    out = ours(x)
    assert out.dtype == torch.bfloat16
    out.sum().backward()
    kept = out.detach().ne(0) | x.detach().eq(0)
    expected = torch.where(kept, torch.tensor(65536 / (65536 - 6554)), torch.tensor(0.0)).to(torch.bfloat16)
    torch.testing.assert_close(x.grad, expected)


def test_eval_mode_zero_and_one():
    """Inference is the identity; p = 0 changes nothing; p = 1 drops everything; the seed fixes the mask."""
    x = torch.randn(8, 16)
    assert Dropout(0.5, CPU).eval()(x) is x
    assert Dropout(0.0, CPU).train()(x) is x
    assert Dropout(1.0, CPU).train()(x).eq(0).all()
    torch.manual_seed(3)
    first = Dropout(0.5, CPU).train()(x)
    torch.manual_seed(3)
    assert torch.equal(first, Dropout(0.5, CPU).train()(x))
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(1.5, CPU)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_mask_in_the_activation_dtype_is_the_boolean_mask(dtype):
    """The 0/1 mask built with int16 arithmetic in the activation's dtype is the comparison `bits >= threshold`
    itself, and the output is x · mask · 1/(1 - p') as the plain formula computes it, forward and backward."""
    dropout = Dropout(0.1, CPU).train()
    torch.manual_seed(5)
    as_bool = keep_mask(torch.Size([64, 33]), 0.1)
    torch.manual_seed(5)
    as_dtype = keep_mask(torch.Size([64, 33]), 0.1, dtype)
    assert as_bool.dtype == torch.bool and as_dtype.dtype == dtype
    assert torch.equal(as_dtype, as_bool.to(dtype))
    assert 0 < as_bool.sum() < as_bool.numel()
    x = torch.randn(64, 33, dtype=dtype, requires_grad=True)
    torch.manual_seed(5)
    out = dropout(x)
    torch.testing.assert_close(out, x.detach() * as_bool * keep_scale(0.1), rtol=0, atol=0)
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(x.grad, (torch.ones_like(x) * as_bool * keep_scale(0.1)).to(dtype), rtol=0, atol=0)
