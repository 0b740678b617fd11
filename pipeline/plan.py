"""`aiayn plan`: what a training run will cost before it starts: FLOPs, batch layout, memory per GPU, time.

Everything is arithmetic on the composed config: the model (conf/model/), the batch (data.max_tokens,
train.tokens_per_update, trainer.accumulate_grad_batches, trainer.precision), the machines (conf/cluster/: nodes,
gpus per node, gpu type, MFU, hours) and the planner's own assumptions (`plan.*` in conf/config.yaml). Only the
parameter count builds the model (on the meta device, pipeline/params.py). `plan.json=true` prints the same
numbers as one JSON object instead of the table.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from omegaconf import DictConfig, OmegaConf

from modules.config import TransformerConfig
from modules.kernels import CUDA_CHUNKING, select_kernels
from pipeline.costs import (
    ACCELERATORS,
    GB,
    batch_layout,
    device_memory_bytes,
    step_seconds,
    training_flops_per_target_token,
)
from pipeline.params import count_parameters
from pipeline.validate import precision_error


class PlanConfigError(ValueError):
    """A planner setting that cannot be used (an unknown cluster.gpu, an MFU outside (0, 1], ...)."""


# -- memory -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StateBytes:
    weights: int  # bytes per parameter
    grads: int
    optimizer: int  # Adam: K in the ZeRO paper


# Rajbhandari et al. 2019, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models", section 3.1:
# mixed-precision Adam holds fp16 parameters (2 bytes) and gradients (2), and an fp32 copy of the parameters,
# momentum and variance (K = 12): 16 bytes per parameter. Lightning's plain bf16-mixed (autocast) stores fp32
# weights (4) and gradients (4) and fp32 moments (8) instead: the same 16 bytes, split differently.
MIXED_PRECISION_BYTES = StateBytes(weights=2, grads=2, optimizer=12)
# 32-true: fp32 parameters (4) and gradients (4), Adam's two fp32 moments (8), no master copy.
FP32_BYTES = StateBytes(weights=4, grads=4, optimizer=8)


def state_bytes_for(precision: str) -> StateBytes:
    """Bytes per parameter for Lightning's trainer.precision: '*-mixed' or '32-true'/'32'."""
    precision = str(precision)
    if precision.endswith("-mixed"):
        return MIXED_PRECISION_BYTES
    if precision in ("32", "32-true"):
        return FP32_BYTES
    raise PlanConfigError(f"trainer.precision={precision!r}: the planner knows *-mixed and 32-true")


@dataclass(frozen=True)
class ModelStates:
    weights: float  # bytes per GPU
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer


def model_state_bytes(params: float, world_size: int, stage: int, sizes: StateBytes) -> ModelStates:
    """Model states per GPU under ZeRO stage 0-3 (ZeRO paper, section 5 and Figure 1; Psi = params, N_d = world).

    stage 0 (plain data parallelism): (2 + 2 + K) Psi; 1 (P_os): optimizer states split over the N_d ranks,
    2 + 2 + K/N_d; 2 (P_os+g): gradients too, 2 + (2 + K)/N_d; 3 (P_os+g+p): weights too, (2 + 2 + K)/N_d.
    """
    if stage not in (0, 1, 2, 3):
        raise PlanConfigError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage}")
    split = [1.0 if stage < level else 1.0 / world_size for level in (3, 2, 1)]  # weights, grads, optimizer
    return ModelStates(
        weights=params * sizes.weights * split[0],
        grads=params * sizes.grads * split[1],
        optimizer=params * sizes.optimizer * split[2],
    )


