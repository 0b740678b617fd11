"""The learning-rate schedule of section 5.3, Eq. 3."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def inverse_sqrt_lr(step: int, d_model: int, warmup_steps: int, scale: float = 1.0) -> float:
    """lrate = d_model^-0.5 · min(step^-0.5, step · warmup_steps^-1.5)  (Eq. 3), times an optional scale.

    "This corresponds to increasing the learning rate linearly for the first warmup_steps training steps, and
    decreasing it thereafter proportionally to the inverse square root of the step number." Steps count from 1.
    """
    step = max(step, 1)
    return scale * d_model**-0.5 * min(step**-0.5, step * warmup_steps**-1.5)


def inverse_sqrt_scheduler(optimizer: Optimizer, d_model: int, warmup_steps: int, scale: float = 1.0) -> LambdaLR:
    """A per-step scheduler applying Eq. 3. The optimizer's own lr must be 1.0: the lambda *is* the rate.

    LambdaLR evaluates the lambda at 0 before the first update and at k after k updates, so the k-th update
    (counting from 1) uses lambda(k - 1) = Eq. 3 at step k.
    """
    return LambdaLR(optimizer, lambda done: inverse_sqrt_lr(done + 1, d_model, warmup_steps, scale))
