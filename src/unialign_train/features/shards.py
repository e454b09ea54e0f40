"""Encoding shards: read one shard's items, run the encoder, write the shard's files and completion record.

The one code path of both executors (the local one in :mod:`.extract`, Ray actors in
:mod:`.ray_executor`), so the stores they write are byte-identical. A shard's bytes depend only on its
items (batches never cross a shard), which is what makes a killed and resumed extraction end
byte-identical to an uninterrupted one.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from unialign.device import autocast
from unialign.encoders.base import Encoder
from unialign.errors import DataError, ImageLoadError
from unialign.io import atomic_path, read_json, sha256_file, write_json

from .store import array_path, metadata_path, shard_record_path

DTYPES = {"float16": np.float16, "float32": np.float32}


def encode_shards(root: Path, key: dict[str, Any], items: Sequence[dict[str, Any]], encoder: Encoder,
                  shards: Sequence[int], batch_size: int, num_workers: int | None, strict: bool,
                  progress: Callable[[int], Any] | None = None) -> None:
    """Read, encode and write the given shards (each complete, with its completion record): the one
    code path of both executors. ``items[i]`` must hold item ``i`` for every item of these shards."""
    n, shard_size = key["dataset"]["n_items"], key["shard_size"]
    writer: _ShardWriter | None = None
    for shard, idx, batch, failures in _batches(items, encoder, key["modality"], shards, n, shard_size, batch_size,
                                                num_workers):
        if writer is None or writer.shard != shard:
            writer = _ShardWriter(root, key, shard)
        writer.add(encoder, idx, batch, failures, items, strict)
        if progress is not None:
            progress(len(idx) + len(failures))


def shard_len(s: int, n: int, size: int) -> int:
    return max(0, min(n, (s + 1) * size) - s * size)


class _LoadedItems(TorchDataset):
    """Worker-side loading: returns (index, tensor or None, failure reason or None)."""

    def __init__(self, items: Sequence[dict[str, Any]], modality: str, load: Any):
        self.items, self.modality, self.load = items, modality, load

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return i, self.load(self.items[i][self.modality]), None
        except ImageLoadError as e:
            return i, None, e.reason
        except DataError as e:
            return i, None, str(e)
        except Exception as e:  # a preprocess failure on a readable file is still this item's fault
            return i, None, f"preprocessing failed ({type(e).__name__}: {e})"


def _collate(rows: list[tuple[int, torch.Tensor | None, str | None]]) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    ok = [(i, t) for i, t, err in rows if err is None]
    bad = [(i, err) for i, t, err in rows if err is not None]
    batch = torch.stack([t for _, t in ok]) if ok else None
    return [i for i, _ in ok], batch, bad


def _batch_plan(todo: Sequence[int], n: int, shard_size: int, batch_size: int,
                size_of: Callable[[int], int] | None = None) -> list[list[int]]:
    """Batches of item indices, shard by shard. With ``size_of`` (texts: their length) a shard's items
    are batched longest first, so each batch pads to a length close to its members' own: fewer padding
    tokens to compute (a third of the tokens on the emoji captions). Batches still never cross a shard,
    and the writer puts rows back in item order, so a shard's bytes depend only on its items."""
    plan = []
    for s in todo:
        idx = list(range(s * shard_size, min(n, (s + 1) * shard_size)))
        if size_of is not None:
            idx.sort(key=lambda i: -size_of(i))  # stable: equal lengths keep item order
        plan.extend(idx[b : b + batch_size] for b in range(0, len(idx), batch_size))
    return plan


def _batches(items: Sequence[dict[str, Any]], encoder: Encoder, modality: str, todo: Sequence[int], n: int,
             shard_size: int, batch_size: int, num_workers: int | None
             ) -> Iterator[tuple[int, list[int], Any, list[tuple[int, str]]]]:
    load = encoder.loader()
    if load is None:  # text (batched by length) or vector keys: the batch is the list of items
        size_of = (lambda i: len(items[i][modality])) if modality == "text" else None
        plan = _batch_plan(todo, n, shard_size, batch_size, size_of)
        for b in plan:
            yield b[0] // shard_size, b, [items[i][modality] for i in b], []
        return
    plan = _batch_plan(todo, n, shard_size, batch_size)
    if num_workers is None:
        num_workers = min(4, max(1, (os.cpu_count() or 2) - 1))
    loader = DataLoader(
        _LoadedItems(items, modality, load),
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
        self.expected = shard_len(shard, n, size)
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
        where = item.get(self.key["modality"]) or item.get("id")
        if strict:
            raise DataError(f"{where}: {reason} (run without --strict to skip such items and list them in the manifest)")
        self.skipped.append({"index": item["index"], "id": item["id"], "path": where, "reason": reason})

    def _write(self, items: Sequence[dict[str, Any]]) -> None:
        modality = self.key["modality"]
        files: dict[str, dict[str, Any]] = {}
        order = np.argsort(np.asarray(self.rows, dtype=np.int64), kind="stable")  # batches may come in any order
        self.rows = [self.rows[i] for i in order]
        for l in self.layers:
            parts = self.arrays[l]
            arr = np.concatenate(parts)[order] if parts else np.zeros((0, self.key["layer_dims"][l]), DTYPES[self.dtype])
            path = array_path(self.root, modality, l, self.shard)
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, np.ascontiguousarray(arr))
            files[str(path.relative_to(self.root))] = _file_info(path)
        meta = {"index": [items[i]["index"] for i in self.rows], "id": [items[i]["id"] for i in self.rows],
                modality: [items[i][modality] for i in self.rows]}
        mpath = metadata_path(self.root, self.shard)
        with atomic_path(mpath) as tmp:
            pq.write_table(pa.table(meta), tmp)
        files[str(mpath.relative_to(self.root))] = _file_info(mpath)
        write_json(shard_record_path(self.root, self.shard),
                   {"shard": self.shard, "rows": len(self.rows), "files": files, "skipped": self.skipped})


def _file_info(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def shard_done(root: Path, shard: int) -> bool:
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


__all__ = ["DTYPES", "encode_shards", "shard_done", "shard_len"]
