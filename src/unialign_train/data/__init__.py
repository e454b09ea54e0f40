"""Datasets: every source becomes a :class:`Dataset` of records with items of named modalities.

``load_dataset(spec)`` is the single entry point the CLI and configs use, so that a dataset can be named
by a short string ("emoji", "fashion-mnist:train", "my_pairs.csv", "photos/").
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from unialign.errors import DataError

from .animated import build_fluent_anim
from .emoji import build_emoji
from .fashion_mnist import build_fashion_mnist
from .gm_notes import build_gm_notes
from .manipulated import build_manipulated
from .moving import build_moving
from .protocol import DataConfig, Splits, balanced_subset, heldout_name, make_splits, split_concepts, unpaired_training
from .records import Dataset
from .spoken import build_spoken
from .tables import TABLE_SUFFIXES, from_image_folder, from_table

ACCEPTED = (
    '"emoji" (vendor emoji styles, built from npm packages)',
    '"fashion-mnist" or "fashion-mnist:train" / "fashion-mnist:test"',
    '"fluent-emoji-anim" (animated emoji clips, from an npm package)',
    '"moving-emoji" (clips of emoji moving in a described direction, rendered)',
    '"gm-notes" (General-MIDI instrument notes rendered with fluidsynth)',
    '"spoken" (digits and letters: espeak-ng voices + real Asterisk recordings)',
    f"a table file ({', '.join(TABLE_SUFFIXES)})",
    "a folder holding a saved dataset (dataset.json)",
    "an image folder with one subfolder per class",
)


def load_dataset(spec: str, **kw: Any) -> Dataset:
    """Resolve a dataset spec to a Dataset; ``kw`` go to the builder or reader it selects."""
    s = str(spec).strip()
    key = s.lower()
    if key == "emoji":
        return build_emoji(**kw)
    if key == "fluent-emoji-anim":
        return build_fluent_anim(**kw)
    if key == "moving-emoji":
        return build_moving(**kw)
    if key == "gm-notes":
        return build_gm_notes(**kw)
    if key == "spoken":
        return build_spoken(**kw)
    if key.startswith("fashion-mnist") or key.startswith("fashion_mnist"):
        name, _, split = key.partition(":")
        if name in ("fashion-mnist", "fashion_mnist"):
            return build_fashion_mnist(split=split or "test", **kw)
    p = Path(s).expanduser()
    if p.is_file() and p.suffix.lower() in TABLE_SUFFIXES:
        return from_table(p, **kw)
    if p.is_dir():
        if (p / "dataset.json").exists():
            return Dataset.load(p)
        return from_image_folder(p, **kw)
    why = "no such file or folder" if not p.exists() else "not a recognised dataset"
    raise DataError(f"unknown dataset {spec!r} ({why}); accepted: " + "; ".join(ACCEPTED))


__all__ = ["DataConfig", "Dataset", "Splits", "balanced_subset", "build_emoji", "build_fashion_mnist", "build_gm_notes", "build_spoken", "build_fluent_anim",
           "build_manipulated", "build_moving",
           "from_image_folder",
           "from_table", "heldout_name", "load_dataset", "make_splits", "split_concepts", "unpaired_training"]
