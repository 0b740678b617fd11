"""aiayn's data pipeline: parallel text -> joint BPE -> memory-mapped shards -> token-count batches (section 5.1).

Names are imported lazily (PEP 562), so `aiayn prepare` and `aiayn data stats` never import torch/Lightning:
only TranslationDataModule needs them.
"""

from importlib import import_module
from typing import Any

_WHERE = {
    "TokenBatchSampler": "data.batching",
    "collate_pairs": "data.collate",
    "Cleaner": "data.clean",
    "ParallelCorpus": "data.corpus",
    "TranslationDataModule": "data.datamodule",
    "CorpusFileNotFoundError": "data.errors",
    "DataError": "data.errors",
    "read_manifest": "data.manifest",
    "check_corpus": "data.prepare",
    "dataset_dir_for": "data.prepare",
    "dataset_fingerprint": "data.prepare",
    "find_dataset_dir": "data.prepare",
    "prepare_dataset": "data.prepare",
    "ShardChecksumError": "data.shards",
    "ShardedPairs": "data.shards",
    "resolve_corpus_path": "data.sources",
    "BOS_ID": "data.tokenizer",
    "EOS_ID": "data.tokenizer",
    "PAD_ID": "data.tokenizer",
    "UNK_ID": "data.tokenizer",
    "Tokenizer": "data.tokenizer",
    "train_sentencepiece": "data.tokenizer",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'data' has no attribute {name!r}")
    return getattr(import_module(_WHERE[name]), name)
