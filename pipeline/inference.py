"""The inference layer: a trained model loaded from a checkpoint onto the device it decodes on, the search the
config asks for, and raw text translated with the training text's cleaning and BPE. `aiayn evaluate`, `translate`,
`attention` and the benchmarks start here; the decoding itself is modules/decoding.py, which validation uses too."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from data import TranslationDataModule
from data.clean import Cleaner
from modules.decoding import Decoding, Search, translate_ids
from modules.kernels import select_kernels
from modules.lightning import TranslationModule
from modules.transformer import Transformer
from pipeline.checkpoints import load_checkpoint
from pipeline.config import output_dir
from pipeline.errors import RunFolderError
from pipeline.host import reuse_freed_memory


def load_model(path: Path) -> tuple[Transformer, dict[str, Any]]:
    """The Transformer of a checkpoint (file, averaged.ckpt or DeepSpeed folder) in eval mode, and the checkpoint's
    other entries (global_step, hyper_parameters, averaged_from, ...)."""
    checkpoint = load_checkpoint(path)
    if "hyper_parameters" not in checkpoint:
        raise RunFolderError(f"{path} has no hyper_parameters: the model cannot be rebuilt from it")
    module = TranslationModule(**checkpoint["hyper_parameters"])
    module.load_state_dict(checkpoint.pop("state_dict"))
    return module.model.eval(), checkpoint


def make_search(cfg: DictConfig, bos_id: int, eos_id: int, section: str = "evaluate") -> tuple[Search, dict[str, Any]]:
    """The search the <section>.beam / alpha / nbest / max_extra keys ask for (evaluate, translate), and its
    description for eval-<split>.json (modules/decoding.py's Decoding)."""
    try:
        decoding = Decoding(int(cfg.beam), float(cfg.alpha), int(cfg.nbest), int(cfg.max_extra))
    except ValueError as error:
        message = str(error).replace("beam=", f"{section}.beam=")  # "nbest=5: ... beam=4" names both keys
        raise RunFolderError(message if message.startswith(f"{section}.") else f"{section}.{message}") from None
    return decoding.search(bos_id, eos_id), decoding.describe()


def place_for_inference(model: Transformer, kernels: str) -> torch.device:
    """Move an inference model to the GPU if there is one, else keep it on the CPU, with the device.kernels for it;
    returns the device."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        # Every beam step allocates and frees logits-sized blocks; kept by malloc instead of given back to the
        # kernel, they are not faulted in again.
        reuse_freed_memory()
    model.to(device).use_kernels(select_kernels(kernels, device))
    return device


def load_for_inference(cfg: DictConfig, checkpoint_path: Path, command: str) -> tuple[Transformer, dict, Any]:
    """The checkpoint's model (eval mode), the checkpoint, and the set-up data module of cfg.data, whose BPE model
    reads and writes the model's token ids: `aiayn evaluate`, `translate` and `attention` all start here."""
    datamodule = TranslationDataModule(cfg.data, output_dir(cfg), seed=cfg.seed)
    datamodule.setup()  # reads the prepared folder: a DatasetNotPreparedError says to run `aiayn prepare`
    model, checkpoint = load_model(checkpoint_path)
    if model.cfg.vocab_size != datamodule.tokenizer.vocab_size:
        raise RunFolderError(
            f"{checkpoint_path} has model.vocab_size={model.cfg.vocab_size}, the BPE model of "
            f"{datamodule.dataset_dir} has {datamodule.tokenizer.vocab_size}: run `aiayn {command}` with the "
            "overrides the run was trained with (see the run folder's config.yaml)"
        )
    return model, checkpoint, datamodule


def prepared_split(datamodule: Any, split: str) -> tuple[list[np.ndarray], list[str]]:
    """A set-up data module's split: its prepared source ids (without <eos>) and its raw reference lines, as read
    from the corpus files."""
    if split not in datamodule.splits:
        raise RunFolderError(
            f"evaluate.split={split}: {datamodule.dataset_dir} has only {sorted(datamodule.splits)}; "
            f"add data.splits.{split} and run `aiayn prepare` again"
        )
    pairs = datamodule.splits[split]
    references = [ref for _, ref in datamodule.raw_pairs(split, len(pairs))]
    if len(references) != len(pairs):
        raise RunFolderError(f"{split}: {len(pairs)} prepared pairs but {len(references)} reference lines")
    return [pairs[i][0] for i in range(len(pairs))], references


@dataclass
class Translator:
    """A model, its BPE model and the training text's cleaning, ready to translate lines of raw text."""

    model: Transformer
    tokenizer: Any  # data.Tokenizer
    cleaner: Cleaner
    search: Search  # make_search: each sentence's n-best list
    max_tokens: int
    precision: str
    device: torch.device

    def __call__(self, lines: list[str]) -> list[list[tuple[float, str]]]:
        """Each line's n-best (score, translation) list, in input order; an empty line gives [(nan, "")]."""
        texts = self.cleaner.texts(lines)
        todo = [i for i, text in enumerate(texts) if text]
        sources = self.tokenizer.encode([texts[i] for i in todo])
        results: list[list[tuple[float, str]]] = [[(float("nan"), "")] for _ in lines]
        nbests = translate_ids(
            self.model,
            sources,
            self.search,
            self.tokenizer.pad_id,
            self.tokenizer.eos_id,
            self.max_tokens,
            self.device,
            self.precision,
        )
        for i, nbest in zip(todo, nbests, strict=True):
            decoded = self.tokenizer.decode([hyp.tokens for hyp in nbest])
            results[i] = [(hyp.score, text.replace("\n", " ")) for hyp, text in zip(nbest, decoded, strict=True)]
        return results


def load_translator(cfg: DictConfig, checkpoint_path: Path) -> Translator:
    """The translate.* settings' Translator for the model of checkpoint_path."""
    model, _, datamodule = load_for_inference(cfg, checkpoint_path, "translate")
    tokenizer = datamodule.tokenizer
    device = place_for_inference(model, cfg.device.kernels)
    return Translator(
        model=model,
        tokenizer=tokenizer,
        cleaner=Cleaner(datamodule.cfg.get("clean"), filters=False),
        search=make_search(cfg.translate, tokenizer.bos_id, tokenizer.eos_id, section="translate")[0],
        max_tokens=int(cfg.translate.max_tokens),
        precision=cfg.translate.precision,
        device=device,
    )
