"""Label smoothing (section 5.4) and the learning-rate schedule (Eq. 3) against hand-computed values."""

from __future__ import annotations

import csv
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger

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


def test_label_smoothing_is_fairseqs_form_with_epsilon_times_v_minus_1_over_v():
    """fairseq's label_smoothed_cross_entropy is (1 - ε - ε/(V-1))·nll + ε/(V-1)·Σ_v -log p_v: the target gets
    1 - ε, every other entry ε/(V-1). Ours (Szegedy et al.'s, section 5.4's reference) gives every entry ε/V and
    the target 1 - ε + ε/V: the same loss as fairseq's at ε_f = ε·(V-1)/V (0.099988 for ε = 0.1, V = 8000).
    Hand-computed on V = 4, both positions of a two-token target, one padded position that counts nothing."""
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.4, 0.1], [0.7, 0.1, 0.1, 0.1]])
    logits = p.log()[None]  # (batch 1, len 3, vocab 4)
    target = torch.tensor([[3, 2, 0]])  # the last position is padding (pad_id 0)
    loss, nll = LabelSmoothedCrossEntropy(epsilon=0.1, pad_id=0)(logits, target)

    def fairseq(eps: float, probs: list[float], y: int) -> float:
        V = len(probs)
        return (1 - eps - eps / (V - 1)) * -math.log(probs[y]) + eps / (V - 1) * sum(-math.log(q) for q in probs)

    expected = fairseq(0.1 * 3 / 4, [0.1, 0.2, 0.3, 0.4], 3) + fairseq(0.1 * 3 / 4, [0.25, 0.25, 0.4, 0.1], 2)
    # by hand: 0.9·(-ln 0.4) + 0.025·(-ln 0.0024) and 0.9·(-ln 0.4) + 0.025·(-ln 0.0025)
    assert math.isclose(expected, 0.9 * -math.log(0.4) * 2 + 0.025 * -(math.log(0.0024) + math.log(0.0025)))
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    assert math.isclose(loss.item(), 1.949917, abs_tol=1e-6)
    assert math.isclose(nll.item(), -2 * math.log(0.4), rel_tol=1e-6)
    # fairseq at the same ε puts a little less weight on the target: a different loss, by ε/V·(nll - mean)
    assert not math.isclose(
        loss.item(), fairseq(0.1, [0.1, 0.2, 0.3, 0.4], 3) + fairseq(0.1, [0.25, 0.25, 0.4, 0.1], 2)
    )


class _AppliedRates(L.Callback):
    """The learning rate each optimizer update is made with, read from the optimizer as it steps."""

    def __init__(self) -> None:
        self.rates: list[tuple[int, float]] = []  # (updates before this one, its rate)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # noqa: ANN001
        self.rates.append((trainer.global_step, optimizer.param_groups[0]["lr"]))


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trained_updates_follow_eq3_step_by_step(tmp_path, accumulation):
    """Through Lightning's Trainer, the k-th optimizer update (counting from 1) runs at
    lr(k) = peak · min(k / warmup, sqrt(warmup / k)), peak = d_model^-0.5 · warmup^-0.5: Eq. 3 written as fairseq's
    inverse_sqrt has it (which starts its first update at 0, one step behind). The rate moves once per update, not
    per accumulated micro-batch, across the warmup's end; the logged train/lr is the rate of its update."""
    from modules.lightning import TranslationModule

    d_model, warmup, updates = 16, 4, 10
    model = {"vocab_size": 30, "n_layers": 1, "d_model": d_model, "d_ff": 32, "n_heads": 2}
    optim = {"betas": [0.9, 0.98], "eps": 1e-9, "warmup_steps": warmup, "label_smoothing": 0.1}
    torch.manual_seed(0)
    module = TranslationModule(model=model, optim=optim, n_samples=0)
    batches = [
        {
            "src": torch.randint(3, 30, (2, 5)),
            "tgt_in": torch.randint(3, 30, (2, 4)),
            "tgt_out": torch.randint(3, 30, (2, 4)),
        }
        for _ in range(updates * accumulation)
    ]
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    rates = _AppliedRates()
    trainer = L.Trainer(
        max_steps=updates, accumulate_grad_batches=accumulation, callbacks=[rates], log_every_n_steps=1,
        logger=CSVLogger(tmp_path), enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", devices=1,
    )  # fmt: skip
    trainer.fit(module, loader)

    peak = d_model**-0.5 * warmup**-0.5
    expected = [peak * min(k / warmup, (warmup / k) ** 0.5) for k in range(1, updates + 1)]
    assert [step for step, _ in rates.rates] == list(range(updates))
    for (step, rate), want in zip(rates.rates, expected, strict=True):
        assert math.isclose(rate, want, rel_tol=1e-12), (step, rate, want)
    assert max(range(updates), key=lambda i: rates.rates[i][1]) == warmup - 1  # the peak is update `warmup`
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        logged = [float(row["train/lr"]) for row in csv.DictReader(f) if row.get("train/lr")]
    assert logged == pytest.approx(expected, rel=1e-6)
