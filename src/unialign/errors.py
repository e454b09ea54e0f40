"""Exceptions that the CLI turns into one clear line (exit code 1) instead of a traceback."""
from __future__ import annotations


class UnialignError(Exception):
    """Base class: an error whose message is meant for the user as it stands."""


class DataError(UnialignError):
    """Bad or missing input data (a path, a column, an image, a caption)."""


class ImageLoadError(DataError):
    """One image could not be read; ``path`` names it, ``reason`` says why."""

    def __init__(self, path: str, reason: str, too_large: bool = False):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
        self.too_large = too_large


class AudioLoadError(DataError):
    """One audio file could not be read (missing, empty, not audio, no samples); ``path`` names it."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class StoreError(UnialignError):
    """A feature store is missing, incomplete, corrupt or does not match what was asked."""


class ConfigError(UnialignError):
    """An invalid option; the message names the field and the accepted values."""
