"""Concept-rich curation (Freeze-Align, REFERENCE.md section 1) on cached features.

Pick a training subset of ``budget`` pairs from a large pool so that every target concept is covered:

1. :func:`score_pool` -- cosine of every pool item (usually the caption embedding) to every concept
   prototype (the caller embeds class names / prompts with the same text encoder), keeping only each
   concept's top-K candidates. The pool is streamed in chunks with a running merge, so memory is
   O(C*K + chunk*C) and an N x C matrix is never formed: N = 20M, C = 2.7k would be 216 GB in fp32.
2. :func:`assign_rarest_first` -- concepts are visited from rarest (lowest K-th best score: even its
   K-th candidate barely matches) to commonest, each taking up to ``per_concept`` of its candidates not
   yet claimed. Rare concepts go first because common ones have plenty of alternatives; in the other
   order a common concept could take the only few pairs a rare one has.
3. :func:`fill_diverse` -- the remaining budget goes to pairs chosen for coverage of the feature space
   (farthest-point sampling or k-means), since natural caption variety is what helps retrieval.

Rows are *pool row ids* (positions in the array passed in); map them to dataset items with
``FeatureStore.index`` when the pool is a feature store.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from unialign.errors import ConfigError, DataError
from unialign.io import atomic_path, write_json

__all__ = [
    "Assignment",
    "CurateInputError",
    "CurateOptionError",
    "CurationResult",
    "assign_rarest_first",
    "curate",
    "fill_diverse",
    "report_path",
    "score_pool",
]

FillMethod = Literal["farthest", "kmeans"]


class CurateInputError(DataError, ValueError):
    """Features that cannot be curated (shape, dimension mismatch, NaN/Inf rows, empty pool)."""


class CurateOptionError(ConfigError, ValueError):
    """An invalid curation option (budget, top_k, per_concept, fill method, names)."""


# ----------------------------------------------------------------------------------------- helpers


def _as_rows(pool: Any) -> Any:
    """Anything row-sliceable with ``len`` and ``shape``: ndarray, memmap, ShardedArray, FeatureStore,
    torch tensor. Nothing is loaded here; chunks are read on demand."""
    if hasattr(pool, "array") and hasattr(pool, "manifest"):  # a FeatureStore: its final layer
        pool = pool.array()
    if isinstance(pool, torch.Tensor):
        pool = pool.detach().cpu().numpy()
    if not hasattr(pool, "shape") or not hasattr(pool, "__getitem__"):
        pool = np.asarray(pool)
    if len(pool.shape) != 2:
        raise CurateInputError(f"pool features must be 2-D (rows, dim), got shape {tuple(pool.shape)}")
    if pool.shape[0] == 0:
        raise CurateInputError("the pool is empty (0 rows)")
    return pool


def _unit(x: np.ndarray, what: str, offset: int = 0) -> np.ndarray:
    """float32 copy with unit rows (zero rows stay zero); NaN/Inf rows are an error naming them.
    Finiteness is checked on the row norms (one value per row) and only on failure row by row."""
    x = np.array(x, dtype=np.float32)  # always a copy: normalised in place below
    sq = np.einsum("ij,ij->i", x, x)
    if not np.isfinite(sq).all():
        bad = ~np.isfinite(x).all(axis=1)
        if bad.any():
            rows = (np.flatnonzero(bad) + offset)[:5].tolist()
            raise CurateInputError(f"{what}: {int(bad.sum())} row(s) hold NaN/Inf, first: {rows}")
        sq = np.square(np.linalg.norm(x.astype(np.float64), axis=1))  # huge but finite values
    x *= (1.0 / np.maximum(np.sqrt(sq), 1e-12)).astype(np.float32)[:, None]
    return x


def _prototypes(prototypes: Any, dim: int) -> np.ndarray:
    if isinstance(prototypes, torch.Tensor):
        prototypes = prototypes.detach().cpu().numpy()
    p = np.asarray(prototypes)
    if p.ndim == 1:
        p = p[None]
    if p.ndim != 2 or p.shape[0] == 0:
        raise CurateInputError(f"prototypes must be 2-D (concepts, dim) with at least one row, got {p.shape}")
    if p.shape[1] != dim:
        raise CurateInputError(
            f"dimension mismatch: pool features have dim {dim}, prototypes have dim {p.shape[1]} "
            "(embed the concept names with the same encoder and layer as the pool)"
        )
    return _unit(p, "prototypes")


def _merge_topk(idx_a: np.ndarray, val_a: np.ndarray, idx_b: np.ndarray, val_b: np.ndarray, k: int):
    """Row-wise merge of two candidate lists into the top-k by (score desc, index asc): the explicit
    index key is what makes ties deterministic whatever order chunks or torch.topk produced them in."""
    idx = np.concatenate([idx_a, idx_b], axis=1)
    val = np.concatenate([val_a, val_b], axis=1)
    order = np.lexsort((idx, -val), axis=-1)[:, :k]
    return np.take_along_axis(idx, order, 1), np.take_along_axis(val, order, 1)


def _topk_scan(pool: Any, queries: np.ndarray, k: int, chunk: int, exclude: np.ndarray | None = None):
    """Each query's top-k pool rows by cosine, streaming the pool; ``exclude`` (bool, N) rows are never
    returned. Where fewer than k rows qualify, the tail holds index -1 and score -inf."""
    n_rows = pool.shape[0]
    q = torch.from_numpy(queries)
    C = len(queries)
    top_i = np.full((C, 0), -1, dtype=np.int64)
    top_v = np.full((C, 0), -np.inf, dtype=np.float32)
    for s in range(0, n_rows, chunk):
        x = _unit(pool[s : s + chunk], "pool features", offset=s)
        S = q @ torch.from_numpy(x).T  # (C, n): O(chunk * C) memory
        if exclude is not None:
            S[:, torch.from_numpy(exclude[s : s + len(x)])] = -math.inf
        kk = min(k, S.shape[1])
        # One extra candidate shows whether rows tie with the k-th score across the cut, where
        # torch.topk picks arbitrarily; those concepts are redone with a stable sort so the lowest
        # row index wins (duplicated captions make such ties common).
        v, i = torch.topk(S, min(kk + 1, S.shape[1]), dim=1)
        v, i = v.numpy(), i.numpy().astype(np.int64)
        if v.shape[1] > kk:
            for c in np.flatnonzero(v[:, kk - 1] == v[:, kk]):
                row = S[c].numpy()
                order = np.argsort(-row, kind="stable")[: kk + 1]
                i[c], v[c] = order, row[order]
            v, i = v[:, :kk], i[:, :kk]
        del S, x  # before the next chunk is read, so two chunks' scores never coexist
        top_i, top_v = _merge_topk(top_i, top_v, i + s, v, k)
    top_i[~np.isfinite(top_v)] = -1
    return top_i, top_v


# ------------------------------------------------------------------------------------------ stages


def score_pool(pool: Any, prototypes: Any, top_k: int, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Each concept's ``top_k`` most similar pool rows by cosine (both sides L2-normalised).

    ``pool`` may be an ndarray, a memmap, a ShardedArray or a FeatureStore; it is read ``chunk`` rows
    at a time (fp16 is widened to fp32 per chunk) and merged into a running (C, K) list, so memory is
    O(C*K + chunk*C) and time O(N*C*d). Ties rank the lower row index first. ``top_k`` larger than the
    pool is clipped to the pool size.

    Returns ``(top_idx (C, K) int64, top_scores (C, K) float32)``, each row sorted by score descending.
    """
    pool = _as_rows(pool)
    if top_k < 1 or chunk < 1:
        raise CurateOptionError(f"top_k and chunk must be >= 1, got top_k={top_k}, chunk={chunk}")
    protos = _prototypes(prototypes, pool.shape[1])
    return _topk_scan(pool, protos, min(int(top_k), pool.shape[0]), int(chunk))


