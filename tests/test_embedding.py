"""Embeddings (section 3.4), positional encodings (section 3.5) and the projections' initialization against their
formulas."""

from __future__ import annotations

import math

import pytest
import torch

from modules.config import TransformerConfig
from modules.embedding import LearnedPositionalEmbedding, ScaledEmbedding, SinusoidalPositionalEncoding
from modules.transformer import Transformer


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


@pytest.mark.parametrize("init", ["fairseq", "xavier"])
def test_projections_start_from_the_configured_distributions(init: str) -> None:
    """model.init: every projection's weights and biases against the bounds of the uniform distributions it names
    (Glorot: gain·√(6 / (fan_in + fan_out)); PyTorch's Linear default: 1/√fan_in), the largest value near the bound
    and the standard deviation bound/√3, as a uniform distribution has."""
    torch.manual_seed(0)
    d, d_ff = 256, 1024
    model = Transformer(TransformerConfig(vocab_size=50, n_layers=1, d_model=d, d_ff=d_ff, n_heads=4, init=init))
    glorot = lambda fan_in, fan_out, gain=1.0: gain * math.sqrt(6 / (fan_in + fan_out))  # noqa: E731
    layer = model.decoder.layers[0]
    attention = {"w_q": layer.self_attn.w_q, "w_k": layer.cross_attn.w_k, "w_v": layer.self_attn.w_v}
    if init == "fairseq":
        expected = {name: (glorot(d, d, 2**-0.5), 1 / math.sqrt(d)) for name in attention}
        expected |= {"w_o": (glorot(d, d), 0.0), "w_1": (1 / math.sqrt(d), 1 / math.sqrt(d))}
        expected |= {"w_2": (1 / math.sqrt(d_ff), 1 / math.sqrt(d_ff))}
    else:
        expected = {name: (glorot(d, d), 0.0) for name in (*attention, "w_o")}
        expected |= {"w_1": (glorot(d, d_ff), 0.0), "w_2": (glorot(d_ff, d), 0.0)}
    modules = {**attention, "w_o": layer.self_attn.w_o, "w_1": layer.ffn.w_1, "w_2": layer.ffn.w_2}
    for name, (weight_bound, bias_bound) in expected.items():
        weight, bias = modules[name].weight.detach(), modules[name].bias.detach()
        assert weight.abs().max() <= weight_bound and weight.abs().max() > 0.99 * weight_bound, name
        assert math.isclose(weight.std().item(), weight_bound / math.sqrt(3), rel_tol=0.02), name
        if bias_bound == 0.0:
            assert torch.count_nonzero(bias) == 0, name
        else:
            assert bias.abs().max() <= bias_bound and bias.abs().max() > 0.9 * bias_bound, name
    # the embeddings are N(0, d^-1/2) either way (section 3.4's scaling is applied in forward)
    assert math.isclose(model.encoder.embedding.weight[1:].std().item(), d**-0.5, rel_tol=0.02)
