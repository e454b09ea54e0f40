"""A sharded, memory-mapped, checksummed feature store: what every stage after extraction reads.

A store holds one encoder's features of one modality's *items* of a dataset: its distinct image
paths, distinct captions, audio files, vector keys (``Dataset.unique_items``), so a caption shared by
several records is encoded once. Layout (clip-retrieval's, so other tools can read it)::

    <store>/
      manifest.json                      encoder, backend, modality, dataset fingerprint, dims, shards + sha256,
                                         skipped items
      img_emb/img_emb_00000.npy          (rows, dim) fp16 by default ("text_emb/text_emb_*" for text,
                                         "<modality>_emb/..." for the others)
      img_emb/layers/<layer>/img_emb_00000.npy   per-layer pooled outputs, when extracted
      metadata/metadata_00000.parquet    one row per stored vector: item index, the id of the first record
                                         holding the item, and the item itself (column named by the modality)
      shards/shard_00000.json            completion record of each shard (written last, atomically)

Rows are in item order. Items that could not be encoded (corrupt image, ...) are left out and listed
in ``manifest["skipped"]``; ``FeatureStore.index`` maps each stored row to its item index, and
``FeatureStore.items()`` gives the items themselves, so the mapping stays explicit. Embeddings are
stored as the encoder produced them (not L2-normalised).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow.parquet as pq

from unialign.errors import StoreError
from unialign.io import read_json, sha256_file

FORMAT_VERSION = 1
FINAL = "final"


def prefix(modality: str) -> str:
    """clip-retrieval's names: ``img_emb`` for images, ``text_emb`` for text; ``<modality>_emb`` otherwise."""
    return {"image": "img_emb", "text": "text_emb"}.get(modality, f"{modality}_emb")


def array_path(root: Path, modality: str, layer: str, shard: int) -> Path:
    p = prefix(modality)
    folder = root / p if layer == FINAL else root / p / "layers" / layer
    return folder / f"{p}_{shard:05d}.npy"


def metadata_path(root: Path, shard: int) -> Path:
    return root / "metadata" / f"metadata_{shard:05d}.parquet"


def shard_record_path(root: Path, shard: int) -> Path:
    return root / "shards" / f"shard_{shard:05d}.json"


class ShardedArray:
    """Read-only (rows, dim) view over memory-mapped shard files; fancy indexing gathers across shards
    without loading the whole array, so stores larger than RAM can be sampled batch by batch."""

    def __init__(self, files: Sequence[Path], dim: int, dtype: np.dtype):
        self.parts = [np.load(f, mmap_mode="r") for f in files]
        for f, a in zip(files, self.parts):
            if a.ndim != 2 or a.shape[1] != dim:
                raise StoreError(f"{f}: shape {a.shape} does not match the manifest's dim {dim}")
        self.offsets = np.cumsum([0] + [len(a) for a in self.parts])
        self.dim = dim
        self.dtype = np.dtype(dtype)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.dim)

    def __getitem__(self, idx: Any) -> np.ndarray:
        if isinstance(idx, slice):
            idx = np.arange(*idx.indices(len(self)))
        idx = np.asarray(idx, dtype=np.int64)
        scalar = idx.ndim == 0
        idx = np.atleast_1d(idx)
        if len(idx) and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        idx = np.where(idx < 0, idx + len(self), idx)
        out = np.empty((len(idx), self.dim), dtype=self.dtype)
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self.parts[s][idx[sel] - self.offsets[s]]
        return out[0] if scalar else out

    def chunks(self, size: int = 65536) -> Iterator[np.ndarray]:
        for s in range(0, len(self), size):
            yield self[s : s + size]

    def numpy(self, dtype: Any = None) -> np.ndarray:
        """The whole array in memory (fine for small stores)."""
        out = np.concatenate(self.parts) if self.parts else np.zeros((0, self.dim), self.dtype)
        return out.astype(dtype) if dtype is not None else out


