"""The training recipe of section 5 around the model: loss, optimizer, schedule, metrics, sample translations,
validation BLEU (section 6.1 reports BLEU of beam search on the test set; here greedy or a small beam, on a few
validation sentences, to watch it rise)."""

from __future__ import annotations

import contextlib
from typing import Any

import lightning as L
import sacrebleu
import torch
from torchmetrics import MeanMetric

from modules.config import TransformerConfig
from modules.decoding import Decoding, translate_ids
from modules.kernels import select_kernels
from modules.loss import LabelSmoothedCrossEntropy
from modules.schedule import inverse_sqrt_scheduler
from modules.transformer import Transformer


class TrainingDiverged(RuntimeError):
    """Training stopped: the loss or its gradient stayed non-finite (TranslationModule._skip_if_not_finite)."""


class TranslationModule(L.LightningModule):
    """Trains a Transformer on token batches (section 5).

    - Loss: label-smoothed cross-entropy with ε_ls (section 5.4), summed over target tokens and divided by the
      number of target tokens in the whole optimizer update (all ranks, all accumulated micro-batches), so every
      target token weighs the same whatever the batch's shape (see `loss_scale`).
    - Optimizer: Adam with β1 = 0.9, β2 = 0.98, ε = 1e-9 (section 5.3).
    - Learning rate: Eq. 3, warmup then inverse square root, updated every step.
    - Validation: token-weighted loss and perplexity; translations of the first `n_samples` validation
      sentences (printed, and logged as a table); sacreBLEU of translations of the first `bleu_sentences`
      (0: none) as `val/bleu`. Translations are greedy (`val_beam` 1) or beam search with beam `val_beam` and
      length penalty `val_alpha` (modules/beam.py).
    - Device: `kernels` and `compile` (config keys device.kernels, device.compile) are resolved for the device the
      trainer runs on when it sets the module up (`use_device`): the kernels of modules/kernels.py, and whether the
      encoder-decoder forward is compiled (torch.compile, dynamic shapes). "auto" picks by the device.
    Batches are dicts from data.collate_pairs: src, tgt_in, tgt_out (each (batch, len)) and token counts.
    """

    TRANSLATE_TOKENS = 4096  # padded source tokens decoded at once during validation

    def __init__(
        self,
        model: dict[str, Any],
        optim: dict[str, Any],
        n_samples: int = 3,
        bleu_sentences: int = 0,
        val_beam: int = 1,
        val_alpha: float = 0.6,
        kernels: str = "auto",
        compile: bool | str = False,
        max_skipped_updates: int | None = None,
    ) -> None:
        super().__init__()
        # How to compute and when to stop, not what is computed: chosen by whoever runs the model.
        self.save_hyperparameters(ignore=["kernels", "compile", "max_skipped_updates"])
        self.model_cfg = TransformerConfig.from_dict(dict(model))
        self.optim_cfg = dict(optim)
        if compile not in (True, False, "auto"):
            raise ValueError(f"device.compile={compile!r}: use auto, true or false")
        self.kernels_choice, self.compile_choice = kernels, compile
        self.model = Transformer(self.model_cfg, select_kernels(kernels, "cpu"))  # built on the CPU
        self.features = self.model.features  # (src, tgt_in) -> decoder output; compiled by use_device if asked
        self.criterion = LabelSmoothedCrossEntropy(self.optim_cfg["label_smoothing"], self.model_cfg.pad_id)
        self.max_skipped_updates = max_skipped_updates  # None: gradients are not checked
        self.skipped_in_a_row = 0
        self.n_samples = n_samples
        self.bleu_sentences = bleu_sentences
        try:
            Decoding(beam=val_beam, alpha=val_alpha)
        except ValueError as error:
            raise ValueError(f"run.val_{error}") from None
        self.val_beam, self.val_alpha = val_beam, val_alpha
        self.val_loss = MeanMetric()  # weighted by target tokens
        self.val_nll = MeanMetric()
        self.samples: list[tuple[str, str, str]] = []  # (source, reference, hypothesis) of the last validation
        self._grad_norm_logged_at: int | None = None  # the DeepSpeed engine's step whose norm was logged

    def setup(self, stage: str) -> None:
        self.use_device(self.trainer.strategy.root_device)

    def use_device(self, device: torch.device | str) -> None:
        """Choose the kernels and compilation for a model that runs on `device` (module docstring)."""
        device = torch.device(device)
        self.model.use_kernels(select_kernels(self.kernels_choice, device))
        compiled = self.compile_choice is True or (self.compile_choice == "auto" and device.type == "cuda")
        # dynamic: token batches change both lengths and the sentence count from one step to the next.
        self.features = torch.compile(self.model.features, dynamic=True) if compiled else self.model.features

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        return self.model(src, tgt_in)

    def batch_losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A batch's label-smoothed loss and negative log-likelihood, each summed over its real target tokens, and
        that token count (training and validation both start here)."""
        hidden = self.features(batch["src"], batch["tgt_in"])  # (batch, tgt_len, d_model)
        loss_sum, nll_sum = self.model.kernels.projected_loss(
            self.criterion, hidden, self.model.output_weight, batch["tgt_out"]
        )
        n_tokens = batch["tgt_out"].ne(self.model_cfg.pad_id).sum()
        return loss_sum, nll_sum, n_tokens

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss_sum, nll_sum, n_tokens = self.batch_losses(batch)
        # Logged as tensors: Lightning reads them back only every `log_every_n_steps`, so the step itself never
        # waits for the host.
        self.log("train/loss", loss_sum.detach() / n_tokens, prog_bar=True)
        self.log("train/ppl", torch.exp(nll_sum.detach() / n_tokens))
        self.log("train/lr", torch.tensor(self.lr_schedulers().get_last_lr()[0]))
        return loss_sum * self.loss_scale(batch, n_tokens)

    def loss_scale(self, batch: dict[str, Any], n_tokens: torch.Tensor) -> torch.Tensor | float:
        """What a micro-batch's summed loss is multiplied by, so that the update's gradient is
        Σ_(ranks, micro-batches) ∇ loss_sum / N, N = the target tokens of the whole update (fairseq's normalization):
        every token of the update weighs the same, however the update is split over ranks and micro-batches.

        The data loader tells each batch its update's N ("update_tgt_tokens", data/batching.py); the framework
        then divides: Lightning divides every micro-batch's loss by the accumulation A, DDP and DeepSpeed average
        gradients over the W ranks, and DeepSpeed's engine divides by its gradient_accumulation_steps once more
        (engine.backward, scale_wrt_gas). Multiplying by those divisors undoes them. Without update_tgt_tokens
        (a batch from plain collate_pairs) the loss is the batch's mean over its own tokens.
        """
        if "update_tgt_tokens" not in batch:
            return 1.0 / n_tokens
        trainer = self.trainer
        divisor = trainer.world_size * trainer.accumulate_grad_batches
        engine = getattr(trainer.strategy, "deepspeed_engine", None)
        if engine is not None:
            divisor *= engine.gradient_accumulation_steps()
        return divisor / float(batch["update_tgt_tokens"])

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:  # none under DeepSpeed: see on_train_batch_end
            return
        norm = torch.nn.utils.get_total_norm(grads)
        self.log("train/grad_norm", norm)
        if self.max_skipped_updates is not None:
            self._skip_if_not_finite(norm)

    def _skip_if_not_finite(self, norm: torch.Tensor) -> None:
        """An update whose gradient is not finite (the loss or its gradient overflowed) is skipped: every gradient
        is dropped, so Adam leaves those parameters and its moments as they are. Past max_skipped_updates such
        updates in a row, training has diverged and stops with TrainingDiverged. Reading the norm back is one wait
        for the device per update, the price of never applying a NaN (fairseq checks the same way)."""
        if bool(torch.isfinite(norm)):
            self.skipped_in_a_row = 0
            return
        self.skipped_in_a_row += 1
        for p in self.parameters():
            p.grad = None
        if self.skipped_in_a_row > self.max_skipped_updates:
            raise TrainingDiverged(
                f"training diverged at step {self.global_step}: the loss or gradient was not finite in "
                f"{self.skipped_in_a_row} updates in a row (train.max_skipped_updates={self.max_skipped_updates}); "
                "lower the learning rate (optim.lr_scale) or resume from an earlier checkpoint"
            )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # DeepSpeed (ZeRO 1, 2 and 3) reduces the gradients into its optimizer's own, partitioned buffers and leaves
        # every p.grad empty; its engine computes the update's global norm (all ranks, before clipping) in its step,
        # which has run by now: logged once per update, in the same row as the hook above would have.
        engine = getattr(self.trainer.strategy, "deepspeed_engine", None)
        if engine is None or engine.global_steps == self._grad_norm_logged_at:
            return
        self._grad_norm_logged_at = engine.global_steps
        norm = engine.get_global_grad_norm()
        if norm is not None:
            self.log("train/grad_norm", torch.as_tensor(norm, dtype=torch.float32))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss_sum, nll_sum, n_tokens = self.batch_losses(batch)
        self.val_loss.update(loss_sum / n_tokens, n_tokens)
        self.val_nll.update(nll_sum / n_tokens, n_tokens)

    def on_validation_epoch_end(self) -> None:
        loss, nll = self.val_loss.compute(), self.val_nll.compute()
        self.val_loss.reset()
        self.val_nll.reset()
        self.log("val/loss", loss, prog_bar=True, sync_dist=False)
        self.log("val/ppl", torch.exp(nll), prog_bar=True, sync_dist=False)
        if self.trainer.sanity_checking:
            return
        translations = self.translate_validation(max(self.n_samples, self.bleu_sentences))
        self.samples = translations[: self.n_samples]
        if self.bleu_sentences > 0 and translations:
            _, refs, hyps = zip(*translations[: self.bleu_sentences], strict=True)
            self.log("val/bleu", sacrebleu.corpus_bleu(list(hyps), [list(refs)]).score, sync_dist=False)
        if self.samples:
            search = "greedy" if self.val_beam == 1 else f"beam-{self.val_beam}"
            self.print(f"\nstep {self.global_step}: {search} translations of validation sentences")
            for src, ref, hyp in self.samples:
                self.print(f"  SRC {src}\n  REF {ref}\n  HYP {hyp}")
            for logger in self.loggers:  # W&B shows a table per validation; loggers without tables skip it
                if hasattr(logger, "log_table"):
                    logger.log_table(
                        key="val/samples",
                        columns=["src", "ref", "hyp", "step"],
                        data=[[*sample, self.global_step] for sample in self.samples],
                        step=self.global_step,
                    )

    def translate_validation(self, n: int) -> list[tuple[str, str, str]]:
        """(source, reference, hypothesis) of the first n validation sentences, in corpus order."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if n <= 0 or datamodule is None or not hasattr(datamodule, "valid_examples"):
            return []
        pairs = datamodule.valid_examples(n)
        with self.full_parameters():  # once for all the batches; every rank decodes the same sentences
            hyps = self.translate([src for src, _ in pairs], datamodule.tokenizer)
        return [(src, ref, hyp) for (src, ref), hyp in zip(pairs, hyps, strict=True)]

    def full_parameters(self) -> contextlib.AbstractContextManager:
        """The model's parameters whole, on every rank, for what runs outside the training engine's forward
        (validation translations, attention maps): the strategy's `whole_parameters(model)` where it has one (ZeRO-3
        partitions parameters: pipeline/strategies.py), else nothing to do. Every rank must enter it together."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        whole_parameters = getattr(strategy, "whole_parameters", None)
        return whole_parameters(self.model) if whole_parameters is not None else contextlib.nullcontext()

    @torch.no_grad()
    def translate(
        self, sentences: list[str], tokenizer: Any, beam: int | None = None, alpha: float | None = None
    ) -> list[str]:
        """Translate raw sentences with a data.Tokenizer through modules/decoding.py, as `aiayn evaluate` does: greedy
        search for beam 1, else beam search with length penalty alpha (defaults: val_beam, val_alpha)."""
        decoding = Decoding(
            beam=self.val_beam if beam is None else beam, alpha=self.val_alpha if alpha is None else alpha
        )
        was_training = self.model.training
        self.model.eval()
        search = decoding.search(tokenizer.bos_id, tokenizer.eos_id)
        ids = tokenizer.encode(sentences)
        best = translate_ids(
            self.model, ids, search, tokenizer.pad_id, tokenizer.eos_id, self.TRANSLATE_TOKENS, self.device
        )
        self.model.train(was_training)
        return tokenizer.decode([hypotheses[0].tokens for hypotheses in best])

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.optim_cfg
        # lr=1.0: the scheduler's lambda returns the actual rate of Eq. 3.
        optimizer = torch.optim.Adam(
            self.parameters(), lr=1.0, betas=tuple(cfg["betas"]), eps=cfg["eps"], fused=cfg.get("fused_adam") or None
        )
        scheduler = inverse_sqrt_scheduler(
            optimizer, self.model_cfg.d_model, cfg["warmup_steps"], cfg.get("lr_scale", 1.0)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
