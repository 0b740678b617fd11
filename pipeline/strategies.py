"""How training is spread over processes (conf/strategy/): one process, DDP, or DeepSpeed ZeRO 1-3 on GPUs or CPUs.

Parallelism stays out of the model: modules/ never imports anything from here.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, Strategy
from torch.nn import Module
from torch.optim import Optimizer

if TYPE_CHECKING:
    import deepspeed


def _import_muon_uncompiled() -> None:
    """Import DeepSpeed's Muon optimizer with its torch.compile decorators turned into no-ops.

    DeepSpeed imports it on every ZeRO or bf16 engine start (to check ``isinstance(optimizer, MuonWithAuxAdam)``),
    and its module applies ``torch.compile`` at import, which loads all of torch._dynamo and torch._inductor into
    every process: a start-up cost paid for an optimizer aiayn does not use (Adam, section 5.3).
    Imported here first with DeepSpeed's own no-op decorator, the module is the same, its functions run eagerly.
    """
    if "deepspeed.runtime.zero.muon.original_muon" in sys.modules:
        return
    from deepspeed.runtime import compiler

    compile_decorator = compiler.compile
    compiler.compile = lambda: compiler.dummy_decorator
    try:
        import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401
        import deepspeed.runtime.zero.muon.original_muon  # noqa: F401
    finally:
        compiler.compile = compile_decorator


def _freeze_gc() -> None:
    """Move every object alive now into the garbage collector's permanent generation (gc.freeze).

    DeepSpeed's bf16 optimizer runs a full ``gc.collect()`` four times per engine start (``see_memory_usage`` with
    ``force=True``, to report memory). With torch, Lightning and DeepSpeed loaded, each such collection walks
    millions of objects that live as long as the process and can never be collected. Frozen, those long-lived
    objects (modules, the model, the data) are skipped, and a collection only walks what was allocated since.
    """
    gc.freeze()


# whole_parameters' mark on ZeRO-3 parameters in use outside any module (DeepSpeed's own marks are module ids).
_WHOLE_PARAMETERS_USER = "aiayn.whole_parameters"


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` that also runs on CPU processes (ZeRO stages 0-3, gloo backend).

    Use it exactly like the parent: ``Trainer(accelerator="cpu", devices=2, strategy=CPUDeepSpeedStrategy(stage=3),
    precision="bf16-mixed")``. The processes need ``DS_ACCELERATOR=cpu`` so that DeepSpeed's own device layer
    agrees with Lightning's (checked in :meth:`setup_environment`). On any accelerator other than ``CPUAccelerator``
    every override below hands over to ``DeepSpeedStrategy`` unchanged, so on CUDA it behaves exactly like the parent.

    Why the parent refuses CPUs, and what is overridden (only on CPU):

    - ``setup_environment`` raises unless the accelerator is ``CUDAAccelerator``: skipped.
    - ``setup_distributed`` calls ``_validate_device_index_selection``, which wants device indices 0..n-1; CPU
      devices have index ``None``: skipped (ranks come from the cluster environment, as in DDP).
    - ``deepspeed.initialize`` is called with ``device_rank=root_device.index``, i.e. ``None`` on CPU, and the
      engine then fails on ``None >= 0``; the CPU path passes the local rank (DeepSpeed's CPU accelerator ignores it
      when placing tensors). Both call sites are overridden: ``_setup_model_and_optimizer`` (fit) and
      ``_initialize_deepspeed_inference`` (``validate``/``test``/``predict``).

    Two costs that only hurt CPU processes are also avoided there: DeepSpeed's Muon optimizer is imported without
    its torch.compile decorators (:func:`_import_muon_uncompiled`), and the garbage collector is frozen before each
    engine start (:func:`_freeze_gc`).
    """

    def __init__(self, *args: Any, cpu_shm_comm: bool = False, **kwargs: Any) -> None:
        """cpu_shm_comm: on CPU, use DeepSpeed's shared-memory all-reduce op between the processes of a node.
        DeepSpeed JIT-compiles it (C++ against torch's headers) at the first start, which makes that start slow
        and depends on a working compiler. Off (the default), collectives go through torch.distributed's gloo
        backend: the same results, no compile step."""
        super().__init__(*args, **kwargs)
        self.cpu_shm_comm = cpu_shm_comm

    def _on_cpu(self) -> bool:
        return isinstance(self.accelerator, CPUAccelerator)

    @contextlib.contextmanager
    def whole_parameters(self, module: Module) -> Iterator[None]:
        """`module`'s parameters whole on every rank while the context is open, for code that runs outside the
        engine's forward (TranslationModule.full_parameters: validation translations, attention maps).

        Under ZeRO stage 3 a rank holds only its partition of each parameter, gathered just in time by hooks on
        each submodule's forward; outside the engine's forward, `Transformer.project` would read the shared
        embedding empty. So they are gathered on entry (deepspeed.zero.GatheredParameters, read-only) and
        partitioned again on exit: a collective, which every rank enters together. Gathering is not enough by
        itself: each submodule's forward ends by partitioning its parameters again unless another module still
        uses them (DeepSpeed counts those in a parameter's `ds_active_sub_modules`), so the gathered parameters
        are marked in use by one more user until the context ends (tests/test_deepspeed_cpu.py holds DeepSpeed to
        this). Stages 1-2 keep parameters whole: nothing to do.
        """
        if not self.zero_stage_3:
            yield
            return
        import deepspeed

        params = [p for p in module.parameters() if hasattr(p, "ds_id")]  # all, once the engine has started
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            for p in params:
                p.ds_active_sub_modules.add(_WHOLE_PARAMETERS_USER)
            try:
                yield
            finally:
                for p in params:  # before GatheredParameters partitions them, which refuses parameters in use
                    p.ds_active_sub_modules.discard(_WHOLE_PARAMETERS_USER)

    def setup_environment(self) -> None:
        if not self._on_cpu():
            super().setup_environment()
            return
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() != "cpu":
            raise RuntimeError(
                f"{type(self).__name__} on CPU needs DeepSpeed's CPU accelerator, but DeepSpeed selected"
                f" {get_accelerator().device_name()!r}: set DS_ACCELERATOR=cpu before DeepSpeed is imported."
            )
        _import_muon_uncompiled()
        if not self.cpu_shm_comm:
            import deepspeed.ops

            # deepspeed.comm builds the op only if this table (probed once per process) marks it compatible.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        # The parent's only addition to DDPStrategy.setup_environment is the CUDA-only check: skip it.
        # (DDPStrategy.setup_environment then calls setup_distributed, where DeepSpeed starts its comm backend.)
        super(DeepSpeedStrategy, self).setup_environment()

    def setup_distributed(self) -> None:
        if not self._on_cpu():
            super().setup_distributed()
            return
        # The parent's body minus `_validate_device_index_selection(self.parallel_devices)`: CPU devices carry no
        # index, so that check (meant to catch a CUDA device order that differs from the local ranks) cannot pass.
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(
        self, model: Module, optimizer: Optimizer | None, lr_scheduler: Any | None = None
    ) -> tuple[deepspeed.DeepSpeedEngine, Optimizer]:
        if not self._on_cpu():
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        import deepspeed

        _freeze_gc()
        # The parent's body with device_rank=self.local_rank instead of self.root_device.index (None on CPU).
        model_parameters = filter(lambda p: p.requires_grad, model.parameters())
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=self.config,
            model=model,
            model_parameters=model_parameters,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer

    def _initialize_deepspeed_inference(self, model: Module) -> None:
        if not self._on_cpu():
            super()._initialize_deepspeed_inference(model)
            return
        import deepspeed
        from lightning.pytorch.strategies.deepspeed import remove_module_hooks

        # The parent's body with device_rank=self.local_rank instead of self.root_device.index (None on CPU).
        assert isinstance(self.config, dict)
        inference_config: dict[str, Any] = {"train_micro_batch_size_per_gpu": 1}
        for key in ("fp16", "bf16"):
            if key in self.config:
                inference_config[key] = self.config[key]
        if self.zero_stage_3:
            inference_config["zero_allow_untested_optimizer"] = self.config["zero_allow_untested_optimizer"]
            inference_config["zero_optimization"] = self.config["zero_optimization"]
        remove_module_hooks(model)
        _freeze_gc()
        self.model, _, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=inference_config,
            model=model,
            optimizer=None,
            lr_scheduler=None,
            model_parameters=[],
            dist_init_required=False,
        )


