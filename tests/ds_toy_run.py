"""A 2-process DeepSpeed run on CPU for tests/test_deepspeed_cpu.py: train, checkpoint, resume, validate.

Run by the test as 2 forked ranks (tests/forked.py, torchrun's variables without a new interpreter); by hand as
``torchrun --standalone --nproc_per_node=2 tests/ds_toy_run.py --stages 1 2 3 --out DIR``. Each
rank writes ``DIR/rank<R>.pt`` with what the test compares:

1. fit A: 2 epochs (8 optimizer steps each) from seed 0, a DeepSpeed checkpoint after each epoch in DIR/ckpt.
2. fit B: a fresh model whose weights are first scrambled, resumed from A's epoch-0 checkpoint, 2 epochs (so
   8 more steps) with checkpoints in DIR/ckpt_resume. A faithful resume repeats A's second epoch exactly.
3. validate: an inference engine loads A's final checkpoint and reports the validation loss.

The toy problem (a small MLP regressing a fixed nonlinear target) is defined here, so the test can recompute
losses from the consolidated weights without DeepSpeed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

N_SAMPLES = 256
N_FEATURES = 16
BATCH_SIZE = 16  # per rank: 2 ranks x 16 = 32 samples per optimizer step, 8 steps per epoch
STEPS_PER_EPOCH = N_SAMPLES // (2 * BATCH_SIZE)
EPOCHS = 2


def toy_dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(N_SAMPLES, N_FEATURES, generator=g)
    w = torch.randn(N_FEATURES, 1, generator=g)
    y = torch.tanh(x @ w) + 0.5 * x[:, :1]
    return TensorDataset(x, y)


def toy_net() -> nn.Module:
    return nn.Sequential(nn.Linear(N_FEATURES, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))


def mse(net: nn.Module, dataset: TensorDataset) -> float:
    """Full-dataset MSE; inputs and targets cast to the net's dtype, as Lightning's bf16 plugin does."""
    x, y = (t.to(next(net.parameters()).dtype) for t in dataset.tensors)
    with torch.no_grad():
        return F.mse_loss(net(x).float(), y.float()).item()


def main(argv: list[str] | None = None) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    parser = argparse.ArgumentParser()
    parser.add_argument("--stages", type=int, nargs="+", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--keep-process-group", action="store_true", help="reproduce the ZeRO-3 abort at exit")
    parser.add_argument("--overrides", nargs="*", default=None, help="config of the real-model checks")
    args = parser.parse_args(argv)
    for stage in args.stages:
        run_stage(stage, args.out / f"zero{stage}")
    if args.overrides is not None:
        for strategy, accumulation in (("ddp", 1), ("deepspeed", 2)):
            normalization_check(strategy, accumulation, args.overrides, args.out / f"normalization-{strategy}")
        # Last: pipeline.train.main tears the process group down when it returns, as `aiayn train` does.
        translation_check(args.overrides, args.out / "zero3-translation")
    if not args.keep_process_group and torch.distributed.is_initialized():
        # Without this, ZeRO-3 aborts at interpreter exit: see the note in pipeline/strategies.py.
        torch.distributed.destroy_process_group()
    print(f"rank {os.environ['RANK']} finished", flush=True)


def normalization_check(strategy: str, accumulation: int, overrides: list[str], out: Path) -> None:
    """One optimizer update of the real TranslationModule on 2 ranks; saves its gradient and the reference.

    The reference is computed on each rank without any distribution: the summed loss of ALL micro-batches of
    the update (every rank's, rebuilt from the epoch plan) divided by their target tokens, backpropagated
    through a copy of the initial model.
    """
    import copy

    import deepspeed
    import lightning as L
    from omegaconf import OmegaConf
    from one_update import one_update_trainer, reference_gradient

    from data import TranslationDataModule
    from modules.lightning import TranslationModule
    from pipeline.config import load_config
    from pipeline.strategies import build_strategy

    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(overrides)
    L.seed_everything(0)
    module = TranslationModule(
        model=OmegaConf.to_container(cfg.model, resolve=True), optim=OmegaConf.to_container(cfg.optim, resolve=True)
    )
    reference = copy.deepcopy(module.model)
    captured: dict[str, torch.Tensor] = {}

    class Capture(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            engine = getattr(trainer.strategy, "deepspeed_engine", None)
            if captured or (engine is not None and not engine.is_gradient_accumulation_boundary()):
                return
            for name, p in pl_module.model.named_parameters():
                grad = deepspeed.utils.safe_get_full_grad(p) if engine is not None else p.grad
                captured[name] = grad.detach().float().clone()
            if engine is not None:
                captured["__engine_accumulation"] = torch.tensor(engine.gradient_accumulation_steps())

    strategy_cfg = {"name": strategy, "stage": 2} if strategy == "deepspeed" else {"name": "ddp"}
    trainer = one_update_trainer(2, accumulation, Capture(), strategy=build_strategy(strategy_cfg, "cpu"))
    datamodule = TranslationDataModule(cfg.data, cfg.paths.output_dir, seed=3, accumulation=accumulation)
    trainer.fit(module, datamodule=datamodule)

    expected, sizes = reference_gradient(reference, module.criterion, datamodule, 2, accumulation, seed=3)
    torch.save({"grads": captured, "expected": expected, "batch_sizes": sizes}, out / f"rank{os.environ['RANK']}.pt")


def translation_check(overrides: list[str], out: Path) -> None:
    """`aiayn train strategy=deepspeed strategy.stage=3 trainer.devices=2` (pipeline.train.main, as the command
    runs it) with translations at every validation, where the decoding runs outside the engine's forward:

    1. run A: 2 steps, a checkpoint at step 2, then a validation with greedy translations and attention maps
       (AttentionImages, to an offline W&B run in A's folder);
    2. run B: resumed from A's step-2 checkpoint to step 4, a validation with beam-2 translations (no W&B).

    Each rank saves out/rank<R>.pt: both runs' summaries (what main returns) and, per validation, the step and
    the (source, reference, hypothesis) samples this rank translated.
    """
    from modules.lightning import TranslationModule
    from pipeline.config import load_config
    from pipeline.train import main as train

    validations: list[dict] = []
    on_validation_epoch_end = TranslationModule.on_validation_epoch_end

    def recording(self: TranslationModule) -> None:  # this forked rank's class only: the test process keeps its own
        on_validation_epoch_end(self)
        if not self.trainer.sanity_checking:
            validations.append({"step": self.global_step, "samples": list(self.samples)})

    TranslationModule.on_validation_epoch_end = recording
    common = [
        *overrides,
        "strategy=deepspeed",
        "strategy.stage=3",
        "trainer.devices=2",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "checkpoint.every_n_train_steps=2",
        "run.n_samples=2",
        "run.val_bleu_sentences=4",
        "logger.wandb.enabled=false",
    ]
    # Run A leaves the process group up for run B: main tears it down at its end, and DeepSpeed keeps the old
    # world's groups in module globals (deepspeed.utils.groups) that a second world in this process would find
    # stale. (A real resume is a new process.) Run B tears it down as main does.
    destroy, environ = torch.distributed.destroy_process_group, dict(os.environ)
    torch.distributed.destroy_process_group = lambda *args, **kwargs: None
    os.environ.update(WANDB_MODE="offline", WANDB_CONSOLE="off")
    run_a = ["trainer.max_steps=2", "logger.wandb.enabled=true", "run.val_attention_maps=true", f"run.dir={out / 'a'}"]
    try:
        summary_a = train(load_config([*common, *run_a]))
    finally:
        torch.distributed.destroy_process_group = destroy
        os.environ.clear()
        os.environ.update(environ)
    checkpoint = out / "a" / "checkpoints" / "step0000002.ckpt"
    resume = [f"run.resume={checkpoint}", "run.val_beam=2", f"run.dir={out / 'b'}"]
    summary_b = train(load_config([*common, "trainer.max_steps=4", *resume]))
    torch.save(
        {"a": summary_a, "b": summary_b, "validations": validations, "checkpoint": str(checkpoint)},
        out / f"rank{os.environ['RANK']}.pt",
    )


def run_stage(stage: int, out: Path) -> None:
    """Fit A, fit B (resumed), validate, with ZeRO `stage`; this rank's results go to out/rank<R>.pt."""
    import deepspeed
    import lightning as L
    from deepspeed.utils import safe_get_full_fp32_param
    from lightning.pytorch.callbacks import ModelCheckpoint

    from pipeline.strategies import CPUDeepSpeedStrategy

    out.mkdir(parents=True, exist_ok=True)
    args = argparse.Namespace(stage=stage, out=out)

    class Toy(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = toy_net()
            self.losses: list[float] = []
            self.start_step = -1

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.mse_loss(self.net(x).float(), y.float())
            self.losses.append(loss.item())
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", F.mse_loss(self.net(x).float(), y.float()), sync_dist=True)

        def on_train_start(self) -> None:
            self.start_step = self.trainer.global_step

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.01)

    def trainer(ckpt_dir: Path | None, **strategy_kwargs) -> L.Trainer:
        return L.Trainer(
            accelerator="cpu",
            devices=2,
            strategy=CPUDeepSpeedStrategy(stage=args.stage, **strategy_kwargs),
            precision="bf16-mixed",
            max_epochs=EPOCHS,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=ckpt_dir is not None,
            callbacks=[ModelCheckpoint(dirpath=ckpt_dir, filename="{epoch}", save_top_k=-1)] if ckpt_dir else [],
        )

    def loader(shuffle: bool) -> DataLoader:
        # Lightning swaps in a DistributedSampler (seeded with PL_GLOBAL_SEED, reshuffled per epoch).
        return DataLoader(toy_dataset(), batch_size=BATCH_SIZE, shuffle=shuffle)

    def full_weights(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(fp32 master weights from the optimizer, the module's own bf16 weights), both unpartitioned."""
        params = dict(module.named_parameters())
        fp32 = {name: safe_get_full_fp32_param(p).detach().clone() for name, p in params.items()}
        with deepspeed.zero.GatheredParameters(list(params.values()), enabled=args.stage == 3):
            low = {name: p.detach().clone() for name, p in params.items()}
        return fp32, low

    rank = int(os.environ["RANK"])
    ckpt_a, ckpt_b = args.out / "ckpt", args.out / "ckpt_resume"

    L.seed_everything(0)
    model_a = Toy()
    init = {k: v.clone() for k, v in model_a.state_dict().items()}
    trainer_a = trainer(ckpt_a)
    trainer_a.fit(model_a, train_dataloaders=loader(shuffle=True))
    fp32_a, low_a = full_weights(model_a)

    L.seed_everything(0)
    model_b = Toy()
    with torch.no_grad():  # scrambled, so only a real restore can reproduce fit A's weights
        for p in model_b.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(99)))
    trainer_b = trainer(ckpt_b)
    trainer_b.fit(model_b, train_dataloaders=loader(shuffle=True), ckpt_path=str(ckpt_a / "epoch=0.ckpt"))
    fp32_b, _ = full_weights(model_b)

    final_ckpt, load_full_weights = ckpt_a / f"epoch={EPOCHS - 1}.ckpt", False
    if args.stage == 3:
        # An inference engine cannot load a sharded ZeRO-3 checkpoint: it has no optimizer to take the fp32
        # partitions, and DeepSpeed 0.19.8's load_checkpoint then fails (device-independent code). Lightning's
        # documented route: consolidate to one file, load it with load_full_weights=True.
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        if rank == 0:
            convert_zero_checkpoint_to_fp32_state_dict(final_ckpt, args.out / "final_fp32.ckpt")
        torch.distributed.barrier()
        final_ckpt, load_full_weights = args.out / "final_fp32.ckpt", True
    L.seed_everything(0)
    (val,) = trainer(None, load_full_weights=load_full_weights).validate(
        Toy(), dataloaders=loader(shuffle=False), ckpt_path=str(final_ckpt)
    )

    torch.save(
        {
            "init": init,
            "losses": model_a.losses,
            "global_step": trainer_a.global_step,
            "fp32": fp32_a,
            "low": low_a,
            "resume_start_step": model_b.start_step,
            "resume_losses": model_b.losses,
            "resume_global_step": trainer_b.global_step,
            "resume_fp32": fp32_b,
            "val_loss": float(val["val_loss"]),
        },
        args.out / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    main()
