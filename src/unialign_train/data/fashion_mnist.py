"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist``: a real-photo zero-shot check.

Models aligned on emoji are tested on product photos they never saw, with the 10 class names as prompts.
The IDX files are decoded once into 28x28 grayscale PNGs so that every dataset in unialign is the same
kind of thing (records pointing at image files) and feature extraction needs no special case.
"""
from __future__ import annotations

import gzip
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from unialign import paths
from unialign.errors import ConfigError, DataError
from unialign.io import write_bytes
from unialign.progress import progress

from .records import Dataset

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
RECORDS_FORMAT = 2  # records carry modality fields (``text``); older saved datasets are rebuilt
# The official classes in label order, lowercased so that "a photo of a {name}" reads naturally.
CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
           "ankle boot"]

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Decode an IDX file (gzipped or not): magic ``0 0 <dtype> <ndim>``, big-endian uint32 dims, data."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(dims) != ndim or len(raw) - header != expected:
        raise DataError(f"{path}: IDX header says shape {dims} ({expected} bytes) but the file holds "
                        f"{len(raw) - header} bytes of data")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def find_files(split: str, source: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """The (images, labels) files of a split, gzipped or not; a DataError saying how to install them."""
    if split not in FILES:
        raise ConfigError(f"fashion-mnist split must be one of {sorted(FILES)}, got {split!r}")
    folder = Path(source) if source is not None else FASHION_MNIST_DIR
    found = []
    for name in FILES[split]:
        candidates = [folder / name, folder / name.removesuffix(".gz")]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            raise DataError(f"Fashion-MNIST file {folder / name} not found: run `apt-get install "
                            "dataset-fashion-mnist` (or the project setup script scripts/setup.sh)")
        found.append(hit)
    return found[0], found[1]


def build_fashion_mnist(
    split: str = "test",
    root: str | os.PathLike | None = None,
    force: bool = False,
    source: str | os.PathLike | None = None,
) -> Dataset:
    """Build (or load, if built) one split of Fashion-MNIST as PNG files plus a saved Dataset.

    Records: ``concept`` = ``label`` = class name, ``text`` = ``["a photo of a <name>"]``,
    ``style`` = ``"photo"``, plus ``target`` (the class index); ``classes`` = :data:`CLASSES`.
    ``root`` is the output folder (default ``datasets_dir()/"fashion-mnist"/split``); ``source`` the
    folder holding the IDX files (default the Debian package's). Resumable: existing PNGs are kept.
    """
    images_file, labels_file = find_files(split, source)
    out = Path(root) if root is not None else paths.datasets_dir() / "fashion-mnist" / split
    if not force and (out / "dataset.json").exists():
        ds = Dataset.load(out)
        if ds.meta.get("records_format") == RECORDS_FORMAT:
            return ds

    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{images_file} / {labels_file}: expected N x H x W images and N labels, got shapes "
                        f"{images.shape} and {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise DataError(f"{labels_file}: labels outside 0..{len(CLASSES) - 1}")
    images = images.astype(np.uint8, copy=False)

    records: list[dict[str, Any]] = []
    todo = []
    for i, y in enumerate(labels.tolist()):
        rel = f"img/{i:05d}.png"
        name = CLASSES[y]
        records.append({"id": f"fashion-mnist/{split}/{i:05d}", "image": rel, "text": [f"a photo of a {name}"],
                        "concept": name, "label": name, "style": "photo", "target": int(y)})
        if force or not (out / rel).exists():
            todo.append(i)
    for i in progress(todo, desc=f"fashion-mnist {split}", unit="img", leave=False, disable=len(todo) < 1000):
        buf = io.BytesIO()
        Image.fromarray(images[i], "L").save(buf, format="PNG")
        write_bytes(out / f"img/{i:05d}.png", buf.getvalue())

    meta = {"split": split, "source": str(images_file.parent), "records_format": RECORDS_FORMAT}
    Dataset(f"fashion-mnist-{split}", records, Path("."), list(CLASSES), meta).save(out)
    return Dataset.load(out)


__all__ = ["build_fashion_mnist", "read_idx", "find_files", "CLASSES", "FASHION_MNIST_DIR"]
