"""Errors caused by what the user gave: files, data, params, checkpoints, the disk.

They subclass the built-in error they are (FileNotFoundError, ValueError, OSError), so callers may catch either,
and `BadInput` marks them as expected: a stage or command prints their one-line message and exits with status 2,
without a traceback. Any other exception is a bug and keeps its traceback."""
from __future__ import annotations


class BadInput(Exception):
    """An error in the input, with a message that names the file or parameter and what was expected."""


class InputFileNotFound(BadInput, FileNotFoundError):
    pass


class InputValueError(BadInput, ValueError):
    pass


class InputOSError(BadInput, OSError):
    pass


class OutputWriteError(BadInput, OSError):
    """Writing an artifact failed (full disk, I/O error); nothing that looks complete was left."""
