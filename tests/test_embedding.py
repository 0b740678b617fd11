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


def test_transformer_runs_with_low_precision_parameters_and_fp32_buffers():
    """DeepSpeed's bf16 engine casts a module's parameters to bf16 and keeps its buffers (the sinusoid table) in
    fp32 (deepspeed/runtime/engine.py, _configure_distributed_model). The model must then compute in bf16
    throughout, and give the fp32 model's logits up to bf16 rounding."""
    from modules.config import TransformerConfig
    from modules.transformer import Transformer

    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=40, n_layers=1, d_model=32, d_ff=64, n_heads=2, dropout=0.0)
    model = Transformer(cfg).eval()
    src, tgt_in = torch.randint(1, 40, (2, 7)), torch.randint(1, 40, (2, 5))
    reference = model(src, tgt_in)
    for p in model.parameters():
        p.data = p.data.bfloat16()
    assert model.encoder.positional.table.dtype == torch.float32
    logits = model(src, tgt_in)  # raised "mat1 and mat2 must have the same dtype" before the cast to x.dtype
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), reference, atol=0.1, rtol=0.05)
    logits.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.parameters())
