"""Run a frozen encoder once over a dataset into a :class:`FeatureStore`, resumably.

Why it is built this way:
- Work is cut into fixed shards of ``shard_size`` dataset items, and batches never cross a shard, so
  a shard's bytes depend only on its items: a run killed at any point and resumed ends byte-identical
  to an uninterrupted one. Each shard's files are written atomically, then its completion record; the
  manifest is written last, so a store with a manifest is always complete.
- Images are decoded and preprocessed in DataLoader workers (``Encoder.preprocess`` is picklable), so
  the encoder does not wait on PNG decoding.
- Bad items (unreadable image, non-finite output) are skipped, counted and listed, or raise naming the
  item with ``strict=True``; shards already written are kept either way.
- Two executors run the same :func:`encode_shards` (read -> encode -> write one shard at a time):
  ``"local"`` in this process, ``"ray"`` in a Ray Data actor pool (``ray_executor.py``), so the stores
  they write are byte-identical.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .. import paths
from ..data.base import PairDataset, load_image
from ..device import autocast
from ..encoders.base import FINAL, Encoder
from ..errors import DataError, ImageLoadError, StoreError
from ..io import atomic_path, read_json, remove_stale_tmp, sha256_file, write_json
from .store import FORMAT_VERSION, FeatureStore, array_path, metadata_path, shard_record_path

DTYPES = {"float16": np.float16, "float32": np.float32}


def store_key(dataset: PairDataset, encoder: Encoder, layers: Sequence[str], dtype: str, shard_size: int) -> dict[str, Any]:
    """Everything that determines a store's content; a store is reused only when this matches."""
    return {
        "encoder": encoder.config(),
        "modality": encoder.modality,
        "layers": list(layers),
        "layer_dims": {l: int(encoder.layer_dims[l]) for l in layers},
        "dtype": dtype,
        "shard_size": shard_size,
        "dataset": {"name": dataset.name, "fingerprint": dataset.fingerprint(), "n_items": _n_items(dataset, encoder)},
    }


def default_store_path(dataset: PairDataset, encoder: Encoder, layers: Sequence[str] = (FINAL,), dtype: str = "float16",
                       shard_size: int = 4096) -> Path:
    """``$UNIALIGN_HOME/features/<dataset>/<encoder>-<hash>``: a new folder whenever inputs change."""
    return _path_for_key(dataset, encoder, store_key(dataset, encoder, layers, dtype, shard_size))


def _path_for_key(dataset: PairDataset, encoder: Encoder, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    slug = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in encoder.spec)[:60]
    return paths.features_dir() / dataset.name / f"{slug}-{digest}"


