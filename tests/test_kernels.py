"""The device seam (modules/kernels.py): every kernel set computes what the plain formulas compute, and the choice is
made by device when the model and the run are built.

The CUDA kernels run on CPU too (torch's fused attention and the blocked loss exist there), so their equality with
the plain ones is checked here, without a GPU.
"""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from modules.attention import MultiHeadAttention, scaled_dot_product_attention
from modules.config import TransformerConfig
from modules.fused_loss import Chunking, FusedLabelSmoothedCrossEntropy, projected_loss
from modules.kernels import CPU, CUDA, PLAIN, fused_attention, select_kernels
from modules.lightning import TranslationModule
from modules.loss import LabelSmoothedCrossEntropy
from modules.masks import causal_bias, padding_bias
from modules.transformer import Transformer

# Chunkings that split the small test batches (36 tokens x 50 pieces) into several pieces, as the real ones split
# real batches: the CPU's (one matmul, elementwise chunks of 7 rows) and the GPU's (blocks of 10 rows).
CPU_LIKE = Chunking(matmul_elements=None, elementwise_elements=7 * 50)
CUDA_LIKE = Chunking(matmul_elements=10 * 50, elementwise_elements=10 * 50)
CHUNKINGS = {"cpu": CPU_LIKE, "cuda": CUDA_LIKE}


def _target() -> torch.Tensor:
    target = torch.randint(1, 50, (4, 9))  # (batch, tgt_len) over a 50-piece vocabulary, with padding
    target[1, 5:] = 0
    target[3, 2:] = 0
    return target


# -- attention ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", ["none", "padding", "causal", "padding+causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_attention_equals_eq1(mask: str, dtype: torch.dtype) -> None:
    """torch's fused kernel (the CUDA kernels' attention) against Eq. 1 as written, output and gradients of q, k, v,
    with MASKED padding biases and the causal mask given as a flag."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 4, 6, 8, dtype=dtype) for _ in range(3))
    tokens = torch.tensor([[5, 6, 7, 8, 9, 10], [5, 6, 7, 0, 0, 0], [5, 0, 0, 0, 0, 0]])
    bias = padding_bias(tokens, pad_id=0) if "padding" in mask else None
    causal = "causal" in mask
    results = []
    for attention in (lambda *a: scaled_dot_product_attention(*a)[0], fused_attention):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = attention(*leaves, bias, causal)
        (out.float() * torch.linspace(-1, 1, 8)).sum().backward()
        results.append((out, *(t.grad for t in leaves)))
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for ours, reference in zip(results[1], results[0], strict=True):
        assert ours.dtype == dtype
        torch.testing.assert_close(ours.float(), reference.float(), **tol)


def test_causal_flag_is_the_causal_bias() -> None:
    """Eq. 1 with causal=True is Eq. 1 with masks.causal_bias added: the decoder's self-attention passes the flag
    instead of the (tgt_len x tgt_len) bias, so that fused kernels can skip the masked half."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    out, weights = scaled_dot_product_attention(q, k, v, causal=True)
    ref_out, ref_weights = scaled_dot_product_attention(q, k, v, causal_bias(5))
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(weights, ref_weights, rtol=0, atol=0)
    assert torch.all(weights.triu(diagonal=1) == 0)


@pytest.mark.parametrize("kernels", [CPU, CUDA], ids=lambda k: k.name)
def test_multi_head_attention_with_each_kernel_equals_plain(kernels) -> None:  # noqa: ANN001
    """Multi-head attention through each kernel set equals the plain one, self-attention with padding, and the
    grouped layout of beam search (3 query rows per memory row) with a cache."""
    torch.manual_seed(0)
    plain = MultiHeadAttention(16, 4, 4, 6, PLAIN)
    other = MultiHeadAttention(16, 4, 4, 6, kernels)
    other.load_state_dict(plain.state_dict())
    x = torch.randn(2, 5, 16)
    bias = padding_bias(torch.tensor([[7, 7, 7, 0, 0], [7, 7, 7, 7, 7]]), pad_id=0)
    torch.testing.assert_close(other(x, x, bias), plain(x, x, bias), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(other(x, x, causal=True), plain(x, x, causal=True), rtol=1e-5, atol=1e-6)
    query = torch.randn(6, 1, 16)
    outs = []
    for attention in (plain, other):
        cache: dict = {}
        attention(query[::3], x, bias, cache=cache, static_kv=True)
        outs.append(attention(query, x, bias, cache=cache, static_kv=True))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)


