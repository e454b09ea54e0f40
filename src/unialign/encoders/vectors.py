"""Bring your own embeddings: ``vectors:<file>`` is an encoder whose features are rows of a table of
precomputed vectors, looked up by key, so embeddings from any model of any modality can be aligned,
evaluated and served without writing an encoder (open_clip issue 99).

Files:

- ``.npy``: an (N, d) array; keys are given by ``ids=<file>`` (a ``.txt`` with one key a line, a
  ``.json`` list, or a ``.npy`` of strings/ints), else the row numbers ``"0" .. "N-1"``.
- ``.npz``: arrays ``embeddings`` (N, d) and ``ids`` (N).
- ``.parquet``: a key column (``key=``, default ``id``) and a list-of-floats column (``column=``,
  default ``embedding``); reading it needs pyarrow (``pip install unialign[train]``).

A dataset record names its vector by the key in its ``vector`` field (default: its ``id``). At
inference ``encode`` takes keys or the vectors themselves ((d,) arrays, checked for width and NaN):
a served model then embeds whatever vectors the user's own model produces. ``"final"`` is the stored
vector as it is; there are no other layers.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .base import FINAL, Encoder

DEFAULTS: dict[str, Any] = {"ids": None, "key": "id", "column": "embedding"}


def read_vectors(path: Path, ids: str | None, key: str, column: str) -> tuple[np.ndarray, list[str]]:
    """The (N, d) float array and its N string keys."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            arr = np.load(path, mmap_mode="r")
            keys = _read_ids(Path(ids), len(arr)) if ids else [str(i) for i in range(len(arr))]
        elif suffix == ".npz":
            with np.load(path) as z:
                if "embeddings" not in z or "ids" not in z:
                    raise DataError(f"{path}: an .npz of vectors needs arrays 'embeddings' and 'ids'; it has {list(z)}")
                arr, keys = z["embeddings"], [str(k) for k in z["ids"].tolist()]
        elif suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise ConfigError("reading vectors from Parquet needs pyarrow: pip install 'unialign[train]'") from None
            table = pq.read_table(path)
            for c in (key, column):
                if c not in table.column_names:
                    raise DataError(f"{path}: no column {c!r}; columns are {table.column_names} (set key=/column=)")
            keys = [str(k) for k in table.column(key).to_pylist()]
            arr = np.asarray(table.column(column).to_pylist(), dtype=np.float32)
        else:
            raise ConfigError(f"vectors:{path}: unsupported file type {suffix!r}; use .npy, .npz or .parquet")
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read vectors ({e})") from None
    if arr.ndim != 2 or not len(arr):
        raise DataError(f"{path}: vectors must form a non-empty (rows, dim) array, got shape {arr.shape}")
    if len(keys) != len(arr):
        raise DataError(f"{path}: {len(arr)} vectors but {len(keys)} keys")
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise DataError(f"{path}: key {dup!r} appears more than once")
    return arr, keys


def _read_ids(path: Path, n: int) -> list[str]:
    if path.suffix == ".txt":
        keys = [ln.rstrip("\n") for ln in path.read_text(encoding="utf-8").splitlines()]
    elif path.suffix == ".json":
        keys = [str(k) for k in json.loads(path.read_text(encoding="utf-8"))]
    else:
        keys = [str(k) for k in np.load(path, allow_pickle=False).tolist()]
    return keys[:n] if len(keys) == n + 1 and keys[-1] == "" else keys


class VectorLoader:
    """Picklable ``key | vector -> (d,) tensor``. The table is read lazily, once per process (so
    DataLoader workers receive a path, not the vectors)."""

    def __init__(self, path: str, ids: str | None, key: str, column: str, dim: int):
        self.path, self.ids, self.key, self.column, self.dim = path, ids, key, column, dim
        self._table: tuple[np.ndarray, dict[str, int]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_table": None}

    def table(self) -> tuple[np.ndarray, dict[str, int]]:
        if self._table is None:
            arr, keys = read_vectors(Path(self.path), self.ids, self.key, self.column)
            self._table = (arr, {k: i for i, k in enumerate(keys)})
        return self._table

    def __call__(self, item: Any) -> torch.Tensor:
        if isinstance(item, (str, int, np.integer)):
            arr, rows = self.table()
            row = rows.get(str(item))
            if row is None:
                raise DataError(f"key {str(item)!r} is not in {self.path}")
            vec = np.asarray(arr[row], dtype=np.float32)
        else:
            vec = np.asarray(item.detach().cpu() if isinstance(item, torch.Tensor) else item, dtype=np.float32)
        if vec.shape != (self.dim,):
            raise DataError(f"a vector of shape {vec.shape} was given; this encoder takes ({self.dim},) vectors")
        if not np.isfinite(vec).all():
            raise DataError("the vector holds NaN or Inf")
        return torch.from_numpy(vec.copy())


class VectorEncoder(Encoder):
    """Rows of a vector table (see the module doc), keyed by record."""

    modality = "vector"

    def __init__(self, name: str, device: str | torch.device | None = None, **options: Any):
        from . import check_options, format_spec

        super().__init__()
        opts = check_options(f"vectors:{name}", options, DEFAULTS)
        if not name:
            raise ConfigError("vectors: needs a file, e.g. vectors:embeddings.npy?ids=ids.txt")
        path = Path(name).expanduser()
        if not path.is_file():
            raise ConfigError(f"vectors:{name}: no such file")
        ids = str(Path(opts["ids"]).expanduser().resolve()) if opts["ids"] else None
        arr, keys = read_vectors(path, ids, str(opts["key"]), str(opts["column"]))
        self.path = str(path.resolve())
        self.dim = int(arr.shape[1])
        self.layer_dims = {FINAL: self.dim}
        self.spec = format_spec(f"vectors:{self.path}", {**opts, "ids": ids}, DEFAULTS)
        self.version = _fingerprint(arr, keys)
        self._loader = VectorLoader(self.path, ids, str(opts["key"]), str(opts["column"]), self.dim)
        self.freeze(device)

    def loader(self) -> VectorLoader:
        return self._loader

    def forward(self, batch: torch.Tensor, layers: Sequence[str] = (FINAL,)) -> dict[str, torch.Tensor]:
        self.check_layers(layers)
        return {FINAL: batch.float()}

    def config(self) -> dict[str, Any]:
        return {**super().config(), "path": self.path, "layers": self.layer_dims}


def _fingerprint(arr: np.ndarray, keys: Sequence[str], sample: int = 4096) -> str:
    """Shape, dtype, keys and a strided sample of values: changes whenever the vectors do."""
    h = hashlib.sha256(f"{arr.shape}:{arr.dtype}".encode())
    h.update("\n".join(keys).encode())
    flat = np.asarray(arr).reshape(-1)
    h.update(np.asarray(flat[:: max(1, flat.size // sample)][:sample], dtype=np.float64).tobytes())
    return h.hexdigest()[:12]


__all__ = ["VectorEncoder", "VectorLoader", "read_vectors"]
