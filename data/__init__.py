"""aiayn's data pipeline: parallel text -> joint BPE -> memory-mapped shards -> token-count batches (section 5.1)."""

from data.batching import TokenBatchSampler
from data.collate import collate_pairs
from data.corpus import CorpusFileNotFoundError, ParallelCorpus, resolve_corpus_path
from data.datamodule import TranslationDataModule
from data.manifest import read_manifest
from data.prepare import dataset_dir_for, dataset_fingerprint, prepare_dataset
from data.shards import ShardChecksumError, ShardedPairs
from data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, train_sentencepiece

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "UNK_ID",
    "CorpusFileNotFoundError",
    "ParallelCorpus",
    "ShardChecksumError",
    "ShardedPairs",
    "TokenBatchSampler",
    "Tokenizer",
    "TranslationDataModule",
    "collate_pairs",
    "dataset_dir_for",
    "dataset_fingerprint",
    "prepare_dataset",
    "read_manifest",
    "resolve_corpus_path",
    "train_sentencepiece",
]