@dataclass
class Assignment:
    """Rows claimed by concepts: ``rows[i]`` was taken for concept ``concept[i]`` with cosine
    ``score[i]``; ``counts[c]`` pairs per concept; ``no_candidates`` lists concepts none of whose
    candidates reached ``min_score``; ``order`` is the rarest-first visiting order."""

    rows: np.ndarray
    concept: np.ndarray
    score: np.ndarray
    counts: np.ndarray
    no_candidates: list[int]
    order: np.ndarray


def assign_rarest_first(
    top_idx: np.ndarray,
    top_scores: np.ndarray,
    budget: int,
    per_concept: int | None = None,
    min_score: float | None = None,
) -> Assignment:
    """Freeze-Align's rule: visit concepts from rarest to commonest (rarity = K-th best score, lowest
    first, ties by concept index); each takes up to ``per_concept`` (default ``ceil(budget / C)``) of
    its not-yet-claimed candidates in descending score order. A row goes to at most one concept and the
    total never exceeds ``budget``. Candidates with index -1 or score below ``min_score`` are ignored.
    """
    top_idx = np.asarray(top_idx, dtype=np.int64)
    top_scores = np.asarray(top_scores, dtype=np.float32)
    if top_idx.ndim != 2 or top_idx.shape != top_scores.shape or top_idx.shape[1] == 0:
        raise CurateInputError(f"top_idx {top_idx.shape} and top_scores {top_scores.shape} must be equal (C, K>0) arrays")
    if budget < 1:
        raise CurateOptionError(f"budget must be >= 1, got {budget}")
    C = top_idx.shape[0]
    per = math.ceil(budget / C) if per_concept is None else int(per_concept)
    if per < 1:
        raise CurateOptionError(f"per_concept must be >= 1, got {per_concept}")
    valid = top_idx >= 0
    if min_score is not None:
        valid &= top_scores >= min_score
    order = np.lexsort((np.arange(C), top_scores[:, -1]))
    claimed = np.zeros(int(top_idx.max()) + 1 if valid.any() else 0, dtype=bool)
    rows: list[np.ndarray] = []
    concepts: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    counts = np.zeros(C, dtype=np.int64)
    left = int(budget)
    for c in order:
        if left == 0:
            break
        cand, sc = top_idx[c][valid[c]], top_scores[c][valid[c]]
        free = ~claimed[cand]
        take = cand[free][: min(per, left)]
        claimed[take] = True
        rows.append(take)
        scores.append(sc[free][: len(take)])
        concepts.append(np.full(len(take), c, dtype=np.int64))
        counts[c] = len(take)
        left -= len(take)
    return Assignment(
        rows=_cat(rows, np.int64),
        concept=_cat(concepts, np.int64),
        score=_cat(scores, np.float32),
        counts=counts,
        no_candidates=np.flatnonzero(~valid.any(axis=1)).tolist(),
        order=order.astype(np.int64),
    )


