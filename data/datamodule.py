"""The data side of training, as Lightning expects it: prepare once, then token-count batches on every rank.

Lightning calls prepare_data() on one process (per node), then setup() on every process; dataloaders are
created after that. Our batches are built in the main process by TokenBatchSampler (section 5.1), which
also splits them across DDP ranks itself, so configure the Trainer with
    use_distributed_sampler=False          Lightning must not wrap our batch sampler in a DistributedSampler
    reload_dataloaders_every_n_epochs=1    the number of batches differs slightly from epoch to epoch, and
                                           Lightning reads len(train_dataloader) only when it (re)creates it
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, Sampler

from data.batching import TokenBatchSampler
from data.collate import collate_pairs
from data.corpus import ParallelCorpus
from data.manifest import is_complete, read_manifest, verify_spm_model
from data.prepare import find_dataset_dir, prepare_dataset, resolve_data_config, split_sources
from data.shards import ShardedPairs
from data.tokenizer import Tokenizer


class TranslationDataModule(L.LightningDataModule):
    """A prepared parallel corpus (BPE + shards) served as padded token-count batches."""

    def __init__(
        self, data_cfg: DictConfig | dict, output_dir: str | os.PathLike, seed: int = 1, accumulation: int = 1
    ):
        super().__init__()
        self.cfg = resolve_data_config(data_cfg)
        self.output_dir, self.seed = Path(output_dir), seed
        self.accumulation = accumulation  # micro-batches per optimizer update (Trainer.accumulate_grad_batches)
        # Named by the input files' sha256 and the config: every rank finds the same folder by itself, once it is
        # prepared from the manifest's record of the files (data/prepare.py), without reading them.
        self.dataset_dir = find_dataset_dir(self.cfg, self.output_dir)
        self.tokenizer: Tokenizer | None = None
        self.manifest: dict[str, Any] | None = None
        self.splits: dict[str, ShardedPairs] = {}
        self._corpora: dict[str, ParallelCorpus] = {}  # raw text, for sample translations
        self._train_sampler: TokenBatchSampler | None = None
        self._legacy_sampler_state: dict[str, int] | None = None  # from an older checkpoint (load_state_dict)

    # -- Lightning hooks -----------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if not is_complete(self.dataset_dir):  # else prepare_dataset would hash the corpus to say so
            prepare_dataset(self.cfg, self.output_dir)

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is not None:
            return
        self.manifest = read_manifest(self.dataset_dir)
        self.tokenizer = Tokenizer(self.dataset_dir / self.manifest["spm_model"]["file"])
        verify_spm_model(self.dataset_dir, self.manifest, self.tokenizer.sha256)
        self.splits = {split: ShardedPairs(self.dataset_dir, split) for split in self.manifest["splits"]}

    def train_dataloader(self) -> DataLoader:
        rank, world_size, epoch = self._placement()
        sampler = TokenBatchSampler(
            self.splits["train"].src_lengths,
            self.splits["train"].tgt_lengths,
            max_tokens=self.cfg["max_tokens"],
            seed=self.seed,
            shuffle=True,
            rank=rank,
            world_size=world_size,
            accumulation=self.accumulation,
        )
        sampler.set_epoch(epoch)
        if self._legacy_sampler_state is not None:  # resuming from an older checkpoint: continue mid-epoch
            sampler.load_state_dict(self._legacy_sampler_state)
            self._legacy_sampler_state = None
        self._train_sampler = sampler
        if self.trainer is not None and not self.trainer.reload_dataloaders_every_n_epochs:
            rank_zero_warn(
                "TranslationDataModule: set Trainer(reload_dataloaders_every_n_epochs=1): token batching gives "
                "each epoch a slightly different number of batches, which Lightning reads only on reload"
            )
        if self.tokenizer is None:
            raise RuntimeError("TranslationDataModule.setup() must run before asking for a dataloader")
        return TrainLoader(
            TrainBatches(self.splits["train"], self._collate()),
            sampler,
            num_workers=int(self.cfg.get("num_workers") or 0),
            trained=self._batches_trained,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("valid")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    # -- resumable mid-epoch: the training loader's state (TrainLoader) is in every checkpoint ---------------
    def _batches_trained(self) -> int | None:
        """Batches of the current epoch trained on, by Lightning's progress counter, while fitting; else None."""
        if self.trainer is None or self.trainer.state.fn != TrainerFn.FITTING:
            return None
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Checkpoints written before TrainLoader kept the sampler position here, as {"train_sampler": ...}.

        Lightning restores this before it asks for the training loader, which then starts from that position.
        """
        if state_dict.get("train_sampler"):
            self._legacy_sampler_state = dict(state_dict["train_sampler"])

    # -- helpers -------------------------------------------------------------------------------------------
    def raw_pairs(self, split: str, n: int) -> list[tuple[str, str]]:
        """The first n (source, reference) sentences of a split, as raw text from the corpus files."""
        if split not in self._corpora:  # opened once: the LightningModule asks at every validation
            cache_dir = self.output_dir / ".cache" / "huggingface" / "datasets"
            # the files' sha256 the manifest records (the folder was found by their stat): their Arrow file in the
            # cache is named by content, and a reader does not hash the corpus
            manifest = self.manifest or read_manifest(self.dataset_dir)
            sha256 = {key: e["sha256"] for key, e in manifest["source"]["files"].items() if e.get("sha256")}
            self._corpora[split] = ParallelCorpus(split, split_sources(self.cfg)[split], cache_dir, sha256)
        return self._corpora[split].head(n)

    def valid_examples(self, n: int) -> list[tuple[str, str]]:
        """First n validation (source, reference) pairs: the sentences sample translations are shown for."""
        return self.raw_pairs("valid", n)

    def _placement(self) -> tuple[int, int, int]:
        """(rank, world_size, epoch) from the attached Trainer, or a single process at epoch 0 without one."""
        if self.trainer is None:
            return 0, 1, 0
        return self.trainer.global_rank, self.trainer.world_size, self.trainer.current_epoch

    def _eval_loader(self, split: str) -> DataLoader:
        if split not in self.splits:
            raise KeyError(f"no {split!r} split prepared in {self.dataset_dir}; add data.splits.{split}")
        rank, world_size, _ = self._placement()
        sampler = TokenBatchSampler(
            self.splits[split].src_lengths,
            self.splits[split].tgt_lengths,
            max_tokens=self.cfg["max_tokens"],
            seed=self.seed,
            shuffle=False,  # sorted by length once: least padding, same batches every validation
            rank=rank,
            world_size=world_size,
        )
        return self._loader(split, sampler)

    def _loader(self, split: str, sampler: TokenBatchSampler) -> DataLoader:
        if self.tokenizer is None:
            raise RuntimeError("TranslationDataModule.setup() must run before asking for a dataloader")
        return DataLoader(
            self.splits[split],
            batch_sampler=sampler,
            collate_fn=self._collate(),
            num_workers=int(self.cfg.get("num_workers") or 0),
        )

    def _collate(self) -> partial:
        tok = self.tokenizer
        return partial(collate_pairs, pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id)


def _as_is(batch: dict) -> dict:
    return batch


class TrainLoader(DataLoader):
    """The training DataLoader, resumable mid-epoch through Lightning's own route.

    Lightning's fit loop saves the `state_dict()` of a training loader that has `state_dict`/`load_state_dict`
    in every checkpoint, and loads it into the loader it creates on resume, before iterating it; a loader without
    them resumes at the start of its epoch, with a warning that it is not resumable. The state is the
    TokenBatchSampler's (epoch, batches done), so the resumed epoch continues with its next untrained batch. The
    sampler runs ahead of training (Lightning prefetches a batch, workers prefetch more), so the batches it has
    yielded overcount: `trained()`, when it gives a number, is how many batches of the epoch were trained on.

    batch_size=None: the sampler yields whole batches, (pair indices, update target tokens), and TrainBatches
    turns each into one collated batch (in the workers, if there are any).
    """

    def __init__(
        self,
        dataset: TrainBatches,
        batches: TokenBatchSampler,
        num_workers: int = 0,
        trained: Callable[[], int | None] | None = None,
    ):
        super().__init__(
            dataset, sampler=UpdateTokenSampler(batches), batch_size=None, collate_fn=_as_is, num_workers=num_workers
        )
        self.batches, self.trained = batches, trained

    def state_dict(self) -> dict[str, int]:
        state = self.batches.state_dict()
        done = self.trained() if self.trained is not None else None
        if done is not None:
            state["batches_done"] = done
        return state

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.batches.load_state_dict(state_dict)


class UpdateTokenSampler(Sampler):
    """A TokenBatchSampler's batches as (pair indices, target tokens of their optimizer update) items.

    Lightning calls set_epoch on `dataloader.sampler`: passed on, as is the length (the position is TrainLoader's).
    """

    def __init__(self, batches: TokenBatchSampler):
        super().__init__()
        self.batches = batches

    def set_epoch(self, epoch: int) -> None:
        self.batches.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[list[int], int]]:
        return self.batches.with_update_tokens()


class TrainBatches(Dataset):
    """(pair indices, update target tokens) -> the collated batch, with "update_tgt_tokens" added: the number
    the loss of every micro-batch of that update is divided by (modules/lightning.py)."""

    def __init__(self, pairs: ShardedPairs, collate: partial):
        self.pairs, self.collate = pairs, collate

    def __getitem__(self, item: tuple[list[int], int]) -> dict:
        indices, update_tgt_tokens = item
        batch = self.collate([self.pairs[i] for i in indices])
        batch["update_tgt_tokens"] = update_tgt_tokens
        return batch
