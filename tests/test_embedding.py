"""Embeddings (section 3.4) and positional encodings (section 3.5) against their formulas."""

from __future__ import annotations

import math

import torch

from modules.embedding import LearnedPositionalEmbedding, ScaledEmbedding, SinusoidalPositionalEncoding


def test_sinusoidal_encoding_equals_formula():
    d_model = 16
    pe = SinusoidalPositionalEncoding(d_model, max_positions=64)
    table = pe(50)[0]
    for pos in (0, 1, 7, 49):
        for i in range(d_model // 2):
            angle = pos / 10000 ** (2 * i / d_model)
            assert math.isclose(table[pos, 2 * i].item(), math.sin(angle), abs_tol=1e-6)
            assert math.isclose(table[pos, 2 * i + 1].item(), math.cos(angle), abs_tol=1e-6)
    # An offset (incremental decoding) and growth past the table both give the same values.
    torch.testing.assert_close(pe(3, start=10)[0], table[10:13])
    assert math.isclose(pe(1, start=200)[0, 0, 0].item(), math.sin(200), abs_tol=1e-5)


def test_embeddings_scaled_by_sqrt_d_model_and_pad_is_zero():
    emb = ScaledEmbedding(vocab_size=10, d_model=36, pad_id=0)
    out = emb(torch.tensor([[3, 0]]))
    torch.testing.assert_close(out[0, 0], emb.weight[3] * 6.0)
    assert torch.all(out[0, 1] == 0)


def test_learned_positions_reject_too_long_inputs():
    pe = LearnedPositionalEmbedding(8, max_positions=4)
    assert pe(4).shape == (1, 4, 8)
    try:
        pe(5)
    except ValueError as err:
        assert "model.max_positions" in str(err)
    else:
        raise AssertionError("a sequence longer than max_positions must fail")