def _cat(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)


class _Blocks:
    """Unit-normalised pool blocks for repeated passes (farthest-point sampling makes one pass per
    pick): held in memory as fp32 when that fits ``cache_bytes``, otherwise re-read from the pool."""

    def __init__(self, pool: Any, chunk: int, cache_bytes: int):
        self.pool, self.chunk = pool, chunk
        n, d = pool.shape
        self.cache = None
        if n * d * 4 <= cache_bytes:
            self.cache = [(s, _unit(pool[s : s + chunk], "pool features", s)) for s in range(0, n, chunk)]

    def __iter__(self):
        if self.cache is not None:
            yield from self.cache
        else:
            for s in range(0, self.pool.shape[0], self.chunk):
                yield s, _unit(self.pool[s : s + self.chunk], "pool features", s)


def _farthest(
    pool: Any, claimed: np.ndarray, n: int, seed: int, chunk: int, cache_bytes: int, rows: np.ndarray | None = None
) -> np.ndarray:
    """Greedy farthest-point sampling in cosine distance: each pick is the candidate whose highest
    cosine to anything already taken or picked is lowest (ties: lower row). Exact duplicates of taken
    rows have cosine 1 and so come last. Candidates are all unclaimed rows, or the unclaimed pool rows
    ``rows`` when given. O(M*(T + n)*d) time for M candidates and T taken rows, O(M) extra memory."""
    cand = pool if rows is None else _unit(pool[rows], "pool features")
    excluded = claimed if rows is None else claimed[rows]
    M = cand.shape[0]
    blocks = _Blocks(cand, chunk, cache_bytes)
    nearest = np.full(M, -np.inf, dtype=np.float32)  # highest cosine to the taken/picked set
    taken = np.flatnonzero(claimed)
    for t in range(0, len(taken), chunk):
        ref = torch.from_numpy(_unit(pool[taken[t : t + chunk]], "pool features"))
        for s, x in blocks:
            best = (torch.from_numpy(x) @ ref.T).max(dim=1).values.numpy()
            np.maximum(nearest[s : s + len(x)], best, out=nearest[s : s + len(x)])
    score = np.where(excluded, np.inf, nearest)
    picks = np.empty(n, dtype=np.int64)
    for j in range(n):
        if j == 0 and len(taken) == 0:
            free = np.flatnonzero(~excluded)
            p = int(free[np.random.default_rng(seed).integers(len(free))])
        else:
            p = int(np.argmin(score))
        picks[j] = p
        score[p] = np.inf
        v = torch.from_numpy(_unit(cand[p : p + 1], "pool features", p)[0])
        for s, x in blocks:
            sim = (torch.from_numpy(x) @ v).numpy()
            np.maximum(score[s : s + len(x)], sim, out=score[s : s + len(x)])
    return picks if rows is None else rows[picks]


