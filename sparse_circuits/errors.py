"""The one error type of expected failures.

A stage raises `StageError` (or a subclass) for anything a user can cause and fix: a config
field out of range, a missing or malformed input file, an output that holds something else.
Its message is one line that names the file or the field. The CLI prints that line and exits
non-zero; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class StageError(ValueError):
    """An expected failure of a stage; the message names the file or field concerned.

    A ValueError, so that callers that caught ValueError before keep working."""


class ConfigError(StageError):
    """A config that does not validate; the message names the field."""


class RunDirError(StageError):
    """An output directory (or file) that holds something else, is locked by another process,
    or a missing input."""


class MissingInputError(StageError, FileNotFoundError):
    """An input file or directory that is not there (also a FileNotFoundError)."""