def extract(
    dataset: PairDataset,
    encoder: Encoder,
    out: str | Path | None = None,
    *,
    layers: Sequence[str] = (FINAL,),
    shard_size: int = 4096,
    batch_size: int = 64,
    dtype: str = "float16",
    num_workers: int | None = None,
    strict: bool = False,
    overwrite: bool = False,
    show_progress: bool = True,
    executor: str = "local",
    concurrency: int | None = None,
) -> FeatureStore:
    """Encode ``dataset`` (its images, or its unique captions for a text encoder) into a store.

    A rerun with the same inputs returns the existing store at once; an interrupted run resumes from
    the last complete shard. ``overwrite`` replaces a store built from other inputs.

    ``executor="ray"`` encodes the missing shards in a Ray Data actor pool of ``concurrency`` actors
    (default: one per GPU when CUDA is present, else one per CPU of the Ray cluster), each holding the
    encoder; it joins a running Ray instance or starts a local one. The store is the same either way.
    """
    if executor not in ("local", "ray"):
        raise StoreError(f"executor must be 'local' or 'ray', got {executor!r}")
    if dtype not in DTYPES:
        raise StoreError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if shard_size < 1 or batch_size < 1:
        raise StoreError("shard_size and batch_size must be >= 1")
    layers = list(dict.fromkeys([FINAL, *layers]))
    encoder.check_layers(layers)
    key = store_key(dataset, encoder, layers, dtype, shard_size)  # fingerprints the dataset: once per call
    root = Path(out) if out is not None else _path_for_key(dataset, encoder, key)
    _claim(root, key, overwrite)
    if (root / "manifest.json").exists():
        return FeatureStore.open(root)

    n = key["dataset"]["n_items"]
    n_shards = max(1, -(-n // shard_size))
    todo = [s for s in range(n_shards) if not _shard_done(root, s)]
    items = _items(dataset, encoder)
    if executor == "ray" and todo:
        from .ray_executor import run_ray

        run_ray(root, key, items, encoder, todo, batch_size=batch_size, num_workers=num_workers, strict=strict,
                concurrency=concurrency, show_progress=show_progress)
        return _finish(root, key, n_shards)
    bar = tqdm(total=sum(_shard_len(s, n, shard_size) for s in todo), unit=encoder.modality, disable=not show_progress,
               desc=f"extract {encoder.spec}", smoothing=0.1)
    try:
        encode_shards(root, key, items, encoder, todo, batch_size, num_workers, strict, bar.update)
    finally:
        bar.close()  # ends the bar's line, so an error message starts on a line of its own
    return _finish(root, key, n_shards)


def encode_shards(root: Path, key: dict[str, Any], items: Sequence[dict[str, Any]], encoder: Encoder,
                  shards: Sequence[int], batch_size: int, num_workers: int | None, strict: bool,
                  progress: Callable[[int], Any] | None = None) -> None:
    """Read, encode and write the given shards (each complete, with its completion record): the one
    code path of both executors. ``items[i]`` must hold item ``i`` for every item of these shards."""
    n, shard_size = key["dataset"]["n_items"], key["shard_size"]
    writer: _ShardWriter | None = None
    for shard, idx, batch, failures in _batches(items, encoder, shards, n, shard_size, batch_size, num_workers):
        if writer is None or writer.shard != shard:
            writer = _ShardWriter(root, key, shard)
        writer.add(encoder, idx, batch, failures, items, strict)
        if progress is not None:
            progress(len(idx) + len(failures))


# -- what is encoded ----------------------------------------------------------------------------
def _n_items(dataset: PairDataset, encoder: Encoder) -> int:
    return len(dataset) if encoder.modality == "image" else len(dataset.texts())


def _items(dataset: PairDataset, encoder: Encoder) -> list[dict[str, Any]]:
    """One dict per store item: dataset records (image) or unique caption strings (text)."""
    if encoder.modality == "image":
        return [{"index": i, "id": str(r["id"]), "image": str(dataset.image_path(i))} for i, r in enumerate(dataset.records)]
    return [{"index": i, "id": str(i), "text": t} for i, t in enumerate(dataset.texts())]


def _shard_len(s: int, n: int, size: int) -> int:
    return max(0, min(n, (s + 1) * size) - s * size)


class _ImageItems(Dataset):
    """Worker-side decoding: returns (index, tensor or None, failure reason or None)."""

    def __init__(self, items: Sequence[dict[str, Any]], preprocess: Any):
        self.items, self.preprocess = items, preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return i, self.preprocess(load_image(self.items[i]["image"])), None
        except ImageLoadError as e:
            return i, None, e.reason
        except Exception as e:  # a preprocess failure on a readable image is still this item's fault
            return i, None, f"preprocessing failed ({type(e).__name__}: {e})"


def _collate(rows: list[tuple[int, torch.Tensor | None, str | None]]) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    ok = [(i, t) for i, t, err in rows if err is None]
    bad = [(i, err) for i, t, err in rows if err is not None]
    batch = torch.stack([t for _, t in ok]) if ok else None
    return [i for i, _ in ok], batch, bad


def _batch_plan(todo: Sequence[int], n: int, shard_size: int, batch_size: int) -> list[list[int]]:
    plan = []
    for s in todo:
        start, stop = s * shard_size, min(n, (s + 1) * shard_size)
        plan.extend(list(range(b, min(stop, b + batch_size))) for b in range(start, stop, batch_size))
    return plan


def _batches(items: Sequence[dict[str, Any]], encoder: Encoder, todo: Sequence[int], n: int, shard_size: int,
             batch_size: int, num_workers: int | None) -> Iterator[tuple[int, list[int], Any, list[tuple[int, str]]]]:
    plan = _batch_plan(todo, n, shard_size, batch_size)
    if encoder.modality == "text":
        for b in plan:
            yield b[0] // shard_size, b, [items[i]["text"] for i in b], []
        return
    if num_workers is None:
        num_workers = min(4, max(1, (os.cpu_count() or 2) - 1))
    loader = DataLoader(
        _ImageItems(items, encoder.preprocess()),
        batch_sampler=plan,
        num_workers=num_workers,
        collate_fn=_collate,
        prefetch_factor=4 if num_workers else None,
        pin_memory=encoder.device.type == "cuda",
    )
    for b, (idx, batch, bad) in zip(plan, loader):
        yield b[0] // shard_size, idx, batch, bad


# -- writing ------------------------------------------------------------------------------------
class _ShardWriter:
    """Accumulates one shard's rows; writes its files and completion record when the shard is full."""

    def __init__(self, root: Path, key: dict[str, Any], shard: int):
        self.root, self.key, self.shard = root, key, shard
        self.layers, self.dtype = list(key["layers"]), key["dtype"]
        n, size = key["dataset"]["n_items"], key["shard_size"]
        self.expected = _shard_len(shard, n, size)
        self.seen = 0
        self.rows: list[int] = []
        self.arrays: dict[str, list[np.ndarray]] = {l: [] for l in self.layers}
        self.skipped: list[dict[str, Any]] = []

    def add(self, encoder: Encoder, idx: list[int], batch: Any, failures: list[tuple[int, str]],
            items: Sequence[dict[str, Any]], strict: bool) -> None:
        for i, reason in failures:
            self._skip(items[i], reason, strict)
        if idx:
            with torch.inference_mode(), autocast(encoder.device):
                if isinstance(batch, torch.Tensor):
                    batch = batch.to(encoder.device, non_blocking=True)
                out = {k: v.float().cpu().numpy() for k, v in encoder.forward(batch, self.layers).items()}
            with np.errstate(over="ignore"):  # checked after the cast: float16 overflows to Inf above 65504
                out = {k: v.astype(DTYPES[self.dtype]) for k, v in out.items()}
            finite = np.ones(len(idx), dtype=bool)
            for v in out.values():
                finite &= np.isfinite(v).all(axis=1)
            for j in np.where(~finite)[0]:
                self._skip(items[idx[j]], f"encoder output holds NaN/Inf (in {self.dtype})", strict)
            self.rows.extend(i for i, f in zip(idx, finite) if f)
            for l in self.layers:
                self.arrays[l].append(out[l][finite])
        self.seen += len(idx) + len(failures)
        if self.seen >= self.expected:
            self._write(items)

    def _skip(self, item: dict[str, Any], reason: str, strict: bool) -> None:
        where = item.get("image") or item.get("id")
        if strict:
            raise DataError(f"{where}: {reason} (run without --strict to skip such items and list them in the manifest)")
        self.skipped.append({"index": item["index"], "id": item["id"], "path": where, "reason": reason})

    def _write(self, items: Sequence[dict[str, Any]]) -> None:
        modality = self.key["modality"]
        files: dict[str, dict[str, Any]] = {}
        for l in self.layers:
            parts = self.arrays[l]
            arr = np.concatenate(parts) if parts else np.zeros((0, self.key["layer_dims"][l]), DTYPES[self.dtype])
            path = array_path(self.root, modality, l, self.shard)
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, np.ascontiguousarray(arr))
            files[str(path.relative_to(self.root))] = _file_info(path)
        meta = {"index": [items[i]["index"] for i in self.rows], "id": [items[i]["id"] for i in self.rows]}
        col = "image" if modality == "image" else "text"
        meta[col] = [items[i][col] for i in self.rows]
        mpath = metadata_path(self.root, self.shard)
        with atomic_path(mpath) as tmp:
            pq.write_table(pa.table(meta), tmp)
        files[str(mpath.relative_to(self.root))] = _file_info(mpath)
        write_json(shard_record_path(self.root, self.shard),
                   {"shard": self.shard, "rows": len(self.rows), "files": files, "skipped": self.skipped})


def _file_info(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def _claim(root: Path, key: dict[str, Any], overwrite: bool) -> None:
    """Record what this folder holds; refuse (or, with overwrite, wipe) a folder holding other inputs."""
    plan = root / "shards" / "plan.json"
    if (root / "shards").is_dir():
        remove_stale_tmp(root)  # half-written files of a killed run
    if plan.exists():
        old = read_json(plan)
        if old == json.loads(json.dumps(key)):
            return
        if not overwrite:
            diff = [k for k in key if old.get(k) != json.loads(json.dumps(key[k]))]
            raise StoreError(f"{root} holds features of other inputs (differs in: {', '.join(diff)}); "
                             "pass overwrite=True / --overwrite to replace it, or choose another folder")
        shutil.rmtree(root)
    elif root.exists() and any(f.is_file() for f in root.rglob("*")) and not overwrite:  # empty folders: ours
        raise StoreError(f"{root} exists and is not a unialign store; choose an empty folder or pass --overwrite")
    elif root.exists() and overwrite:
        shutil.rmtree(root)
    write_json(plan, key)


def _shard_done(root: Path, shard: int) -> bool:
    """A shard counts as done when its record exists and every file it lists has the recorded size
    and checksum; anything else is redone."""
    rec_path = shard_record_path(root, shard)
    if not rec_path.exists():
        return False
    rec = read_json(rec_path)
    for rel, info in rec["files"].items():
        f = root / rel
        if not f.exists() or f.stat().st_size != info["bytes"] or sha256_file(f) != info["sha256"]:
            rec_path.unlink()
            return False
    return True


def _finish(root: Path, key: dict[str, Any], n_shards: int) -> FeatureStore:
    shards, skipped = [], []
    for s in range(n_shards):
        rec = read_json(shard_record_path(root, s))
        shards.append({"shard": s, "rows": rec["rows"], "files": rec["files"]})
        skipped.extend(rec["skipped"])
    manifest = {
        "format_version": FORMAT_VERSION,
        **key,
        "n_rows": sum(s["rows"] for s in shards),
        "n_skipped": len(skipped),
        "skipped": skipped,
        "shards": shards,
    }
    write_json(root / "manifest.json", manifest)
    return FeatureStore.open(root)