def fill_diverse(
    pool: Any,
    taken_rows: Sequence[int] | np.ndarray,
    n: int,
    seed: int = 0,
    method: FillMethod = "farthest",
    chunk: int = 65536,
    cache_bytes: int = 2 << 30,
    candidates: int | None = None,
) -> np.ndarray:
    """``n`` rows not in ``taken_rows``, chosen to cover the feature space (L2-normalised features).

    - ``"farthest"``: farthest-point sampling seeded by the taken set (or by a ``seed``-chosen row when
      it is empty); each pick is a full pass over the candidates, so time is O(M*(T + n)*d) for M
      candidates and T taken rows. M is every unclaimed row, or ``candidates`` of them drawn with
      ``seed`` -- worth setting at scale: 1M rows with T = 100k taken is ~4e13 flops exactly.
    - ``"kmeans"``: faiss spherical k-means with ``n`` centroids trained on up to 256*n unclaimed rows
      (``seed``), then each centroid takes its nearest unclaimed row (one row per centroid; a centroid
      whose 8 nearest rows were all taken by others is topped up by farthest-point sampling).

    Deterministic for a given seed. When ``n`` equals the number of unclaimed rows they are returned
    as they are (index order), since every choice would pick them all.
    """
    pool = _as_rows(pool)
    N = pool.shape[0]
    claimed = np.zeros(N, dtype=bool)
    taken = np.asarray(taken_rows, dtype=np.int64)
    if len(taken) and (taken.min() < 0 or taken.max() >= N):
        raise CurateInputError(f"taken_rows must be pool row ids in [0, {N}), got min {taken.min()} max {taken.max()}")
    claimed[taken] = True
    free = int(N - claimed.sum())
    if n < 0 or n > free:
        raise CurateOptionError(f"cannot fill {n} rows: the pool has {free} rows not yet taken")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if n == free:
        return np.flatnonzero(~claimed).astype(np.int64)
    if method == "farthest":
        rows = None
        if candidates is not None and candidates < free:
            if candidates < n:
                raise CurateOptionError(f"candidates ({candidates}) must be >= the rows to fill ({n})")
            rng = np.random.default_rng(seed)
            rows = np.sort(rng.choice(np.flatnonzero(~claimed), size=int(candidates), replace=False))
        return _farthest(pool, claimed, n, seed, chunk, cache_bytes, rows)
    if method != "kmeans":
        raise CurateOptionError(f"fill method must be 'farthest' or 'kmeans', got {method!r}")
    import faiss

    free_rows = np.flatnonzero(~claimed)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(free_rows, size=min(len(free_rows), 256 * n), replace=False))
    x = _unit(pool[sample], "pool features")
    km = faiss.Kmeans(x.shape[1], n, niter=20, seed=int(seed), spherical=True, verbose=False)
    km.train(x)
    cent = _unit(km.centroids, "k-means centroids")
    idx, sc = _topk_scan(pool, cent, min(8, free), chunk, exclude=claimed)
    picks = assign_rarest_first(idx, sc, budget=n, per_concept=1).rows
    if len(picks) < n:
        claimed[picks] = True
        picks = np.concatenate([picks, _farthest(pool, claimed, n - len(picks), seed, chunk, cache_bytes)])
    return picks


# ---------------------------------------------------------------------------------------- pipeline


def report_path(subset_path: str | Path) -> Path:
    """The JSON coverage report written next to a subset file: ``subset.parquet`` -> ``subset.coverage.json``."""
    p = Path(subset_path)
    return p.with_name(p.stem + ".coverage.json")


