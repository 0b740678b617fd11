"""Label smoothing (section 5.4) and the learning-rate schedule (Eq. 3) against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from modules.loss import FusedLabelSmoothedCrossEntropy, LabelSmoothedCrossEntropy
from modules.schedule import inverse_sqrt_lr, inverse_sqrt_scheduler


def test_label_smoothing_equals_hand_computed_value():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = probs.log()[None, None]  # (batch 1, len 1, vocab 4)
    loss, nll = LabelSmoothedCrossEntropy(epsilon=0.1, pad_id=0)(logits, torch.tensor([[3]]))
    # q = 0.9·onehot(3) + 0.1/4: loss = 0.9·(-ln 0.4) + 0.1·mean(-ln p)
    expected = 0.9 * -math.log(0.4) + 0.1 * (-math.log(0.1) - math.log(0.2) - math.log(0.3) - math.log(0.4)) / 4
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    assert math.isclose(expected, 0.975469, abs_tol=1e-6)
    assert math.isclose(nll.item(), -math.log(0.4), rel_tol=1e-6)


def test_label_smoothing_ignores_padding_and_matches_torch():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    target = torch.randint(1, 11, (3, 5))
    target[0, 3:] = 0
    target[2, 1:] = 0
    loss, _ = LabelSmoothedCrossEntropy(epsilon=0.1, pad_id=0)(logits, target)
    reference = F.cross_entropy(
        logits.view(-1, 11), target.view(-1), ignore_index=0, label_smoothing=0.1, reduction="sum"
    )
    torch.testing.assert_close(loss, reference)


def test_schedule_equals_eq3():
    assert math.isclose(inverse_sqrt_lr(4000, 512, 4000), 6.99e-4, rel_tol=2e-3)  # the peak
    assert math.isclose(inverse_sqrt_lr(1, 512, 4000), 512**-0.5 * 4000**-1.5)
    assert math.isclose(inverse_sqrt_lr(16000, 512, 4000), 512**-0.5 * 16000**-0.5)
    assert math.isclose(inverse_sqrt_lr(100, 512, 4000, scale=2.0), 2 * 512**-0.5 * 100 * 4000**-1.5)
    peak = max(range(1, 10000), key=lambda s: inverse_sqrt_lr(s, 512, 4000))
    assert peak == 4000


def test_scheduler_applies_eq3_at_each_update():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([param], lr=1.0, betas=(0.9, 0.98), eps=1e-9)
    scheduler = inverse_sqrt_scheduler(optimizer, d_model=512, warmup_steps=10)
    for update in range(1, 30):  # the k-th update runs at Eq. 3's step k
        assert math.isclose(optimizer.param_groups[0]["lr"], inverse_sqrt_lr(update, 512, 10))
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_loss_equals_the_plain_one_in_value_and_gradient(dtype, monkeypatch):
    """The chunked, fused loss (modules/loss.FusedLabelSmoothedCrossEntropy) against the plain log-softmax one,
    on logits of both dtypes training sees, with padding, and chunks smaller than the rows (several chunks)."""
    monkeypatch.setattr(FusedLabelSmoothedCrossEntropy, "CHUNK_ELEMENTS", 7 * 50)
    torch.manual_seed(0)
    target = torch.randint(1, 50, (4, 9))
    target[1, 5:] = 0
    target[3, 2:] = 0
    logits = (3 * torch.randn(4, 9, 50)).to(dtype)
    results = {}
    for fused in (False, True):
        leaf = logits.clone().requires_grad_(True)
        loss, nll = LabelSmoothedCrossEntropy(0.1, pad_id=0, fused=fused)(leaf, target)
        (2.5 * loss).backward()
        results[fused] = (loss.detach(), nll.detach(), leaf.grad)
    (loss, nll, grad), (f_loss, f_nll, f_grad) = results[False], results[True]
    torch.testing.assert_close(f_loss, loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(f_nll, nll, rtol=1e-5, atol=1e-4)
    assert f_grad.dtype == dtype and not f_nll.requires_grad
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-3}
    torch.testing.assert_close(f_grad.float(), grad.float(), **tol)
    assert f_grad[target == 0].abs().max() == 0  # padding positions get no gradient


@pytest.mark.parametrize("autocast", [False, True])
def test_projected_loss_equals_projection_then_plain_loss(autocast, monkeypatch):
    """from_hidden (ProjectedLabelSmoothedCrossEntropy: projection, loss and their gradients in one) against
    F.linear then the plain loss, in float32 and under bf16 autocast (float32 hidden states and weight, as the
    model holds them), with padding and several chunks: the same loss and nll, the same gradients for the hidden
    states and the weight, in their own dtypes; and without gradients (validation) the same sums. Under bf16 both
    are compared with a float64 computation from the same bf16-rounded inputs, and the fused one must be as close
    to it as the plain one (bf16 rounds their matmul outputs at different points)."""
    monkeypatch.setattr(FusedLabelSmoothedCrossEntropy, "CHUNK_ELEMENTS", 7 * 50)
    torch.manual_seed(0)
    target = torch.randint(1, 50, (4, 9))
    target[1, 5:] = 0
    target[3, 2:] = 0
    hidden = torch.randn(4, 9, 16)
    weight = torch.randn(50, 16) * 16**-0.5
    if autocast:  # the values autocast multiplies are then the inputs themselves
        hidden, weight = hidden.bfloat16().float(), weight.bfloat16().float()
    results = {}
    for mode in ("plain", "fused", "float64"):
        dtype = torch.float64 if mode == "float64" else torch.float32
        h, w = hidden.to(dtype, copy=True).requires_grad_(True), weight.to(dtype, copy=True).requires_grad_(True)
        criterion = LabelSmoothedCrossEntropy(0.1, pad_id=0, fused=mode == "fused")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast and mode != "float64"):
            loss, nll = criterion.from_hidden(h, w, target)
            with torch.no_grad():
                no_grad = criterion.from_hidden(h, w, target)
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


def test_projected_loss_with_bf16_parameters_and_float16_autocast():
    """bf16 parameters without autocast (DeepSpeed's bf16 engine) take the fused path, with bf16 gradients as close
    to a float64 computation as the plain path's; float16 autocast (16-mixed) takes project-then-loss, the plain
    path itself."""
    torch.manual_seed(0)
    target = torch.randint(1, 50, (4, 9))
    target[1, 5:] = 0
    hidden, weight = torch.randn(4, 9, 16).bfloat16(), (torch.randn(50, 16) * 16**-0.5).bfloat16()
    results = {}
    for mode in ("plain", "fused", "float64"):
        dtype = torch.float64 if mode == "float64" else torch.bfloat16
        h, w = hidden.to(dtype, copy=True).requires_grad_(True), weight.to(dtype, copy=True).requires_grad_(True)
        loss, nll = LabelSmoothedCrossEntropy(0.1, pad_id=0, fused=mode == "fused").from_hidden(h, w, target)
        loss.backward()
        results[mode] = (loss.detach(), nll.detach(), h.grad, w.grad)
    assert results["fused"][2].dtype == results["fused"][3].dtype == torch.bfloat16
    for i in range(4):
        error = {m: (results[m][i].double() - results["float64"][i]).abs().max().item() for m in ("plain", "fused")}
        assert error["fused"] <= 1.5 * error["plain"] + 1e-6 * results["float64"][i].abs().max().item(), (i, error)

    h, w = hidden.float(), weight.float()
    criterion = LabelSmoothedCrossEntropy(0.1, pad_id=0, fused=True)
    with torch.autocast("cpu", dtype=torch.float16):
        fused = criterion.from_hidden(h, w, target)
        plain = criterion(F.linear(h, w), target)
    torch.testing.assert_close(fused, plain, rtol=0, atol=0)


def test_projected_loss_trains_the_model_as_the_plain_one():
    """The training step's losses and every parameter's gradient (the tied embedding gets the projection's and
    the lookups' gradients) are the same through the fused path (TranslationModule._losses: features, then
    from_hidden with the output weight) as through logits = model(src, tgt_in) and the plain loss."""
    from modules.lightning import TranslationModule

    model = {"vocab_size": 40, "n_layers": 2, "d_model": 16, "d_ff": 32, "n_heads": 2, "dropout": 0.0}
    optim = {"betas": [0.9, 0.98], "eps": 1e-9, "warmup_steps": 3, "label_smoothing": 0.1, "fused_loss": True}
    torch.manual_seed(0)
    module = TranslationModule(model=model, optim=optim, n_samples=0)
    batch = {
        "src": torch.randint(1, 40, (3, 7)),
        "tgt_in": torch.randint(1, 40, (3, 6)),
        "tgt_out": torch.randint(1, 40, (3, 6)),
    }
    batch["tgt_out"][2, 3:] = 0
    fused_loss, fused_nll, _ = module._losses(batch)
    fused_loss.backward()
    fused_grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    module.zero_grad()
    plain = LabelSmoothedCrossEntropy(0.1, pad_id=0)
    loss, nll = plain(module.model(batch["src"], batch["tgt_in"]), batch["tgt_out"])
    loss.backward()
    torch.testing.assert_close(fused_loss, loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_nll, nll, rtol=1e-5, atol=1e-5)
    for name, p in module.named_parameters():
        torch.testing.assert_close(fused_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_adam_makes_the_same_updates_as_the_plain_one():
    """optim.fused_adam (torch's fused kernel) against the for-loop Adam of section 5.3, through the module's own
    configure_optimizers and Eq. 3 schedule: five updates with the same gradients give the same parameters."""
    from modules.lightning import TranslationModule

    model = {"vocab_size": 40, "n_layers": 1, "d_model": 16, "d_ff": 32, "n_heads": 2}
    optim = {"betas": [0.9, 0.98], "eps": 1e-9, "warmup_steps": 3, "label_smoothing": 0.1}
    params = {}
    for fused in (False, True):
        torch.manual_seed(0)
        module = TranslationModule(model=model, optim={**optim, "fused_adam": fused}, n_samples=0)
        config = module.configure_optimizers()
        optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
        assert bool(optimizer.defaults["fused"]) == fused
        generator = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in module.parameters():
                p.grad = torch.randn(p.shape, generator=generator)
            optimizer.step()
            scheduler.step()
        params[fused] = [p.detach().clone() for p in module.parameters()]
    for plain, fused in zip(params[False], params[True], strict=True):
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
