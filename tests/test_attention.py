"""Attention (Eq. 1, section 3.2) against explicit references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from modules.attention import MultiHeadAttention, scaled_dot_product_attention
from modules.config import TransformerConfig
from modules.cpu_kernels import SHORT_SOFTMAX, padded_softmax_float32
from modules.kernels import PLAIN
from modules.masks import MASKED, causal_bias, padding_bias
from modules.transformer import Transformer


def test_attention_equals_explicit_formula():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 4)
    out, weights = scaled_dot_product_attention(q, k, v)
    # Reference in float64, element by element: softmax(q·k / √d_k) then the weighted sum of v.
    qd, kd, vd = q.double(), k.double(), v.double()
    expected = torch.zeros(2, 3, 5, 4, dtype=torch.float64)
    for b in range(2):
        for h in range(3):
            for i in range(5):
                scores = [float(qd[b, h, i] @ kd[b, h, j]) / math.sqrt(8) for j in range(7)]
                top = max(scores)
                exp = [math.exp(s - top) for s in scores]
                total = sum(exp)
                for j in range(7):
                    expected[b, h, i] += exp[j] / total * vd[b, h, j]
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, 5))


@pytest.mark.parametrize("kind", ["self", "encoder-decoder"])
def test_multi_head_equals_per_head_projections(kind):
    """MultiHead = Concat(head_1..head_h) W^O with head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V), d_k != d_v, in
    value and in the gradients of W^Q, W^K, W^V: the module computes the projections of one input in a single
    matmul of the concatenated weights (MultiHeadAttention._project_qkv), the reference per head and matrix."""
    torch.manual_seed(0)
    d_model, h, d_k, d_v = 16, 4, 3, 5
    mha = MultiHeadAttention(d_model, h, d_k, d_v, PLAIN)
    x = torch.randn(2, 6, d_model)
    mem = x if kind == "self" else torch.randn(2, 9, d_model)
    heads = []
    for i in range(h):
        wq, bq = mha.w_q.weight[i * d_k : (i + 1) * d_k], mha.w_q.bias[i * d_k : (i + 1) * d_k]
        wk, bk = mha.w_k.weight[i * d_k : (i + 1) * d_k], mha.w_k.bias[i * d_k : (i + 1) * d_k]
        wv, bv = mha.w_v.weight[i * d_v : (i + 1) * d_v], mha.w_v.bias[i * d_v : (i + 1) * d_v]
        q, k, v = x @ wq.T + bq, mem @ wk.T + bk, mem @ wv.T + bv
        weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d_k), dim=-1)
        heads.append(weights @ v)
    expected = torch.cat(heads, dim=-1) @ mha.w_o.weight.T + mha.w_o.bias
    projections = [mha.w_q.weight, mha.w_k.weight, mha.w_v.weight, mha.w_q.bias, mha.w_v.bias]
    expected_grads = torch.autograd.grad(expected.square().sum(), projections)
    out = mha(x, mem)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), projections)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)


def test_masked_positions_get_zero_weight():
    tokens = torch.tensor([[5, 6, 7, 0, 0]])
    bias = padding_bias(tokens, pad_id=0) + causal_bias(5)
    _, weights = scaled_dot_product_attention(
        torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), bias
    )
    assert torch.all(weights[..., 3:] == 0)  # padding keys
    assert torch.all(weights.triu(diagonal=1) == 0)  # the future
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 2, 5))


def _tiny_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    cfg = dict(vocab_size=50, n_layers=2, d_model=32, d_ff=64, n_heads=4, dropout=0.0)
    cfg.update(overrides)
    return Transformer(TransformerConfig(**cfg)).eval()


def test_padded_keys_change_nothing():
    model = _tiny_model()
    src = torch.tensor([[5, 6, 7, 8]])
    tgt = torch.tensor([[2, 9, 10]])
    alone = model(src, tgt)
    padded = model(torch.tensor([[5, 6, 7, 8, 0, 0, 0]]), tgt)
    torch.testing.assert_close(alone, padded, rtol=1e-5, atol=1e-5)
    # Batched with a longer sentence, the short one's outputs are the same as alone.
    batch_src = torch.tensor([[5, 6, 7, 8, 0, 0], [11, 12, 13, 14, 15, 16]])
    batch_tgt = torch.tensor([[2, 9, 10], [2, 17, 18]])
    torch.testing.assert_close(model(batch_src, batch_tgt)[:1], alone, rtol=1e-5, atol=1e-5)


def test_no_position_sees_the_future():
    model = _tiny_model()
    src = torch.tensor([[5, 6, 7, 8]])
    tgt = torch.tensor([[2, 9, 10, 11, 12]])
    base = model(src, tgt)
    for j in range(1, 5):
        changed = tgt.clone()
        changed[0, j] = 30
        out = model(src, changed)
        torch.testing.assert_close(out[:, :j], base[:, :j], rtol=1e-5, atol=1e-5)  # before j: unchanged
        assert not torch.allclose(out[:, j], base[:, j])  # at j: it does see its own input


def test_incremental_decoding_equals_full_recomputation():
    for norm in ("post", "pre"):
        model = _tiny_model(norm=norm)
        src = torch.tensor([[5, 6, 7, 8, 0], [9, 10, 11, 12, 13]])
        tgt = torch.tensor([[2, 14, 15, 16, 17, 18], [2, 19, 20, 21, 22, 23]])
        full = model(src, tgt)  # (2, 6, vocab)
        memory, src_bias = model.encode(src)
        cache = model.new_cache()
        for t in range(tgt.size(1)):
            step = model.decode(tgt[:, t : t + 1], memory, src_bias, cache, start=t)
            torch.testing.assert_close(step[:, 0], full[:, t], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cached", [False, True])
def test_query_rows_sharing_a_memory_row_equal_the_memory_copied_per_row(cached: bool) -> None:
    """Beam search's layout: 3 query rows per memory row (a sentence's beams) attend exactly as if the memory and its
    padding bias had been copied to every query row. Outputs and attention weights, with and without the cache."""
    torch.manual_seed(0)
    attention = MultiHeadAttention(d_model=16, n_heads=4, d_k=4, d_v=6, kernels=PLAIN)
    attention.keep_weights = True
    memory = torch.randn(2, 5, 16)  # (sentences, src_len, d_model)
    tokens = torch.tensor([[7, 7, 7, 0, 0], [7, 7, 7, 7, 7]])
    bias = padding_bias(tokens, pad_id=0)  # (2, 1, 1, 5): the first sentence has 2 padded positions
    query = torch.randn(6, 1, 16)  # (sentences * 3 beams, 1, d_model)
    order = torch.arange(2).repeat_interleave(3)
    cache = {} if cached else None
    if cached:  # the encoder-decoder keys/values, computed once from the memory
        attention(query[::3], memory, bias, cache=cache, static_kv=True)
    shared = attention(query, memory, bias, cache=cache, static_kv=True)
    shared_weights = attention.last_weights
    copied = attention(query, memory[order], bias[order])
    torch.testing.assert_close(shared, copied)
    torch.testing.assert_close(shared_weights, attention.last_weights)
    assert shared_weights.shape == (6, 4, 1, 5) and float(shared_weights[:3, :, :, 3:].abs().max()) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_short_softmax_padding_gives_torch_softmax(dtype):
    """padded_softmax_float32 (the CPU kernels') pads fewer than SHORT_SOFTMAX keys with -inf: the same weights
    (float32) and gradients as torch's softmax over the unpadded keys, for every key length around the threshold,
    with masked keys (MASKED bias) and a fully masked row."""
    torch.manual_seed(0)
    for k_len in range(1, SHORT_SOFTMAX + 3):
        scores = (4 * torch.randn(3, 2, 5, k_len)).to(dtype)
        scores[0, :, :, -1] = MASKED
        scores[1, 0, 2, :] = MASKED
        results = []
        for fn in (padded_softmax_float32, lambda s: F.softmax(s, dim=-1, dtype=torch.float32)):
            leaf = scores.clone().requires_grad_(True)
            weights = fn(leaf)
            (weights * torch.arange(k_len)).sum().backward()
            results.append((weights, leaf.grad))
        (ours, our_grad), (theirs, their_grad) = results
        assert ours.dtype == torch.float32 and ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(our_grad, their_grad, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)