@dataclass
class CurationResult:
    """The curated subset: ``rows`` (pool row ids, no duplicates), ``concept`` (concept index, -1 for
    fill rows), ``score`` (cosine to that concept, NaN for fill rows), in selection order."""

    rows: np.ndarray
    concept: np.ndarray
    score: np.ndarray
    counts: np.ndarray
    no_candidates: list[int]
    budget: int
    concept_names: list[str] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def n_fill(self) -> int:
        return int((self.concept < 0).sum())

    @property
    def source(self) -> np.ndarray:
        return np.where(self.concept >= 0, "concept", "fill")

    def name(self, c: int) -> str:
        return "" if c < 0 else (self.concept_names[c] if self.concept_names else str(c))

    def coverage(self) -> dict[str, Any]:
        """What the JSON report holds: pairs per concept, concepts without candidates, budget, fill."""
        return {
            "budget": self.budget,
            "n_rows": int(len(self.rows)),
            "n_concept": int(len(self.rows) - self.n_fill),
            "n_fill": self.n_fill,
            "n_concepts": int(len(self.counts)),
            "concepts_covered": int((self.counts > 0).sum()),
            "pairs_per_concept": {self.name(c): int(k) for c, k in enumerate(self.counts)},
            "no_candidates": [self.name(c) for c in self.no_candidates],
            "notes": list(self.notes),
        }

    def save(self, path: str | Path) -> Path:
        """Write the Parquet subset (row, concept, concept_index, score, source) and its coverage
        report (:func:`report_path`), both atomically. Returns the subset path."""
        path = Path(path)
        table = pa.table(
            {
                "row": pa.array(self.rows, pa.int64()),
                "concept": pa.array([self.name(int(c)) for c in self.concept], pa.string()),
                "concept_index": pa.array(self.concept, pa.int64()),
                "score": pa.array(self.score, pa.float32()),
                "source": pa.array(self.source.tolist(), pa.string()),
            }
        )
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
        write_json(report_path(path), self.coverage())
        return path


def curate(
    pool_features: Any,
    prototypes: Any,
    budget: int,
    top_k: int | None = None,
    per_concept: int | None = None,
    fill: FillMethod | None = "farthest",
    seed: int = 0,
    concept_names: Sequence[str] | None = None,
    min_score: float | None = None,
    chunk: int = 65536,
    fill_candidates: int | None = None,
) -> CurationResult:
    """Concept-rich subset of exactly ``budget`` pool rows (all rows, with a note, when the pool is
    smaller): rarest-first concept assignment, then ``fill`` for the rest.

    ``top_k`` defaults to ``2 * per_concept`` (``per_concept`` defaulting to ``ceil(budget / C)``): the
    slack lets a concept still reach its quota after rarer concepts claimed some of its candidates.
    ``fill=None`` skips the fill and may return fewer rows; ``fill_candidates`` bounds the rows
    farthest-point sampling considers (see :func:`fill_diverse`).
    """
    pool = _as_rows(pool_features)
    if budget < 1:
        raise CurateOptionError(f"budget must be >= 1, got {budget}")
    N = pool.shape[0]
    protos = _prototypes(prototypes, pool.shape[1])
    C = len(protos)
    if concept_names is not None and len(concept_names) != C:
        raise CurateOptionError(f"concept_names has {len(concept_names)} names for {C} prototypes")
    notes: list[str] = []
    target = int(budget)
    if budget > N:
        target = N
        notes.append(f"budget {budget} exceeds the pool ({N} rows): the whole pool is kept")
    per = math.ceil(target / C) if per_concept is None else int(per_concept)
    k = min(N, int(top_k) if top_k is not None else 2 * max(per, 1))
    if k < 1:
        raise CurateOptionError(f"top_k must be >= 1, got {top_k}")
    idx, sc = _topk_scan(pool, protos, k, int(chunk))
    a = assign_rarest_first(idx, sc, target, per, min_score)
    rows, concept, score = a.rows, a.concept, a.score
    if fill is not None and len(rows) < target:
        n_fill = target - len(rows)
        extra = fill_diverse(
            pool, rows, n_fill, seed=seed, method=fill, chunk=chunk,
            candidates=None if fill_candidates is None else max(int(fill_candidates), n_fill),
        )
        rows = np.concatenate([rows, extra])
        concept = np.concatenate([concept, np.full(len(extra), -1, dtype=np.int64)])
        score = np.concatenate([score, np.full(len(extra), np.nan, dtype=np.float32)])
    elif len(rows) < target:
        notes.append(f"fill disabled: {target - len(rows)} of the budget left unused")
    if a.no_candidates:
        notes.append(f"{len(a.no_candidates)} concept(s) had no candidate above min_score")
    return CurationResult(
        rows=rows,
        concept=concept,
        score=score,
        counts=a.counts,
        no_candidates=a.no_candidates,
        budget=int(budget),
        concept_names=list(concept_names) if concept_names is not None else None,
        notes=notes,
    )
