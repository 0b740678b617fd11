"""The data errors a user can hit. Each message names the file, line, shard or config key, and what to do.

`aiayn` prints any DataError as one line instead of a traceback (pipeline/cli.py). Each class also derives
from the built-in exception it refines, so `except ValueError` / `except FileNotFoundError` still catch it.
"""

from __future__ import annotations


class DataError(Exception):
    """Base class: a problem with the corpus, the data config or a prepared dataset folder."""


class CorpusFileNotFoundError(DataError, FileNotFoundError):
    """A corpus file named in the data config does not exist."""


class EmptyCorpusFileError(DataError, ValueError):
    """A corpus file has no lines at all."""


class LineCountError(DataError, ValueError):
    """The source and target files of a pair have different numbers of lines."""


class CorruptFileError(DataError, ValueError):
    """A file cannot be read to its end: a .gz cut short, or bytes that are not gzip."""


class BadLineError(DataError, ValueError):
    """One line cannot be used (invalid UTF-8, over 1 MiB, missing column or field) and on_bad_line=error."""


class SourceConfigError(DataError, KeyError):
    """A split in data.splits is not one of the source layouts data/sources.py reads."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class HubSourceError(DataError, ConnectionError):
    """A Hugging Face Hub dataset could not be loaded (no network, offline mode, unknown name)."""


class VocabSizeError(DataError, ValueError):
    """model.vocab_size asks for more BPE tokens than the training text can give."""


class SpmModelMismatchError(DataError, RuntimeError):
    """The sentencepiece model beside a manifest is not the one the manifest was written with."""


class DatasetNotPreparedError(DataError, FileNotFoundError):
    """The dataset folder for this config has no (complete) manifest yet."""


class DataConfigError(DataError, ValueError):
    """A data.* setting that cannot work (data.max_len=0, data.shard_lines=0, data.src_lang == data.tgt_lang, ...)."""


class NoTrainingTextError(DataError, ValueError):
    """The train split leaves nothing to learn from: no text for the BPE model, or no pair after cleaning."""


class ManifestMismatchError(DataError, RuntimeError):
    """A manifest's counts disagree with themselves or with the shard files beside it (a hand-edited manifest, or
    files of another preparation). Not a ValueError: `is_complete` must not take it for "not prepared yet"."""


class OutputNotWritableError(DataError, PermissionError):
    """The output folder (or a file in it) cannot be written: read-only, or another user's."""


class DiskFullError(DataError, OSError):
    """No space left on the device (ENOSPC, or a quota: EDQUOT) while writing a file; errno is kept.

    Raised as DiskFullError(errno, message): it pickles like any OSError (a worker process's error reaches the
    preparing process), and prints as the message alone."""

    def __str__(self) -> str:
        return str(self.strerror)
