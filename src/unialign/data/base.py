"""The one dataset type every stage reads: a table of (image, captions, concept) records.

Every source (emoji packages, Fashion-MNIST, a user's CSV/JSONL/Parquet or image folder) is turned into
a :class:`PairDataset`. Images are stored as paths, so feature extraction can decode them lazily in
worker processes, and the dataset can be fingerprinted cheaply to know when cached features are stale.

Record fields:
- ``id``: unique string per record.
- ``image``: image path, absolute or relative to ``root``.
- ``captions``: list of caption strings (may be empty for a pure image set).
- ``concept``: what the image shows (emoji code point, class name); splits are made over concepts.
- ``label``: human-readable concept name used for zero-shot prompts.
- ``style``: optional rendering style / domain (emoji vendor), used for held-out-style splits.
Extra columns are kept as they are.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from ..errors import DataError, ImageLoadError
from ..io import atomic_path, read_json, write_json

REQUIRED = ("id", "image", "captions", "concept", "label", "style")

# Pillow's decompression-bomb guard, made an error instead of a warning: 8192 x 8192 is far above
# anything an encoder looks at, far below what exhausts memory.
MAX_IMAGE_PIXELS = 8192 * 8192


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image as RGB, applying EXIF rotation and compositing alpha on white.

    Raises :class:`ImageLoadError` naming the file for anything that is not a readable image
    (missing, zero bytes, truncated, a directory, a text file, a decompression bomb).
    """
    p = Path(path)
    if not p.exists():
        raise ImageLoadError(str(p), "file does not exist")
    if p.is_dir():
        raise ImageLoadError(str(p), "is a directory, not an image")
    if p.stat().st_size == 0:
        raise ImageLoadError(str(p), "file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
            with Image.open(p) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise ImageLoadError(str(p), f"image too large ({im.width}x{im.height} pixels)")
                im.load()
                im = ImageOps.exif_transpose(im)
                return to_rgb(im)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(str(p), f"image too large (decompression bomb guard): {e}") from None
    except Exception as e:  # PIL raises many types for bad files; all mean "not a readable image"
        raise ImageLoadError(str(p), f"not a readable image ({type(e).__name__}: {e})") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode (P, PA, LA, RGBA, CMYK, I;16, I, F, L, 1) to 8-bit RGB; transparency becomes white.

    High-bit-depth images are scaled by their type's full range (16-bit: 65535, float: 1.0), not by
    the image's own maximum, so a dark 16-bit photo stays dark instead of being stretched to white.
    """
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if im.mode == "F":
            top = 1.0 if arr.size == 0 or arr.max() <= 1.0 else 255.0
        elif im.mode == "I" and arr.size and arr.max() > 65535:
            top = float(arr.max())
        else:
            top = 65535.0
        im = Image.fromarray((arr / top * 255.0).round().clip(0, 255).astype(np.uint8), "L")
    if im.mode in ("P", "PA", "LA", "RGBa") or (im.mode in ("L", "RGB") and "transparency" in im.info):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        bg = Image.new("RGB", im.size, (255, 255, 255))
        bg.paste(im, mask=im.getchannel("A"))
        return bg
    return im.convert("RGB")


@dataclass
class PairDataset:
    """A list of image-caption records plus where its images live.

    ``classes`` is set for labelled sets (Fashion-MNIST, image folders): the class names in label order;
    zero-shot classification uses them.
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

    # -- access -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def image_path(self, i: int) -> Path:
        p = Path(self.records[i]["image"])
        return p if p.is_absolute() else self.root / p

    def load_image(self, i: int) -> Image.Image:
        return load_image(self.image_path(i))

    def captions(self, i: int) -> list[str]:
        return list(self.records[i]["captions"])

    def column(self, key: str) -> list[Any]:
        return [r.get(key) for r in self.records]

    def texts(self) -> list[str]:
        """Unique non-empty captions in first-appearance order: what a text feature store holds.
        Identical captions shared by several images (same concept, other style) are encoded once."""
        seen: dict[str, None] = {}
        for r in self.records:
            for c in r["captions"]:
                if isinstance(c, str) and c.strip():
                    seen.setdefault(c, None)
        return list(seen)

    def concepts(self) -> list[str]:
        """Unique concepts in first-appearance order."""
        return list(dict.fromkeys(r["concept"] for r in self.records))

    def concept_labels(self) -> dict[str, str]:
        return {r["concept"]: r["label"] for r in self.records}

    def indices(self, *, styles: Iterable[str] | None = None, concepts: Iterable[str] | None = None) -> np.ndarray:
        """Record indices whose style and concept are in the given sets (``None`` = any)."""
        st = set(styles) if styles is not None else None
        co = set(concepts) if concepts is not None else None
        keep = [
            i
            for i, r in enumerate(self.records)
            if (st is None or r["style"] in st) and (co is None or r["concept"] in co)
        ]
        return np.asarray(keep, dtype=np.int64)

    def subset(self, indices: Sequence[int], name: str | None = None) -> "PairDataset":
        recs = [self.records[int(i)] for i in indices]
        return PairDataset(name or self.name, recs, self.root, self.classes, dict(self.meta))

    # -- identity -----------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """Hash of the records (paths, captions, concepts) and each image file's size and mtime:
        changes whenever cached features could be stale."""
        h = hashlib.sha256()
        h.update(self.name.encode())
        for i, r in enumerate(self.records):
            p = self.image_path(i)
            try:
                st = p.stat()
                stamp = f"{st.st_size}:{int(st.st_mtime)}"
            except OSError:
                stamp = "missing"
            row = [r["id"], str(r["image"]), list(r["captions"]), r["concept"], r["label"], r["style"], stamp]
            h.update(json.dumps(row, ensure_ascii=False).encode())
        return h.hexdigest()[:16]

    # -- persistence --------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``records.parquet`` + ``dataset.json`` (name, root, classes) atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist([_normalise(r) for r in self.records])
        with atomic_path(folder / "records.parquet") as tmp:
            pq.write_table(table, tmp)
        write_json(folder / "dataset.json", {"name": self.name, "root": str(self.root), "classes": self.classes,
                                             "meta": self.meta, "n_records": len(self)})
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "PairDataset":
        folder = Path(folder)
        info_path = folder / "dataset.json"
        if not info_path.exists():
            raise DataError(f"{folder} is not a built dataset (no dataset.json)")
        info = read_json(info_path)
        records = pq.read_table(folder / "records.parquet").to_pylist()
        root = Path(info["root"])
        if not root.is_absolute():
            root = folder / root
        return cls(info["name"], records, root, info.get("classes"), info.get("meta", {}))


def _normalise(r: dict[str, Any]) -> dict[str, Any]:
    out = dict(r)
    out["captions"] = [str(c) for c in r["captions"]]
    out["style"] = "" if r["style"] is None else str(r["style"])
    return out
