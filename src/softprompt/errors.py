"""Exceptions that mean "the user gave us something wrong".

The CLI turns these into one line on stderr and a non-zero exit, never a traceback.
Everything else is a bug and is allowed to raise normally.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input: config, flags, files or checkpoints.

    The message is one sentence that names the file or field and says what to do.
    """

    exit_code: int = 2


class DataError(UserError):
    """A data file is unreadable or does not follow its format."""


class ConfigError(UserError):
    """The run configuration is invalid; the message lists every problem at once."""


class CheckpointError(UserError):
    """A checkpoint is missing, unsafe to load, or belongs to another model."""


EX_IOERR = 74
"""The exit code of a run stopped by an I/O error (sysexits.h's EX_IOERR): disk full, quota, EIO, read-only."""


class StorageError(UserError):
    """Writing into a run directory failed (ENOSPC, EDQUOT, EIO, EROFS ...); the last checkpoint is intact."""

    exit_code = EX_IOERR
