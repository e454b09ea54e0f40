"""Nearest-neighbour search by inner product: the one top-k and the one FAISS index builder.

Evaluation, the report, curation, selection probes and the server all rank with :func:`topk`;
``unialign index`` and large-scale evaluation build their FAISS index with :func:`build_index`.
Vectors are expected L2-normalised, so inner product is cosine similarity.

Which backend runs is decided here and nowhere else: exact search in torch (chunked matmul, so an
N x N similarity matrix is never held) unless a FAISS index is asked for; FAISS (``faiss-cpu``, an
optional dependency) is imported only then.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .errors import ConfigError

INDEX_KINDS = ("auto", "flat", "ivf", "hnsw")
HNSW_THRESHOLD = 100_000  # kind="auto": exact below this many vectors, HNSW from here on


def _tensor(x: Any) -> torch.Tensor:
    return (x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))).float()


def _f32(x: Any) -> np.ndarray:
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return np.ascontiguousarray(x, dtype=np.float32)


def topk(queries: Any, keys: Any, k: int, *, index: Any = None, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, indices) of the ``k`` keys with the largest inner product for each query, best first.

    Exact torch search by default, in chunks of queries sized so at most 64M similarities (256 MB) are
    held at once. ``index``: a FAISS index (from :func:`build_index`) over ``keys`` to search instead
    (``keys`` is then ignored); approximate for ``ivf`` / ``hnsw``. Ties are broken by torch/FAISS order.
    """
    if index is not None:
        k = min(int(k), int(index.ntotal))
        q = _f32(queries)
        parts = [index.search(q[s : s + 65536], k) for s in range(0, len(q), 65536)]
        if not parts:
            return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long)
        return (torch.from_numpy(np.concatenate([p[0] for p in parts])),
                torch.from_numpy(np.concatenate([p[1] for p in parts])).long())
    q, kk = _tensor(queries), _tensor(keys)
    k = min(int(k), len(kk))
    chunk = max(1, min(chunk, (1 << 26) // max(1, len(kk))))
    scores, idx = [], []
    for s in range(0, len(q), chunk):
        v, i = torch.topk(q[s : s + chunk] @ kk.T, k, dim=1)
        scores.append(v)
        idx.append(i)
    if not idx:
        return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long)
    return torch.cat(scores), torch.cat(idx)


def build_index(vectors: Any, kind: str = "auto", *, threshold: int = HNSW_THRESHOLD, nlist: int | None = None,
                nprobe: int | None = None, hnsw_m: int = 32, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """An inner-product FAISS index holding ``vectors`` (n, d), and a description of its parameters.

    ``flat``: exact. ``hnsw``: graph search (M ``hnsw_m``, efConstruction 80, efSearch 64). ``ivf``:
    ``nlist`` k-means cells (default about 4 sqrt(n), at least 39 training points each) trained on a
    seeded sample of at most 64 points per cell, ``nprobe`` of them searched (default nlist / 8).
    ``auto``: flat below ``threshold`` vectors, hnsw from there on.
    """
    import faiss

    if kind not in INDEX_KINDS:
        raise ConfigError(f"unknown index kind {kind!r}; choose one of {list(INDEX_KINDS)}")
    x = _f32(vectors)
    n, d = x.shape
    if kind == "auto":
        kind = "flat" if n < threshold else "hnsw"
    info: dict[str, Any] = {"kind": kind, "metric": "inner_product (cosine on normalised vectors)"}
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction, index.hnsw.efSearch = 80, 64
        info.update(m=hnsw_m, ef_construction=80, ef_search=64)
    else:
        nlist = int(nlist or max(1, min(int(4 * math.sqrt(n)), n // 39)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        index.train(x[np.sort(rng.choice(n, size=min(n, 64 * nlist), replace=False))])
        index.nprobe = int(nprobe or min(nlist, max(1, nlist // 8)))
        info.update(nlist=nlist, nprobe=index.nprobe)
    if n:
        if kind == "hnsw":
            _add_single_threaded(faiss, index, x)
        else:
            index.add(x)
    return index, info


def _add_single_threaded(faiss: Any, index: Any, x: np.ndarray) -> None:
    """HNSW insertion on one OpenMP thread. FAISS's parallel ``IndexHNSW.add`` can crash (SIGSEGV in
    ``HNSW::add_with_locks`` under OpenMP, faiss issue 5294); one CI run here died with a SIGSEGV in the
    test that builds an HNSW index beside PyTorch (it passed on rerun), and the parallel insertion's
    order of linking may depend on thread timing. One thread is safe and builds one graph per set;
    search stays parallel."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        index.add(x)
    finally:
        faiss.omp_set_num_threads(threads)


__all__ = ["HNSW_THRESHOLD", "INDEX_KINDS", "build_index", "topk"]