def activation_bytes(
    model: TransformerConfig, tokens: int, src_len: float, tgt_len: float, element: int, kernels: str = "plain"
) -> float:
    """Activations kept for backward by one micro-batch of `tokens` padded positions per side, in bytes.

    Per token and layer, Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
    Models", section 4.1) count for 16-bit activations and 1-byte dropout masks: 11*d + 5*h*L for an attention
    block (L keys), 2*d + 2*d_ff + 2*d_ff + d for the feed-forward block (= 3*d + 4*d_ff, 19*d at d_ff = 4d) and
    2*d per LayerNorm. Here:
      encoder layer = (11*d + 5*h*S) + (3*d + 4*d_ff) + 2 * 2*d                     per source token
      decoder layer = (11*d + 5*h*T) + (11*d + 5*h*S) + (3*d + 4*d_ff) + 3 * 2*d    per target token
    scaled by element/2 for the layers (4-byte activations under 32-true), plus the output projection and loss,
    which depend on the kernels that compute them (modules/kernels.py, `output_bytes`). Not counted: embeddings,
    the framework's workspace and fragmentation, and any activation checkpointing (none) or partitioning.
    """
    d, d_ff, h = model.d_model, model.d_ff, model.n_heads
    feed_forward = 3 * d + 4 * d_ff
    encoder_layer = (11 * d + 5 * h * src_len) + feed_forward + 2 * 2 * d
    decoder_layer = (11 * d + 5 * h * tgt_len) + (11 * d + 5 * h * src_len) + feed_forward + 3 * 2 * d
    layers = model.n_layers * (encoder_layer + decoder_layer) * element / 2
    return tokens * layers + output_bytes(kernels, model.vocab_size, model.d_model, tokens, element)


def output_bytes(kernels: str, vocab: int, d_model: int, tokens: int, element: int) -> float:
    """The pre-softmax projection and label-smoothed loss of `tokens` target tokens, at their peak, in bytes:
      plain  vocab * (element + 4 + 4) per token: the logits, the float32 log-probabilities the loss keeps and
             their float32 gradient (modules/loss.py)
      cpu    vocab * element per token: all logits at once, overwritten by their gradient (modules/fused_loss.py)
      cuda   one block of CUDA_CHUNKING's logits in `element` and float32 bytes, whatever the batch
    plus, for the fused ones, the gradients they form in forward: d_model per token and vocab x d_model in float32.
    """
    if kernels == "plain":
        return tokens * vocab * (element + 4 + 4)
    if kernels == "cpu":
        logits = tokens * vocab * element
    else:
        logits = min(tokens * vocab, CUDA_CHUNKING.matmul_elements) * (element + 4)
    return logits + tokens * d_model * element + vocab * d_model * 4


# -- cost -------------------------------------------------------------------------------------------------------
def paper_training_flops(hours: float, gpus: int, capacity_flops: float) -> float:
    """Section 6.1's estimate of training cost (Table 2's "Training Cost (FLOPs)").

    "We estimate the number of floating point operations used to train a model by multiplying the training time,
    the number of GPUs used, and an estimate of the sustained single-precision floating-point capacity of each
    GPU." Base: 12 h x 8 P100 x 9.5 TFLOPS = 3.3e18; big: 3.5 days x 8 x 9.5 TFLOPS = 2.3e19.
    """
    return hours * 3600 * gpus * capacity_flops


# -- the whole plan ---------------------------------------------------------------------------------------------
def _positive(value, key: str) -> float:
    if value is None or value <= 0:
        raise PlanConfigError(f"{key} must be a positive number, got {value!r}")
    return value