# -- the projected loss ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_loss_of_logits_equals_the_plain_one(dtype: torch.dtype) -> None:
    """FusedLabelSmoothedCrossEntropy (the loss of float16 logits) against the plain log-softmax one, on logits of
    both dtypes, with padding and chunks smaller than the rows."""
    torch.manual_seed(0)
    target = _target()
    logits = (3 * torch.randn(4, 9, 50)).to(dtype)
    results = {}
    for fused in (False, True):
        leaf = logits.clone().requires_grad_(True)
        if fused:
            loss, nll = FusedLabelSmoothedCrossEntropy.apply(leaf, target, 0.1, 0, CPU_LIKE)
        else:
            loss, nll = LabelSmoothedCrossEntropy(0.1, pad_id=0)(leaf, target)
        (2.5 * loss).backward()
        results[fused] = (loss.detach(), nll.detach(), leaf.grad)
    (loss, nll, grad), (f_loss, f_nll, f_grad) = results[False], results[True]
    torch.testing.assert_close(f_loss, loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(f_nll, nll, rtol=1e-5, atol=1e-4)
    assert f_grad.dtype == dtype and not f_nll.requires_grad
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-3}
    torch.testing.assert_close(f_grad.float(), grad.float(), **tol)
    assert f_grad[target == 0].abs().max() == 0  # padding positions get no gradient


@pytest.mark.parametrize("chunking", CHUNKINGS, ids=str)
@pytest.mark.parametrize("autocast", [False, True])
def test_projected_loss_equals_projection_then_plain_loss(autocast: bool, chunking: str) -> None:
    """projected_loss (projection, loss and their gradients in one, blocked as the CPU and the GPU block it) against
    F.linear then the plain loss, in float32 and under bf16 autocast (float32 hidden states and weight, as the
    model holds them), with padding: the same loss and nll, the same gradients for the hidden states and the weight,
    in their own dtypes; and without gradients (validation) the same sums. Under bf16 both are compared with a
    float64 computation from the same bf16-rounded inputs, and the fused one must be as close to it as the plain
    one (bf16 rounds their matmul outputs at different points)."""
    torch.manual_seed(0)
    target = _target()
    hidden = torch.randn(4, 9, 16)
    weight = torch.randn(50, 16) * 16**-0.5
    if autocast:  # the values autocast multiplies are then the inputs themselves
        hidden, weight = hidden.bfloat16().float(), weight.bfloat16().float()
    criterion = LabelSmoothedCrossEntropy(0.1, pad_id=0)
    results = {}
    for mode in ("plain", "fused", "float64"):
        dtype = torch.float64 if mode == "float64" else torch.float32
        h, w = hidden.to(dtype, copy=True).requires_grad_(True), weight.to(dtype, copy=True).requires_grad_(True)

        def loss_of(h, w, mode=mode):  # noqa: ANN001, ANN202
            if mode == "fused":
                return projected_loss(criterion, h, w, target, CHUNKINGS[chunking])
            return criterion.from_hidden(h, w, target)

        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast and mode != "float64"):
            loss, nll = loss_of(h, w)
            with torch.no_grad():
                no_grad = loss_of(h, w)
        (2.5 * loss).backward()
        results[mode] = (loss.detach(), nll.detach(), h.grad, w.grad, no_grad)
    (loss, nll, grad_h, grad_w, _), (f_loss, f_nll, f_grad_h, f_grad_w, f_no_grad) = results["plain"], results["fused"]
    torch.testing.assert_close(f_no_grad[0], f_loss)
    torch.testing.assert_close(f_no_grad[1], f_nll)
    assert not f_nll.requires_grad and f_grad_h.dtype == f_grad_w.dtype == torch.float32
    assert f_grad_w.is_contiguous()
    assert f_grad_h[target == 0].abs().max() == 0  # padding positions get no gradient
    if not autocast:
        for fused, plain in zip((f_loss, f_nll, f_grad_h, f_grad_w), (loss, nll, grad_h, grad_w), strict=True):
            torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
        return
    exact = results["float64"]
    for i in range(4):  # loss, nll, grad_h, grad_w
        error = {mode: (results[mode][i].double() - exact[i]).abs().max().item() for mode in ("plain", "fused")}
        assert error["fused"] <= 1.5 * error["plain"] + 1e-6 * exact[i].abs().max().item(), (i, error)


