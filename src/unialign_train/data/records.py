"""The one dataset type every stage reads: records that carry items of named modalities.

Every source (emoji packages, Fashion-MNIST, a user's CSV/JSONL/Parquet table or class folders,
precomputed vectors, audio and video collections) becomes a :class:`Dataset`. Media are stored as
paths, so feature extraction decodes them lazily in worker processes, and a dataset can be
fingerprinted cheaply to know when cached features are stale.

Record fields:

- ``id``: unique string per record.
- ``concept``: what the record shows (emoji code point, class name); splits are made over concepts.
- ``label``: human-readable concept name used in zero-shot prompts.
- ``style``: rendering style / domain / voice (may be ""), used for held-out-style splits.
- one field per modality it has: ``image`` / ``audio`` / ``video`` (a file path, absolute or relative
  to ``root``), ``text`` (a list of caption strings, possibly empty), ``vector`` (the key of the
  record's row in a vector table; the record's ``id`` when absent).

Extra fields (category, subcategory, target, ...) are kept as they are. ``meta["protocol"]`` may hold
the dataset's own evaluation protocol (``train_styles`` / ``test_styles``), which the split uses when
the configuration does not say otherwise.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from unialign.encoders.base import MODALITIES
from unialign.errors import DataError
from unialign.io import atomic_path, read_json, write_json

REQUIRED = ("id", "concept", "label", "style")
FILE_MODALITIES = ("image", "audio", "video")


@dataclass
class Dataset:
    """A list of records plus where their files live.

    ``classes`` is set for labelled sets (Fashion-MNIST, class folders): the class names in label
    order; zero-shot classification then uses all of them, not only the concepts of a split.
    """

    name: str
    records: list[dict[str, Any]]
    root: Path = field(default_factory=Path)
    classes: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        for i, r in enumerate(self.records):
            missing = [k for k in REQUIRED if k not in r]
            if missing:
                raise DataError(f"{self.name}: record {i} lacks field(s) {missing}")
            if "text" in r and not isinstance(r["text"], (list, tuple)):
                raise DataError(f"{self.name}: record {i}: 'text' must be a list of captions, got {type(r['text']).__name__}")

    # -- access -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    @property
    def modalities(self) -> list[str]:
        """The modalities some record has an item of (``vector`` only when a record names a key)."""
        have = {m for r in self.records for m in MODALITIES if r.get(m)}
        return [m for m in MODALITIES if m in have]

    def path(self, i: int, modality: str = "image") -> Path:
        """Absolute path of record ``i``'s file of a file modality."""
        p = Path(self.records[i][modality])
        return p if p.is_absolute() else self.root / p

    def items(self, i: int, modality: str) -> list[str]:
        """Record ``i``'s items of ``modality``: its file path, its non-empty captions, its vector key."""
        r = self.records[i]
        if modality == "text":
            return [c for c in dict.fromkeys(r.get("text") or []) if isinstance(c, str) and c.strip()]
        if modality == "vector":
            return [str(r.get("vector") or r["id"])]
        if modality in FILE_MODALITIES:
            return [str(self.path(i, modality))] if r.get(modality) else []
        raise DataError(f"unknown modality {modality!r}; known: {', '.join(MODALITIES)}")

    def unique_items(self, modality: str) -> list[str]:
        """Distinct items of ``modality`` in first-appearance order: what its feature store holds (a
        caption shared by a concept's images in several styles is encoded once)."""
        seen: dict[str, None] = {}
        for i in range(len(self)):
            for it in self.items(i, modality):
                seen.setdefault(it, None)
        return list(seen)

    def column(self, key: str) -> list[Any]:
        return [r.get(key) for r in self.records]

    def concepts(self) -> list[str]:
        """Unique concepts in first-appearance order."""
        return list(dict.fromkeys(r["concept"] for r in self.records))

    def concept_labels(self) -> dict[str, str]:
        return {r["concept"]: r["label"] for r in self.records}

    def indices(self, *, styles: Iterable[str] | None = None, concepts: Iterable[str] | None = None) -> np.ndarray:
        """Record indices whose style and concept are in the given sets (``None`` = any)."""
        st = set(styles) if styles is not None else None
        co = set(concepts) if concepts is not None else None
        keep = [i for i, r in enumerate(self.records)
                if (st is None or r["style"] in st) and (co is None or r["concept"] in co)]
        return np.asarray(keep, dtype=np.int64)

    def subset(self, indices: Sequence[int], name: str | None = None) -> "Dataset":
        recs = [self.records[int(i)] for i in indices]
        return Dataset(name or self.name, recs, self.root, self.classes, dict(self.meta))

    # -- identity -----------------------------------------------------------------------------
    def fingerprint(self, modality: str | None = None) -> str:
        """Hash of what cached features of ``modality`` depend on (its items; for files also each
        file's size and mtime), or of every record when ``modality`` is None: it changes whenever such
        features could be stale, and only then (new captions leave image features valid)."""
        h = hashlib.sha256(self.name.encode())
        if modality is None:
            for r in self.records:
                h.update(json.dumps(r, sort_keys=True, ensure_ascii=False, default=str).encode())
            return h.hexdigest()[:16]
        for it in self.unique_items(modality):
            stamp = ""
            if modality in FILE_MODALITIES:
                try:
                    st = Path(it).stat()
                    stamp = f"{st.st_size}:{int(st.st_mtime)}"
                except OSError:
                    stamp = "missing"
            h.update(json.dumps([it, stamp], ensure_ascii=False).encode())
        return h.hexdigest()[:16]

    # -- persistence --------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``records.parquet`` + ``dataset.json`` (name, root, classes, meta) atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist([_normalise(r) for r in self.records])
        with atomic_path(folder / "records.parquet") as tmp:
            pq.write_table(table, tmp)
        write_json(folder / "dataset.json", {"name": self.name, "root": str(self.root), "classes": self.classes,
                                             "meta": self.meta, "n_records": len(self)})
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Dataset":
        folder = Path(folder)
        info_path = folder / "dataset.json"
        if not info_path.exists():
            raise DataError(f"{folder} is not a built dataset (no dataset.json)")
        info = read_json(info_path)
        try:
            records = pq.read_table(folder / "records.parquet").to_pylist()
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
            raise DataError(f"{folder}/records.parquet is not readable ({e}); rebuild the dataset") from None
        root = Path(info["root"])
        if not root.is_absolute():
            root = folder / root
        return cls(info["name"], records, root, info.get("classes"), info.get("meta", {}))


def _normalise(r: dict[str, Any]) -> dict[str, Any]:
    out = dict(r)
    if "text" in out:
        out["text"] = [str(c) for c in out["text"]]
    out["style"] = "" if r["style"] is None else str(r["style"])
    return out


__all__ = ["Dataset", "FILE_MODALITIES", "REQUIRED"]