def make_plan(cfg: DictConfig) -> dict:
    """Every number the plan prints, as one JSON-ready dict (units in the key names or noted beside them)."""
    cluster, plan = cfg.cluster, cfg.plan
    if cluster.gpu not in ACCELERATORS:
        raise PlanConfigError(f"cluster.gpu={cluster.gpu!r} is not one of {sorted(ACCELERATORS)}")
    accelerator = ACCELERATORS[cluster.gpu]
    mfu = accelerator.mfu if cluster.mfu is None else _positive(cluster.mfu, "cluster.mfu")
    if mfu > 1:
        raise PlanConfigError(f"cluster.mfu is a fraction of peak (0, 1], got {mfu}")
    src_len, tgt_len = _positive(plan.src_len, "plan.src_len"), _positive(plan.tgt_len, "plan.tgt_len")
    world_size = int(_positive(cluster.nodes, "cluster.nodes")) * int(_positive(cluster.gpus, "cluster.gpus"))

    model = TransformerConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    counts = count_parameters(cfg)
    flops = training_flops_per_target_token(model, counts["encoder"], counts["decoder"], src_len, tgt_len)

    batch = batch_layout(
        max_tokens=int(cfg.data.max_tokens),
        world_size=world_size,
        tokens_per_update=OmegaConf.select(cfg, "train.tokens_per_update", default=None),  # absent on older trees
        accumulate=int(OmegaConf.select(cfg, "trainer.accumulate_grad_batches", default=1) or 1),
    )

    precision = str(cfg.trainer.precision)
    refused = precision_error(precision, cluster.gpu)  # bf16 on a P100/V100: refused, not planned as if it ran
    if refused is not None:
        raise PlanConfigError(str(refused))
    sizes = state_bytes_for(precision)
    # The kernels training uses on this device (device.kernels, modules/kernels.py): they size the loss's memory.
    kernels = select_kernels(str(cfg.device.kernels), "cpu" if cluster.gpu == "cpu" else "cuda").name
    element = 4 if sizes is FP32_BYTES else 2
    activations = activation_bytes(model, batch.max_tokens, src_len, tgt_len, element, kernels)
    memory = device_memory_bytes(accelerator)
    zero = {}
    for stage in range(4):
        states = model_state_bytes(counts["params"], world_size, stage, sizes)
        total = states.total + activations
        zero[str(stage)] = {**asdict(states), "activations": activations, "total": total, "fits": total <= memory}

    flops_per_update = flops.total * batch.tokens_per_update
    step = step_seconds(flops_per_update, world_size, accelerator.peak_flops, mfu)
    max_steps = int(cfg.trainer.max_steps)
    wall = step * max_steps
    total_flops = flops_per_update * max_steps
    hours = cluster.hours if cluster.hours is not None else wall / 3600
    paper_flops = paper_training_flops(hours, world_size, accelerator.peak_flops)

    return {
        "model": {
            "n_layers": model.n_layers,
            "d_model": model.d_model,
            "d_ff": model.d_ff,
            "n_heads": model.n_heads,
            "vocab_size": model.vocab_size,
            **counts,
            "non_embedding": counts["encoder"] + counts["decoder"],
        },
        "flops_per_target_token": {
            "src_len": src_len,
            "tgt_len": tgt_len,
            **asdict(flops),
            "total": flops.total,
        },
        "batch": {
            "nodes": int(cluster.nodes),
            "gpus_per_node": int(cluster.gpus),
            **asdict(batch),
            "tokens_per_update": batch.tokens_per_update,
        },
        "memory": {
            "precision": precision,
            "kernels": kernels,
            "bytes_per_param": asdict(sizes),
            "device_bytes": memory,
            "zero": zero,
            "configured_stage": _configured_zero_stage(cfg),
        },
        "time": {
            "gpu": cluster.gpu,
            "peak_flops": accelerator.peak_flops,
            "dtype": accelerator.dtype,
            "mfu": mfu,
            "mfu_from": f"{cluster.gpu}'s default" if cluster.mfu is None else "cluster.mfu",
            "flops_per_update": flops_per_update,
            "step_seconds": step,
            "max_steps": max_steps,
            "wall_seconds": wall,
            "gpu_hours": wall / 3600 * world_size,
            "total_flops": total_flops,
        },
        "paper_cost": {
            "hours": hours,
            "hours_from": "cluster.hours" if cluster.hours is not None else "estimated wall time",
            "gpus": world_size,
            "capacity_flops": accelerator.peak_flops,
            "flops": paper_flops,
            "implied_mfu": total_flops / paper_flops if cluster.hours is not None else None,
        },
    }


def _configured_zero_stage(cfg: DictConfig) -> int | None:
    """The ZeRO stage this config trains with (conf/strategy/deepspeed.yaml), 0 for DDP, None if unknown."""
    name = OmegaConf.select(cfg, "strategy.name", default=None)
    if name == "deepspeed":
        return int(OmegaConf.select(cfg, "strategy.stage", default=0))
    return 0 if name == "ddp" else None


# -- output -----------------------------------------------------------------------------------------------------
def _sci(x: float, digits: int = 3) -> str:
    """3.3e18 rather than 3.3e+18."""
    mantissa, exponent = f"{x:.{digits - 1}e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if seconds >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds * 1000:.3g} ms"


