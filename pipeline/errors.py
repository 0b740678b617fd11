"""Errors of the stages after training (`aiayn average`, `aiayn evaluate`) that a user fixes, not a bug.

`aiayn` prints them as one line naming the key, file or folder at fault and what to do (pipeline/cli.py), like
the data errors of data/errors.py.
"""

from __future__ import annotations


class RunFolderError(ValueError):
    """A missing or unusable run folder, checkpoint or config key (run.dir, evaluate.checkpoint, ...)."""
