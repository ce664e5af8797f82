"""The one exception family of hapkit: every error a user can cause derives from
:class:`HapkitError`.

Each class also derives from the built-in exception its situation has always raised (ValueError for
bad values, FileNotFoundError for missing files, ImportError for a missing extra, ...), so code that
catches those keeps working. The command line prints any :class:`HapkitError` as one line,
``hapkit <verb>: error: <message>``, and exits 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

__all__ = [
    "HapkitError",
    "InputError",
    "MissingFileError",
    "MissingExtraError",
    "DeviceUnavailableError",
    "NonFiniteError",
]


class HapkitError(Exception):
    """Base class of every error hapkit raises about its input, its settings or its environment."""


class InputError(HapkitError, ValueError):
    """An argument of a public function is not what it must be (shape, dtype, range, finiteness)."""


class MissingFileError(HapkitError, FileNotFoundError):
    """A file or folder hapkit was pointed at does not exist (a checkpoint, a results file, ...)."""


class MissingExtraError(HapkitError, ImportError):
    """An optional dependency is not installed; the message names the pip extra that brings it."""


class DeviceUnavailableError(HapkitError, RuntimeError):
    """The requested device (e.g. ``cuda``) does not exist on this machine."""


class NonFiniteError(HapkitError, FloatingPointError, ValueError):
    """Embeddings or a loss became NaN or infinite.

    A ValueError too: the evaluation refused non-finite embeddings with one before this class
    existed, and code that catches it keeps working."""
