"""Run a frozen encoder once over a dataset's items of one modality into a :class:`FeatureStore`, resumably.

Why it is built this way:
- Work is cut into fixed shards of ``shard_size`` dataset items, and batches never cross a shard, so
  a shard's bytes depend only on its items: a run killed at any point and resumed ends byte-identical
  to an uninterrupted one. Each shard's files are written atomically, then its completion record; the
  manifest is written last, so a store with a manifest is always complete.
- Media are decoded and preprocessed in DataLoader workers (``Encoder.loader`` is picklable), so the
  encoder does not wait on PNG decoding; text batches go to the encoder as lists of strings.
- Bad items (unreadable image, non-finite output) are skipped, counted and listed, or raise naming the
  item with ``strict=True``; shards already written are kept either way.
- Two executors run the same :func:`~.shards.encode_shards` (read -> encode -> write one shard at a time):
  ``"local"`` in this process, ``"ray"`` in a Ray Data actor pool (``ray_executor.py``), so the stores
  they write are byte-identical.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Sequence

from unialign import paths
from unialign.encoders.base import FINAL, Encoder
from unialign.errors import DataError, StoreError
from unialign.io import read_json, remove_stale_tmp, write_json
from unialign.progress import progress

from ..data.records import Dataset
from .shards import DTYPES, encode_shards, shard_done, shard_len
from .store import FORMAT_VERSION, FeatureStore, shard_record_path


def store_key(dataset: Dataset, encoder: Encoder, layers: Sequence[str], dtype: str, shard_size: int,
              modality: str | None = None) -> dict[str, Any]:
    """Everything that determines a store's content; a store is reused only when this matches.

    ``backend`` (torch, onnx, openvino) is part of it: backends agree to float32 rounding, not bit for
    bit, so a store is never resumed, reused or extended by another backend than the one that began it
    (its rows would otherwise mix two computations; the manifest says which one made them)."""
    modality = modality or encoder.modality
    return {
        "encoder": encoder.config(),
        "backend": encoder.backend,
        "modality": modality,
        "layers": list(layers),
        "layer_dims": {l: int(encoder.layer_dims[l]) for l in layers},
        "dtype": dtype,
        "shard_size": shard_size,
        "dataset": {"name": dataset.name, "fingerprint": dataset.fingerprint(modality),
                    "n_items": len(dataset.unique_items(modality))},
    }


def default_store_path(dataset: Dataset, encoder: Encoder, layers: Sequence[str] = (FINAL,), dtype: str = "float16",
                       shard_size: int = 4096, modality: str | None = None) -> Path:
    """``$UNIALIGN_HOME/features/<dataset>/<encoder>-<hash>``: a new folder whenever inputs change."""
    return _path_for_key(dataset, encoder, store_key(dataset, encoder, layers, dtype, shard_size, modality))


def superset_store(folder: Path, key: dict[str, Any]) -> FeatureStore | None:
    """A complete store in ``folder`` made from the same inputs as ``key`` but holding more layers, or None.

    Layers are pooled independently from one forward pass, so a store of layers ``final, block8 ..
    block15`` holds exactly what a store of ``final, block14, block15`` would (same encoder, backend,
    dtype, shard size and dataset fingerprint): choosing layers (``layers: auto``, ``last-N``) then costs
    no second extraction. A store that cannot be read is skipped, never used."""
    if not folder.is_dir():
        return None
    same = lambda d: json.loads(json.dumps({k: v for k, v in d.items() if k not in ("layers", "layer_dims")}, sort_keys=True))  # noqa: E731
    want, layers = same(key), set(key["layers"])
    for manifest in sorted(folder.glob("*/manifest.json")):
        try:
            m = json.loads(manifest.read_text(encoding="utf-8"))
            if layers <= set(m.get("layers", [])) and same({k: m.get(k) for k in key}) == want:
                return FeatureStore.open(manifest.parent)
        except (OSError, ValueError, StoreError):
            continue
    return None


def _path_for_key(dataset: Dataset, encoder: Encoder, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return paths.features_dir() / dataset.name / f"{paths.slug(encoder.spec)}-{digest}"


def extract(
    dataset: Dataset,
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
    modality: str | None = None,
) -> FeatureStore:
    """Encode ``dataset``'s distinct items of ``modality`` (default: the encoder's) into a store.

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
    modality = modality or encoder.modality
    if modality not in dataset.modalities and not (modality == "vector" and len(dataset)):
        raise DataError(f"{dataset.name} has no {modality} items (its modalities: {dataset.modalities})")
    key = store_key(dataset, encoder, layers, dtype, shard_size, modality)  # fingerprints the dataset: once per call
    root = Path(out) if out is not None else _path_for_key(dataset, encoder, key)
    if out is None and not overwrite and not (root / "manifest.json").exists():
        wider = superset_store(root.parent, key)
        if wider is not None:
            return wider
    _claim(root, key, overwrite)
    if (root / "manifest.json").exists():
        return FeatureStore.open(root)

    n = key["dataset"]["n_items"]
    n_shards = max(1, -(-n // shard_size))
    todo = [s for s in range(n_shards) if not shard_done(root, s)]
    items = _items(dataset, modality)
    if executor == "ray" and todo:
        from .ray_executor import run_ray

        run_ray(root, key, items, encoder, todo, batch_size=batch_size, num_workers=num_workers, strict=strict,
                concurrency=concurrency, show_progress=show_progress)
        return _finish(root, key, n_shards)
    bar = progress(total=sum(shard_len(s, n, shard_size) for s in todo), unit=modality, disable=not show_progress,
                   desc=f"extract {encoder.spec} [{encoder.backend}]")
    try:
        encode_shards(root, key, items, encoder, todo, batch_size, num_workers, strict, bar.update)
    finally:
        bar.close()  # ends the bar's line, so an error message starts on a line of its own
    return _finish(root, key, n_shards)


# -- what is encoded ----------------------------------------------------------------------------
def _items(dataset: Dataset, modality: str) -> list[dict[str, Any]]:
    """One dict per store item: its index, the id of the first record holding it, and the item."""
    first: dict[str, str] = {}
    for i, r in enumerate(dataset.records):
        for it in dataset.items(i, modality):
            first.setdefault(it, str(r["id"]))
    return [{"index": j, "id": rid, modality: it} for j, (it, rid) in enumerate(first.items())]


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
            was = old.get("backend", "torch")  # plans written before backends existed: torch
            why = f"; it was written by the {was} backend, this encoder runs on {key['backend']}" \
                if was != key["backend"] else ""
            raise StoreError(f"{root} holds features of other inputs (differs in: {', '.join(diff)}{why}); "
                             "pass overwrite=True / --overwrite to replace it, or choose another folder")
        shutil.rmtree(root)
    elif root.exists() and any(f.is_file() for f in root.rglob("*")) and not overwrite:  # empty folders: ours
        raise StoreError(f"{root} exists and is not a unialign store; choose an empty folder or pass --overwrite")
    elif root.exists() and overwrite:
        shutil.rmtree(root)
    write_json(plan, key)


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