STRATEGIES = ("auto", "ddp", "deepspeed")


def build_strategy(cfg: dict[str, Any], accelerator: str) -> str | Strategy:
    """conf/strategy/<name>.yaml -> what lightning.Trainer(strategy=...) takes."""
    cfg = dict(cfg)
    name = cfg.pop("name", None)
    if name == "auto":
        return "auto"
    if name == "ddp":
        return DDPStrategy(**cfg)
    if name == "deepspeed":
        if cfg.get("stage") not in (1, 2, 3):
            raise ValueError(f"strategy.stage={cfg.get('stage')!r}: ZeRO stage must be 1, 2 or 3")
        if accelerator == "cpu":
            # DeepSpeed picks its device layer when first imported: CPU here, or it would look for CUDA.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # train_micro_batch_size_per_gpu: DeepSpeed wants a *sample* count per micro-batch, which token-count
        # batches do not have (each holds a different number of pairs; DeepSpeed issue #1051). DeepSpeed uses it
        # only to report samples/s and to check train_batch_size = micro x accumulation x world, never to cut
        # batches, so it is set to 1 and the pipeline reports tokens/s itself (pipeline/callbacks.py).
        return CPUDeepSpeedStrategy(**cfg, logging_batch_size_per_gpu=1)
    raise ValueError(f"strategy.name={name!r}: use one of {STRATEGIES} (conf/strategy/)")
