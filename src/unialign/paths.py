"""Where unialign keeps downloaded packages, built datasets and cached features.

Everything lives under one folder so that a user can see (and delete) it: ``$UNIALIGN_HOME`` if set,
else ``~/.cache/unialign``.
"""
from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """Root of unialign's cache (datasets, npm tarballs, feature stores)."""
    return Path(os.environ.get("UNIALIGN_HOME", Path.home() / ".cache" / "unialign")).expanduser()


def datasets_dir() -> Path:
    return home() / "datasets"


def features_dir() -> Path:
    return home() / "features"


def downloads_dir() -> Path:
    return home() / "downloads"


def slug(name: str) -> str:
    """``name`` (an encoder spec, say) as a file-name part: characters other than letters, digits and
    ``-_.`` become ``_``, cut at 60; cache folders add a digest of their key, so slugs need not be unique."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)[:60]