@dataclass
class FeatureStore:
    """A complete store on disk. Open with :meth:`open`; it checks the manifest, shard files and
    (by default for stores under 2 GB) their checksums."""

    root: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, root: str | Path, verify: bool | str = "auto") -> "FeatureStore":
        root = Path(root)
        mpath = root / "manifest.json"
        if not mpath.exists():
            hint = " (extraction did not finish: run it again to resume)" if (root / "shards").exists() else ""
            raise StoreError(f"{root} is not a complete feature store: no manifest.json{hint}")
        manifest = read_json(mpath)
        if manifest.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{root}: unsupported store format {manifest.get('format_version')!r}")
        store = cls(root, manifest)
        if verify == "auto":
            verify = store.nbytes() < 2 << 30
        store.check(checksums=bool(verify))
        if verify:  # unialign never writes NaN/Inf; a store holding them was edited or made by another tool
            for layer in store.layers:
                store.check_finite(layer)
        return store

    # -- description --------------------------------------------------------------------------
    @property
    def modality(self) -> str:
        return self.manifest["modality"]

    @property
    def encoder(self) -> dict[str, Any]:
        return self.manifest["encoder"]

    @property
    def backend(self) -> str:
        """What computed the rows: torch, onnx or openvino (stores of format 1 written before backends
        existed were all written by torch)."""
        return str(self.manifest.get("backend", "torch"))

    @property
    def layers(self) -> list[str]:
        return list(self.manifest["layer_dims"])

    @property
    def dim(self) -> int:
        return int(self.manifest["layer_dims"][FINAL])

    def __len__(self) -> int:
        return int(self.manifest["n_rows"])

    def nbytes(self) -> int:
        return sum(int(f["bytes"]) for s in self.manifest["shards"] for f in s["files"].values())

    # -- data ---------------------------------------------------------------------------------
    def array(self, layer: str = FINAL) -> ShardedArray:
        dims = self.manifest["layer_dims"]
        if layer not in dims:
            raise StoreError(f"{self.root}: layer {layer!r} was not extracted; available: {list(dims)}")
        files = [array_path(self.root, self.modality, layer, s["shard"]) for s in self.manifest["shards"]]
        return ShardedArray(files, int(dims[layer]), np.dtype(self.manifest["dtype"]))

    def metadata(self, columns: Sequence[str] | None = None) -> dict[str, list[Any]]:
        """Concatenated metadata columns (``index``, ``id`` and the item column named by the modality)."""
        out: dict[str, list[Any]] = {}
        for s in self.manifest["shards"]:
            t = pq.read_table(metadata_path(self.root, s["shard"]), columns=list(columns) if columns else None)
            for k, v in t.to_pydict().items():
                out.setdefault(k, []).extend(v)
        return out

    @property
    def index(self) -> np.ndarray:
        """Item index of each stored row (its position in ``Dataset.unique_items``)."""
        if not hasattr(self, "_index"):
            self._index = np.asarray(self.metadata(["index"]).get("index", []), dtype=np.int64)
        return self._index

    def items(self) -> list[str]:
        """The item of each stored row: its image path, caption, audio path or vector key."""
        return [str(t) for t in self.metadata([self.modality])[self.modality]]

    @property
    def skipped(self) -> list[dict[str, Any]]:
        return list(self.manifest.get("skipped", []))

    # -- integrity ----------------------------------------------------------------------------
    def check(self, checksums: bool = True) -> None:
        """Every shard file exists with the size (and, if asked, the sha256) the manifest records."""
        for s in self.manifest["shards"]:
            for rel, info in s["files"].items():
                f = self.root / rel
                if not f.exists():
                    raise StoreError(f"{self.root}: shard file {rel} is missing")
                if f.stat().st_size != int(info["bytes"]):
                    raise StoreError(f"{self.root}: shard file {rel} has {f.stat().st_size} bytes, manifest says {info['bytes']}")
                if checksums and sha256_file(f) != info["sha256"]:
                    raise StoreError(f"{self.root}: checksum mismatch in {rel} (file changed or corrupt; delete the store and extract again)")

    def check_finite(self, layer: str = FINAL) -> None:
        """Raise naming the first rows holding NaN/Inf (a store edited or produced by another tool)."""
        bad: list[int] = []
        offset = 0
        for chunk in self.array(layer).chunks():
            rows = np.where(~np.isfinite(chunk.astype(np.float32)).all(axis=1))[0]
            bad.extend((rows + offset).tolist())
            offset += len(chunk)
        if bad:
            raise StoreError(f"{self.root}: {len(bad)} row(s) of layer {layer!r} hold NaN/Inf, first: {bad[:5]}")