@pytest.mark.parametrize("chunking", CHUNKINGS, ids=str)
def test_projected_loss_with_bf16_parameters_and_float16_autocast(chunking: str) -> None:
    """bf16 parameters without autocast (DeepSpeed's bf16 engine) take the blocked path, with bf16 gradients as close
    to a float64 computation as the plain path's; float16 autocast (16-mixed) projects first and takes the fused loss
    of the logits, the same numbers as the plain loss."""
    torch.manual_seed(0)
    target = _target()
    hidden, weight = torch.randn(4, 9, 16).bfloat16(), (torch.randn(50, 16) * 16**-0.5).bfloat16()
    criterion = LabelSmoothedCrossEntropy(0.1, pad_id=0)
    results = {}
    for mode in ("plain", "fused", "float64"):
        dtype = torch.float64 if mode == "float64" else torch.bfloat16
        h, w = hidden.to(dtype, copy=True).requires_grad_(True), weight.to(dtype, copy=True).requires_grad_(True)
        if mode == "fused":
            loss, nll = projected_loss(criterion, h, w, target, CHUNKINGS[chunking])
        else:
            loss, nll = criterion.from_hidden(h, w, target)
        loss.backward()
        results[mode] = (loss.detach(), nll.detach(), h.grad, w.grad)
    assert results["fused"][2].dtype == results["fused"][3].dtype == torch.bfloat16
    for i in range(4):
        error = {m: (results[m][i].double() - results["float64"][i]).abs().max().item() for m in ("plain", "fused")}
        assert error["fused"] <= 1.5 * error["plain"] + 1e-6 * results["float64"][i].abs().max().item(), (i, error)

    h, w = hidden.float(), weight.float()
    with torch.autocast("cpu", dtype=torch.float16):
        fused = projected_loss(criterion, h, w, target, CHUNKINGS[chunking])
        plain = criterion(F.linear(h, w), target)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-4)


# -- the whole model ---------------------------------------------------------------------------------------------

# tensor2tensor's start (init xavier): the bf16 comparison below was set on it. From fairseq's smaller start the CUDA
# set run on this CPU (torch's fused attention in bf16) lands further from float64 than the plain formulas do.
MODEL = {"vocab_size": 40, "n_layers": 2, "d_model": 16, "d_ff": 32, "n_heads": 2, "dropout": 0.0, "init": "xavier"}
OPTIM = {"betas": [0.9, 0.98], "eps": 1e-9, "warmup_steps": 3, "label_smoothing": 0.1}


def _batch() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    batch = {
        "src": torch.randint(1, 40, (3, 7)),
        "tgt_in": torch.randint(1, 40, (3, 6)),
        "tgt_out": torch.randint(1, 40, (3, 6)),
    }
    batch["src"][1, 4:] = 0
    batch["tgt_out"][2, 3:] = 0
    return batch


def _step(module: TranslationModule, kernels, autocast: bool) -> list[torch.Tensor]:  # noqa: ANN001
    """Loss, nll and every parameter's gradient of one training step on _batch(): through the module's own path
    (TranslationModule.batch_losses) with `kernels`, or with kernels None as written: logits = model(src, tgt_in), then
    the plain loss."""
    batch = _batch()
    module.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if kernels is None:
            module.model.use_kernels(PLAIN)
            logits = module.model(batch["src"], batch["tgt_in"])
            loss, nll = LabelSmoothedCrossEntropy(0.1, pad_id=0)(logits, batch["tgt_out"])
        else:
            module.model.use_kernels(kernels)
            loss, nll, _ = module.batch_losses(batch)
    loss.backward()
    return [loss.detach(), nll.detach(), *(p.grad.clone() for p in module.parameters())]


@pytest.mark.parametrize("kernels", [CPU, CUDA], ids=lambda k: k.name)
@pytest.mark.parametrize("autocast", [False, True])
def test_training_step_with_each_kernel_set_equals_the_plain_one(kernels, autocast: bool) -> None:  # noqa: ANN001
    """The training step's losses and every parameter's gradient (the tied embedding gets the projection's and the
    lookups' gradients) are the same with each device's kernels as with the plain formulas. Under bf16 autocast
    the two round at different points: each is compared with the same step in float64, and the kernels must be as
    close to it as the plain formulas are."""
    torch.manual_seed(0)
    module = TranslationModule(model=MODEL, optim=OPTIM, n_samples=0)
    ours, plain = _step(module, kernels, autocast), _step(module, None, autocast)
    if not autocast:
        for a, b in zip(ours, plain, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        return
    exact = _step(copy.deepcopy(module).double(), None, autocast=False)

    def error(values: list[torch.Tensor], part: slice) -> float:  # L2 distance to float64 over all of `part`
        return (
            torch.cat([(a.double() - b).flatten() for a, b in zip(values[part], exact[part], strict=True)])
            .norm()
            .item()
        )

    for part in (slice(0, 1), slice(1, 2), slice(2, None)):  # the loss, the nll, all the gradients together
        assert error(ours, part) <= 1.5 * error(plain, part) + 1e-6, (part, error(ours, part), error(plain, part))


@pytest.mark.parametrize("kernels", [CPU, CUDA], ids=lambda k: k.name)
def test_decoding_with_each_kernel_set_equals_the_plain_one(kernels) -> None:  # noqa: ANN001
    """Incremental decoding (the cache, one position at a time) and teacher forcing give the plain kernels'
    logits with each device's kernels."""
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(**MODEL)).eval()
    src = torch.tensor([[5, 6, 7, 8, 0], [9, 10, 11, 12, 13]])
    tgt = torch.tensor([[2, 14, 15, 16], [2, 19, 20, 21]])
    with torch.no_grad():
        full = model(src, tgt)
        model.use_kernels(kernels)
        torch.testing.assert_close(model(src, tgt), full, rtol=1e-5, atol=1e-5)
        memory, src_bias = model.encode(src)
        cache = model.new_cache()
        for t in range(tgt.size(1)):
            step = model.decode(tgt[:, t : t + 1], memory, src_bias, cache, start=t)
            torch.testing.assert_close(step[:, 0], full[:, t], rtol=1e-5, atol=1e-5)