def format_plan(plan: dict) -> str:
    """The plan as an aligned, sectioned table."""
    m, f, b, mem, t, p = (plan[k] for k in ("model", "flops_per_target_token", "batch", "memory", "time", "paper_cost"))
    rows: list[tuple[str, str, str]] = []  # (label, value, note); an empty value makes a section heading

    def section(title: str) -> None:
        rows.append((title, "", ""))

    def row(label: str, value: str, note: str = "") -> None:
        rows.append(("  " + label, value, note))

    shape = f"N={m['n_layers']} d_model={m['d_model']} d_ff={m['d_ff']} h={m['n_heads']} vocab={m['vocab_size']}"
    section(f"model: {shape}")
    row("parameters", f"{m['params']:,}", f"embedding {m['embedding']:,}")
    row("non-embedding", f"{m['non_embedding']:,}", f"encoder {m['encoder']:,} + decoder {m['decoder']:,}")
    section(f"training FLOPs per target token (mean lengths: source {f['src_len']:g}, target {f['tgt_len']:g})")
    row("6 x non-embedding params", _sci(f["params"]), "encoder x source tokens per target token")
    row("attention QK^T, AV", _sci(f["attention"]), "3 x 2*2*d_model*L per layer, L = source/target length")
    row("output projection", _sci(f["output"]), "6 x d_model x vocab")
    row("total", _sci(f["total"]))
    section("batch")
    row("world size", f"{b['world_size']}", f"{b['nodes']} node(s) x {b['gpus_per_node']} GPU(s)")
    row("max tokens per device", f"{b['max_tokens']:,}", "data.max_tokens, one micro-batch")
    if b["requested"] is None:
        row("accumulation", f"{b['accumulation']}", "trainer.accumulate_grad_batches (train.tokens_per_update unset)")
    else:
        row("tokens per update asked", f"{b['requested']:,}", "train.tokens_per_update")
        row("accumulation", f"{b['accumulation']}", "round(asked / (max_tokens x world)), at least 1")
    row("tokens per update", f"{b['tokens_per_update']:,}", "max_tokens x world x accumulation")
    device = f"{mem['device_bytes'] / GB:.0f} GB per device"
    what = f"{mem['precision']}, {mem['kernels']} kernels, {device}"
    section(f"memory per GPU, GB ({what}): weights + grads + optimizer + activations")
    for stage, z in mem["zero"].items():
        parts = " + ".join(f"{z[k] / GB:.2f}" for k in ("weights", "grads", "optimizer", "activations"))
        mark = "  <- configured" if mem["configured_stage"] == int(stage) else ""
        row(f"ZeRO-{stage}", f"{z['total'] / GB:.2f}", f"= {parts}{'' if z['fits'] else '  DOES NOT FIT'}{mark}")
    peak = f"{t['peak_flops'] / 1e12:g} TFLOP/s {t['dtype']}"
    section(f"time: {t['gpu']}, {peak} peak x MFU {t['mfu']:g} ({t['mfu_from']})")
    row("FLOPs per update", _sci(t["flops_per_update"]))
    row("step time", _duration(t["step_seconds"]))
    row("steps", f"{t['max_steps']:,}", "trainer.max_steps")
    row("wall time", _duration(t["wall_seconds"]))
    row("GPU-hours", f"{t['gpu_hours']:.3g}")
    row("training FLOPs", _sci(t["total_flops"]))
    section("the paper's training cost (section 6.1, Table 2): time x GPUs x capacity")
    row("time", _duration(p["hours"] * 3600), p["hours_from"])
    row("FLOPs", _sci(p["flops"], 2), f"{p['gpus']} x {p['capacity_flops'] / 1e12:g} TFLOP/s")
    if p["implied_mfu"] is not None:
        row("implied MFU", f"{p['implied_mfu']:.2f}", "training FLOPs / the paper's FLOPs")

    label_width = max(len(label) for label, value, _ in rows if value)
    value_width = max(len(value) for _, value, _ in rows)
    lines = []
    for label, value, note in rows:
        if not value:
            lines.append(label)
        else:
            lines.append(f"{label:<{label_width}}  {value:>{value_width}}  {note}".rstrip())
    return "\n".join(lines)


def main(cfg: DictConfig) -> None:
    plan = make_plan(cfg)
    print(json.dumps(plan, indent=2) if cfg.plan.json else format_plan(plan))
