"""Near-duplicate removal on cached features, usable on its own or before :func:`curate`.

Web-scale pair pools repeat the same image or caption many times; duplicates waste the budget and make
contrastive batches hold false negatives. The rule is greedy in row order -- a row is dropped when its
cosine to an *earlier kept* row reaches the threshold -- so the result is deterministic, the first
occurrence survives, and a chain a~b~c with a !~ c keeps a and c (b is dropped by a, c is compared
only with kept rows).

Cost: rows are processed ``chunk`` at a time. Each chunk is compared exhaustively with the rows kept so
far (faiss ``IndexFlatIP`` range search) and with itself (a chunk x chunk matrix), so time is O(N*K*d)
for K kept rows -- about N^2*d/2 when few rows are duplicates (1M x 384: ~2e14 flops, tens of minutes to
an hour on a few CPU cores) -- and memory is O(K*d) fp32 for the index (1M x 384: 1.5 GB per modality)
plus O(chunk^2 + chunk*d) per step, independent of N otherwise.
"""
from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

from .concepts import CurateInputError, CurateOptionError, _as_rows, _unit

__all__ = ["dedup_pairs", "near_duplicates"]


def _greedy(views: list[tuple[Any, float]], combine: Literal["all", "any"], chunk: int):
    """Greedy in-order dedup over one or more row-aligned views. A row j is a duplicate of an earlier
    kept row i when cos >= threshold holds in every view (``all``) or in any view (``any``).
    Returns (keep mask, representative = earliest kept row each dropped row duplicates, itself if kept)."""
    import faiss

    N = views[0][0].shape[0]
    for f, thr in views:
        if f.shape[0] != N:
            raise CurateInputError(f"paired features must have the same rows, got {N} and {f.shape[0]}")
        if not -1.0 <= thr <= 1.0:
            raise CurateOptionError(f"threshold must be a cosine in [-1, 1], got {thr}")
    if chunk < 1:
        raise CurateOptionError(f"chunk must be >= 1, got {chunk}")
    indexes = [faiss.IndexFlatIP(f.shape[1]) for f, _ in views]
    kept_rows = np.zeros(0, dtype=np.int64)  # global row of each index entry
    keep = np.zeros(N, dtype=bool)
    rep = np.arange(N, dtype=np.int64)
    for s in range(0, N, chunk):
        xs = [_unit(f[s : s + chunk], "features", offset=s) for f, _ in views]
        n = len(xs[0])
        ext: list[np.ndarray] = []  # keys j_local * N + i_global, i an earlier kept row
        inn: list[np.ndarray] = []  # keys j_local * n + i_local, i < j inside this chunk
        for (_, thr), x, index in zip(views, xs, indexes):
            if index.ntotal:
                lims, D, I = index.range_search(x, float(thr) - 1e-6)
                j = np.repeat(np.arange(n), np.diff(lims).astype(np.int64))
                hit = D >= thr
                ext.append(np.unique(j[hit] * N + kept_rows[I[hit].astype(np.int64)]))
            else:
                ext.append(np.zeros(0, dtype=np.int64))
            t = torch.from_numpy(x)
            G = torch.triu(t @ t.T >= thr, diagonal=1).numpy()  # G[i, j]: i < j
            i_l, j_l = np.nonzero(G)
            inn.append(np.unique(j_l.astype(np.int64) * n + i_l))
        join = np.intersect1d if combine == "all" else np.union1d
        e, m = ext[0], inn[0]
        for a, b in zip(ext[1:], inn[1:]):
            e, m = join(e, a), join(m, b)
        local_keep = np.ones(n, dtype=bool)
        if len(e):  # keys sorted, so the first key per j holds its earliest kept partner
            j_e, first = np.unique(e // N, return_index=True)
            local_keep[j_e] = False
            rep[s + j_e] = e[first] % N
        if len(m):
            j_m, i_m = m // n, m % n
            bounds = np.flatnonzero(np.diff(j_m)) + 1
            for js, ii in zip(np.split(j_m, bounds), np.split(i_m, bounds)):
                j = int(js[0])
                if not local_keep[j]:
                    continue
                partners = ii[local_keep[ii]]
                if len(partners):
                    local_keep[j] = False
                    rep[s + j] = s + int(partners.min())
        keep[s : s + n] = local_keep
        new = np.flatnonzero(local_keep)
        for x, index in zip(xs, indexes):
            index.add(np.ascontiguousarray(x[new]))
        kept_rows = np.concatenate([kept_rows, s + new])
    return keep, rep


def near_duplicates(
    features: Any, threshold: float = 0.95, chunk: int = 4096, return_representative: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Keep mask (bool, N) dropping rows whose cosine to an earlier kept row is >= ``threshold``.

    ``features`` may be an ndarray, memmap, ShardedArray or FeatureStore (read ``chunk`` rows at a
    time). With ``return_representative`` also returns, per row, the earliest kept row it duplicates
    (itself when kept), i.e. the duplicate groups. Floating-point rounding puts exact copies at cosine
    ~1 - 1e-7, so use e.g. 0.9999 rather than 1.0 to catch only exact copies. See the module docstring
    for time and memory.
    """
    keep, rep = _greedy([(_as_rows(features), float(threshold))], "all", int(chunk))
    return (keep, rep) if return_representative else keep


def dedup_pairs(
    img: Any,
    txt: Any,
    threshold_img: float = 0.95,
    threshold_txt: float = 0.98,
    mode: Literal["both", "either"] = "both",
    chunk: int = 4096,
) -> np.ndarray:
    """Row ids (ascending) of the image-text pairs kept after greedy pair-level dedup.

    ``mode="both"``: a pair is dropped when one earlier kept pair is a near copy in image *and* text
    (same picture re-captioned differently survives). ``mode="either"``: dropped when an earlier kept
    pair matches in image *or* in text (stricter; removes re-used images and boilerplate captions).
    """
    if mode not in ("both", "either"):
        raise CurateOptionError(f"mode must be 'both' or 'either', got {mode!r}")
    views = [(_as_rows(img), float(threshold_img)), (_as_rows(txt), float(threshold_txt))]
    keep, _ = _greedy(views, "all" if mode == "both" else "any", int(chunk))
    return np.flatnonzero(keep).astype(np.int64)