def test_dropout_with_each_kernel_set_keeps_the_expectation() -> None:
    """In training, dropout through every kernel set zeroes about P_drop of the elements and scales the rest by
    1 / (1 - P_drop) (the CPU's P_drop rounded to 2^-16), in the activation's dtype."""
    from modules.dropout import Dropout

    x = torch.rand(256, 256, dtype=torch.bfloat16) + 1.0
    for kernels in (PLAIN, CPU, CUDA):
        torch.manual_seed(0)
        out = Dropout(0.3, kernels).train()(x)
        dropped = out.eq(0).float().mean().item()
        assert out.dtype == torch.bfloat16 and abs(dropped - 0.3) < 0.01, (kernels.name, dropped)
        kept = out.ne(0)
        torch.testing.assert_close(out[kept].float(), (x[kept].float() / 0.7), rtol=1e-2, atol=0)


# -- the choice ----------------------------------------------------------------------------------------------------


def test_auto_picks_the_kernels_by_device_and_names_are_checked() -> None:
    assert select_kernels("auto", "cpu") is CPU
    assert select_kernels("auto", torch.device("cuda", 1)) is CUDA
    assert select_kernels("auto", "meta") is PLAIN  # any other device: the formulas as written
    assert select_kernels("plain", "cuda") is PLAIN
    assert select_kernels("cuda", "cpu") is CUDA
    with pytest.raises(ValueError, match=r"device.kernels='fast': use one of auto, plain, cpu, cuda"):
        select_kernels("fast", "cpu")
    with pytest.raises(ValueError, match="device.kernels=cpu runs on CPUs only"):
        select_kernels("cpu", "cuda")
    with pytest.raises(ValueError, match="device.compile='yes'"):
        TranslationModule(model=MODEL, optim=OPTIM, compile="yes")


@pytest.mark.parametrize(("choice", "expected"), [("auto", "cpu"), ("plain", "plain"), ("cuda", "cuda")])
def test_the_trainer_sets_the_module_up_with_the_kernels_of_its_device(choice: str, expected: str) -> None:
    """A CPU trainer's setup gives the module the kernels device.kernels asks for there (auto: the CPU's), and
    compiles nothing by default; every layer then computes with them."""
    module = TranslationModule(model=MODEL, optim=OPTIM, n_samples=0, kernels=choice, compile="auto")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    module.trainer = trainer
    module.setup("fit")
    assert module.model.kernels.name == expected
    assert {m.kernels.name for m in module.model.modules() if hasattr(m, "kernels")} == {expected}
    assert module.features == module.model.features  # auto compiles on CUDA only


@pytest.mark.slow
def test_compiled_forward_equals_eager_over_changing_shapes_without_recompiling() -> None:
    """device.compile: the encoder-decoder forward compiled with dynamic shapes gives the eager values and gradients
    for batches whose sentence count and both lengths change from step to step, from one compiled graph (token
    batches would otherwise recompile at nearly every step)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    module = TranslationModule(model=MODEL, optim=OPTIM, n_samples=0, kernels="plain", compile=True)
    module.use_device("cpu")
    assert module.features is not module.model.features
    for batch, src_len, tgt_len in [(3, 7, 6), (5, 9, 4), (2, 11, 13), (4, 5, 3)]:
        src, tgt_in = torch.randint(1, 40, (batch, src_len)), torch.randint(1, 40, (batch, tgt_len))
        outputs = []
        for features in (module.features, module.model.features):
            module.zero_grad()
            hidden = features(src, tgt_in)
            (hidden * torch.linspace(-1, 1, 16)).sum().backward()
            outputs.append((hidden.detach(), *(p.grad.clone() for p in module.parameters())))
        for compiled, eager in zip(*outputs, strict=True):
            torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
