"""The inference layer: a trained model loaded from a checkpoint onto the device it decodes on, the search the
config asks for, and raw text translated with the training text's cleaning and BPE. `aiayn evaluate`, `translate`,
`attention` and the benchmarks start here; the decoding itself is modules/decoding.py, which validation uses too."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from data import TranslationDataModule
from data.clean import Cleaner
from data.prepare import resolve_data_config
from data.tokenizer import Tokenizer
from modules.decoding import Decoding, Search, translate_ids
from modules.kernels import select_kernels
from modules.lightning import TranslationModule
from modules.transformer import Transformer
from pipeline.checkpoints import load_checkpoint
from pipeline.config import output_dir
from pipeline.errors import RunFolderError
from pipeline.host import reuse_freed_memory
from pipeline.runs import DATASET_KEY, SPM_NAME, recorded_dataset


def load_module(path: Path) -> tuple[TranslationModule, dict[str, Any]]:
    """The TranslationModule of a checkpoint (file, averaged.ckpt or DeepSpeed folder) in eval mode, and the
    checkpoint's other entries (global_step, hyper_parameters, averaged_from, ...)."""
    checkpoint = load_checkpoint(path)
    if "hyper_parameters" not in checkpoint:
        raise RunFolderError(f"{path} has no hyper_parameters: the model cannot be rebuilt from it")
    module = TranslationModule(**checkpoint["hyper_parameters"])
    module.load_state_dict(checkpoint.pop("state_dict"))
    return module.eval(), checkpoint


def load_model(path: Path) -> tuple[Transformer, dict[str, Any]]:
    """The Transformer of a checkpoint in eval mode, and the checkpoint's other entries (load_module)."""
    module, checkpoint = load_module(path)
    return module.model, checkpoint


def make_search(cfg: DictConfig, bos_id: int, eos_id: int, section: str = "evaluate") -> tuple[Search, dict[str, Any]]:
    """The search the <section>.beam / alpha / nbest / max_extra keys ask for (evaluate, translate), and its
    description for eval-<split>.json (modules/decoding.py's Decoding)."""
    try:
        decoding = Decoding(int(cfg.beam), float(cfg.alpha), int(cfg.nbest), int(cfg.max_extra))
    except ValueError as error:  # "<field>=<value>: ..." names the key within the section
        raise RunFolderError(f"{section}.{error}") from None
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


def load_for_inference(
    cfg: DictConfig, checkpoint_path: Path, command: str, run_dir: Path | None = None
) -> tuple[Transformer, dict, Any]:
    """The checkpoint's model (eval mode), the checkpoint, and the set-up data module of cfg.data, whose BPE model
    reads and writes the model's token ids and whose prepared splits `aiayn evaluate` translates. A run folder that
    recorded its BPE model (pipeline/runs.py) must have been trained with the one the data module has."""
    datamodule = TranslationDataModule(cfg.data, output_dir(cfg), seed=cfg.seed)
    datamodule.setup()  # reads the prepared folder: a DatasetNotPreparedError says to run `aiayn prepare`
    recorded = recorded_dataset(run_dir)
    if recorded is not None and recorded.get("fingerprint") != datamodule.manifest.get("fingerprint"):
        raise RunFolderError(
            f"run.dir={run_dir} was trained on dataset {recorded.get('fingerprint')} ({recorded.get('dataset_dir')}), "
            f"not on {datamodule.manifest.get('fingerprint')} ({datamodule.dataset_dir}): evaluate with the data the "
            "run was trained on (drop the data overrides)"
        )
    model, checkpoint = load_model(checkpoint_path)
    check_vocabulary(model, datamodule.tokenizer, checkpoint_path, command)
    check_bpe_model(checkpoint, datamodule.tokenizer, checkpoint_path, datamodule.manifest.get("fingerprint"))
    return model, checkpoint, datamodule


def load_tokenizer(cfg: DictConfig, run_dir: Path | None) -> Tokenizer:
    """The BPE model a run's model reads and writes: the run folder's copy (pipeline/runs.py), so that a run
    translates without its dataset or corpora; for a run without one, the prepared dataset's of cfg.data."""
    if run_dir is not None and (run_dir / SPM_NAME).is_file():
        return Tokenizer(run_dir / SPM_NAME)
    datamodule = TranslationDataModule(cfg.data, output_dir(cfg), seed=cfg.seed)
    datamodule.setup()
    return datamodule.tokenizer


