"""Label smoothing (section 5.4) and the learning-rate schedule (Eq. 3) against hand-computed values."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from modules.loss import LabelSmoothedCrossEntropy
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
