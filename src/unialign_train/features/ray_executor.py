"""Extraction through Ray Data: the same shard code as the local executor, run in an actor pool.

The Ray dataset holds one row per missing shard (its number and its items, as JSON). ``map_batches``
sends each row to :class:`ShardEncoder`, a callable class: every actor deserialises the frozen encoder
once, in its constructor, and then calls :func:`~unialign_train.features.shards.encode_shards` on one shard
per call, which reads, encodes and writes the shard's files and completion record exactly as the local
executor does. Hence the store is byte-identical whichever executor wrote it, a killed run resumes
from its complete shards under either executor, and the driver writes the manifest at the end.

Actors ask for ``num_gpus=1`` each when CUDA is present (one actor per GPU), else as many CPUs as the
driver runs torch threads (so actors never oversubscribe cores). CPU actors run torch with the driver's
intra-op thread count (also exported as ``OMP_NUM_THREADS``, which Ray otherwise sets to 1):
convolution results (oneDNN) change in the last bits with the thread count, so any other count would
break byte-identity with the local executor. The encoder runs on the device it was built on in the driver (built
with ``device="auto"`` on a CUDA machine, it unpickles onto each actor's GPU). Decoding happens inside the actor (``num_workers=0``), so an actor is
one unit of work on one CPU. The same code runs on a laptop (``ray.init()`` local) and on a cluster
(``ray.init(address=...)`` before calling ``extract``, or ``RAY_ADDRESS``) when the store folder is
on storage every node can write.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from unialign.encoders.base import Encoder
from unialign.errors import DataError, StoreError
from unialign.io import read_json
from .shards import encode_shards
from .store import shard_record_path


class _Window:
    """Items ``start .. start + len(items) - 1`` addressed by their global index (one shard's items)."""

    def __init__(self, start: int, items: list[dict[str, Any]]):
        self.start, self.items = start, items

    def __len__(self) -> int:
        return self.start + len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i - self.start]


class ShardEncoder:
    """Ray Data callable class: holds the encoder (loaded once per actor) and encodes whole shards."""

    def __init__(self, root: str, key: dict[str, Any], encoder_ref: Any, batch_size: int, num_workers: int,
                 strict: bool, threads: int | None = None):
        import ray
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.encoder: Encoder = ray.get(encoder_ref[0]) if isinstance(encoder_ref, list) else encoder_ref
        self.root, self.key = Path(root), key
        self.batch_size, self.num_workers, self.strict = batch_size, num_workers, strict

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from unialign.errors import UnialignError

        shards, rows, errors = [], [], []
        for shard, start, payload in zip(batch["shard"], batch["start"], batch["items"]):
            shard = int(shard)
            try:
                encode_shards(self.root, self.key, _Window(int(start), json.loads(payload)), self.encoder, [shard],
                              self.batch_size, self.num_workers, self.strict)
                rows.append(int(read_json(shard_record_path(self.root, shard))["rows"]))
                errors.append("")
            except UnialignError as e:  # reported by the driver as the same error type
                rows.append(-1)
                errors.append(f"{type(e).__name__}: {e}")
            shards.append(shard)
        return {"shard": np.asarray(shards, np.int64), "rows": np.asarray(rows, np.int64),
                "error": np.asarray(errors, dtype=object)}


def run_ray(root: Path, key: dict[str, Any], items: Sequence[dict[str, Any]], encoder: Encoder, todo: Sequence[int], *,
            batch_size: int, num_workers: int | None = None, strict: bool = False, concurrency: int | None = None,
            show_progress: bool = True, cpus_per_actor: float = 1.0) -> list[dict[str, Any]]:
    """Encode shards ``todo`` into ``root`` with a Ray Data actor pool; returns one record per shard.

    Joins the running Ray instance (``ray.init`` done by the caller, or ``RAY_ADDRESS``) or starts a
    local one."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise StoreError("executor='ray' needs Ray: pip install 'unialign[ray]' (or run scripts/setup.sh)") from None
    import torch

    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True, log_to_driver=show_progress,
                 include_dashboard=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(show_progress)
    resources = ray.cluster_resources()
    use_gpu = bool(resources.get("GPU", 0)) and torch.cuda.is_available()
    threads = torch.get_num_threads()
    if not use_gpu:  # each CPU actor runs the driver's thread count (same bytes), so it reserves that many CPUs
        cpus_per_actor = max(cpus_per_actor, float(threads))
    if concurrency is None:
        slots = resources.get("GPU", 1) if use_gpu else resources.get("CPU", 1) // cpus_per_actor
        concurrency = int(max(1, min(len(todo), slots)))
    n, size = key["dataset"]["n_items"], key["shard_size"]
    rows = []
    for s in todo:
        start, stop = s * size, min(n, (s + 1) * size)
        rows.append({"shard": int(s), "start": start, "items": json.dumps([items[i] for i in range(start, stop)])})
    # the encoder travels once through the object store (wrapped in a list so Ray passes the reference)
    encoder_ref = [ray.put(encoder)]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    ds = ds.map_batches(
        ShardEncoder,
        fn_constructor_kwargs={"root": str(root), "key": key, "encoder_ref": encoder_ref, "batch_size": batch_size,
                               "num_workers": 0 if num_workers is None else num_workers, "strict": strict,
                               # oneDNN results depend on the intra-op thread count: use the driver's, so
                               # the bytes equal the local executor's
                               "threads": None if use_gpu else threads},
        batch_size=1,
        concurrency=concurrency,
        num_gpus=1 if use_gpu else 0,
        num_cpus=cpus_per_actor,
        batch_format="numpy",
        # Ray sets OMP_NUM_THREADS=1 in workers; the actor's torch pool must match the driver's
        runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads)}} if not use_gpu else None,
    )
    done = sorted(ds.take_all(), key=lambda r: int(r["shard"]))
    failed = [r for r in done if r["error"]]
    if failed:
        msg = str(failed[0]["error"])
        kind, _, text = msg.partition(": ")
        raise (DataError if kind == "DataError" else StoreError)(text or msg)
    missing = sorted(set(int(s) for s in todo) - {int(r["shard"]) for r in done})
    if missing:
        raise StoreError(f"{root}: the Ray executor did not return shards {missing[:5]}; run again to resume")
    return [{"shard": int(r["shard"]), "rows": int(r["rows"])} for r in done]