def check_bpe_model(
    checkpoint: dict[str, Any], tokenizer: Tokenizer, checkpoint_path: Path, fingerprint: str | None = None
) -> None:
    """A checkpoint that records the data and BPE model it was trained with (pipeline/train.py RecordDataset) only
    meets those: another BPE model of the same size would decode every id to another piece, silently. With a
    prepared dataset's fingerprint, the datasets are compared (the same corpus and settings give the same pieces);
    else the BPE model files."""
    recorded = checkpoint.get(DATASET_KEY)
    if recorded is None:
        return
    if fingerprint is not None:
        if recorded.get("fingerprint") != fingerprint:
            raise RunFolderError(
                f"{checkpoint_path} was trained on dataset {recorded.get('fingerprint')}, not on "
                f"{fingerprint} ({tokenizer.model_path.parent}): evaluate with the data the run was trained on"
            )
        return
    if recorded.get("spm_sha256") != tokenizer.sha256:
        raise RunFolderError(
            f"{checkpoint_path} was trained with the BPE model sha256 {recorded.get('spm_sha256')} (dataset "
            f"{recorded.get('fingerprint')}), not {tokenizer.model_path} ({tokenizer.sha256}): use the run folder "
            "it belongs to (run.dir=...)"
        )


def check_vocabulary(model: Transformer, tokenizer: Tokenizer, checkpoint_path: Path, command: str) -> None:
    if model.cfg.vocab_size != tokenizer.vocab_size:
        raise RunFolderError(
            f"{checkpoint_path} has model.vocab_size={model.cfg.vocab_size}, the BPE model {tokenizer.model_path} "
            f"has {tokenizer.vocab_size}: run `aiayn {command}` with the run's folder (run.dir=...), whose config "
            "and BPE model it was trained with"
        )


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
    nbest: int = 1  # hypotheses per line (the search's nbest)

    def __call__(
        self, lines: list[str], progress: Callable[[int], None] | None = None
    ) -> list[list[tuple[float, str]]]:
        """Each line's n-best (score, translation) list, in input order. An empty line (nothing left once cleaned)
        is not decoded: its list is nbest empty translations scored 0.0 (log-probability 0: the one translation of
        nothing), so that every line gives nbest entries. progress: called with each decoded batch's size."""
        texts = self.cleaner.texts(lines)
        todo = [i for i, text in enumerate(texts) if text]
        sources = self.tokenizer.encode([texts[i] for i in todo])
        results: list[list[tuple[float, str]]] = [[(0.0, "")] * self.nbest for _ in lines]
        nbests = translate_ids(
            self.model,
            sources,
            self.search,
            self.tokenizer.pad_id,
            self.tokenizer.eos_id,
            self.max_tokens,
            self.device,
            self.precision,
            progress,
        )
        for i, nbest in zip(todo, nbests, strict=True):
            decoded = self.tokenizer.decode([hyp.tokens for hyp in nbest])
            results[i] = [(hyp.score, text.replace("\n", " ")) for hyp, text in zip(nbest, decoded, strict=True)]
        return results


def load_translator(cfg: DictConfig, checkpoint_path: Path, run_dir: Path | None = None) -> Translator:
    """The translate.* settings' Translator for the model of checkpoint_path, with the run's BPE model."""
    model, checkpoint = load_model(checkpoint_path)
    tokenizer = load_tokenizer(cfg, run_dir)
    check_vocabulary(model, tokenizer, checkpoint_path, "translate")
    check_bpe_model(checkpoint, tokenizer, checkpoint_path)
    return translator_for(cfg, model, tokenizer, resolve_data_config(cfg.data)["clean"])


def translator_for(cfg: DictConfig, model: Transformer, tokenizer: Tokenizer, clean: dict[str, Any]) -> Translator:
    """A Translator of `model` on this machine's device, decoding as the translate.* keys ask."""
    device = place_for_inference(model, cfg.device.kernels)
    return Translator(
        model=model,
        tokenizer=tokenizer,
        cleaner=Cleaner(clean, filters=False),
        search=make_search(cfg.translate, tokenizer.bos_id, tokenizer.eos_id, section="translate")[0],
        max_tokens=int(cfg.translate.max_tokens),
        precision=cfg.translate.precision,
        device=device,
        nbest=int(cfg.translate.nbest),
    )
