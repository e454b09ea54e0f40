"""SAIL-style alignment probing: how well do two frozen feature sets align after a *short* linear training?

SAIL ("Assessing and Learning Alignment of Unimodal Vision and Language Models", CVPR'25) measures the
alignment potential of an (image encoder, text encoder) pair by training only linear heads on frozen
features and reading retrieval. :func:`alignment_probe` does that in seconds on cached features:

1. the paired rows are split into a probe-training part and a held-out part -- by ``groups`` (concepts)
   when given, so held-out pairs are of unseen concepts, else by row -- with a seeded generator;
2. linear heads + symmetric InfoNCE (the library's own loop, :func:`unialign_train.align.loop.train`,
   with ``head="linear"``) train for a few hundred steps on the training part, no early stopping;
3. the score is the mean of R@1 and R@5 of image->text and text->image retrieval on the held-out part.

Retrieval counts a hit when the retrieved item belongs to the query's *group* (its concept), so that
identical captions shared by several images of one concept (other styles) are not counted as misses;
without groups every row is its own group (plain retrieval). Deterministic for a given ``seed`` (same
machine and thread count, as any CPU matmul). :func:`probe` returns the score alone, with the signature
of the metrics in :mod:`unialign_train.select.metrics`, so it can be ranked and calibrated like them:
importing this module registers it there as the ``probe`` metric of ``unialign select`` (the selection
stage runs before alignment, so it cannot import the loop itself).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from unialign.search import topk

from ..features.cache import Features
from ..select.metrics import ArrayLike, MetricInputError, MetricOptionError, register_metric
from .loop import TrainConfig, train
from .pairs import Pairs

__all__ = ["ProbeResult", "alignment_probe", "probe", "split_rows"]


@dataclass(frozen=True)
class ProbeResult:
    """The probe score and what it is made of."""

    score: float  # mean of the recalls below
    recalls: dict[str, float]  # "i2t@1", "i2t@5", "t2i@1", "t2i@5", ...
    n_train: int
    n_val: int
    steps: int
    seconds: float
    chance: float  # the score of a random ranking (same groups), for reference
    config: dict[str, Any] = field(default_factory=dict)


def _as_numpy(A: ArrayLike, name: str) -> np.ndarray:
    a = A.detach().cpu().numpy() if isinstance(A, torch.Tensor) else np.asarray(A)
    if a.ndim != 2:
        raise MetricInputError(f"{name} must be a 2-D (n_samples, n_features) array, got shape {a.shape}")
    a = a.astype(np.float32, copy=False)
    if not np.isfinite(a).all():
        raise MetricInputError(f"{name} holds NaN or Inf; drop or impute those rows before probing")
    return a


def split_rows(n: int, groups: Sequence[int] | np.ndarray | None, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, held-out) row indices; whole groups go to one side when ``groups`` is given."""
    if not 0.0 < val_fraction < 1.0:
        raise MetricOptionError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    rng = np.random.default_rng([seed, 7])
    if groups is None:
        perm = rng.permutation(n)
        n_val = min(n - 2, max(2, int(round(val_fraction * n))))
        return np.sort(perm[n_val:]), np.sort(perm[:n_val])
    g = np.asarray(groups)
    if len(g) != n:
        raise MetricInputError(f"groups has {len(g)} entries for {n} rows")
    uniq = np.unique(g)
    if len(uniq) < 4:
        raise MetricInputError(f"probing by group needs at least 4 groups, got {len(uniq)}")
    order = rng.permutation(len(uniq))
    n_val_groups = min(len(uniq) - 2, max(2, int(round(val_fraction * len(uniq)))))
    val_groups = uniq[order[:n_val_groups]]
    is_val = np.isin(g, val_groups)
    return np.where(~is_val)[0], np.where(is_val)[0]


def _group_recalls(img: torch.Tensor, txt: torch.Tensor, groups: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """Recall@k both ways, a hit being any top-k item of the query's group."""
    g = torch.as_tensor(groups)
    kmax = min(max(ks), len(txt))
    top_t = topk(img, txt, kmax)[1]  # image -> texts
    top_i = topk(txt, img, kmax)[1]  # text -> images
    out = {}
    for k in ks:
        kk = min(k, kmax)
        out[f"i2t@{k}"] = float((g[top_t[:, :kk]] == g[:, None]).any(1).float().mean())
        out[f"t2i@{k}"] = float((g[top_i[:, :kk]] == g[:, None]).any(1).float().mean())
    return out


def _chance(groups: np.ndarray, ks: Sequence[int]) -> float:
    """Expected score of a random ranking: P(at least one of k draws without replacement hits the group)."""
    n = len(groups)
    _, inv, counts = np.unique(groups, return_inverse=True, return_counts=True)
    c = counts[inv]
    vals = []
    for k in ks:
        k = min(k, n)
        miss = np.ones(n)
        for j in range(k):
            miss *= np.clip((n - c - j) / (n - j), 0, 1)
        vals.append(float((1 - miss).mean()))
    return float(np.mean(vals))  # same for both directions


def alignment_probe(
    X: ArrayLike,
    Y: ArrayLike,
    groups: Sequence[int] | np.ndarray | None = None,
    *,
    steps: int = 300,
    val_fraction: float = 0.25,
    seed: int = 0,
    dim: int = 128,
    batch_size: int = 256,
    lr: float = 2e-3,
    ks: Sequence[int] = (1, 5),
    device: str = "cpu",
    threads: int | None = 1,
) -> ProbeResult:
    """Train linear heads on (X, Y) rows for ``steps`` steps and return held-out retrieval (see module doc).

    ``X`` (n, d_x) image features and ``Y`` (n, d_y) text features describe the same pair in row i;
    ``groups`` (n,) integer concept ids: split by concept, and same-concept pairs are neither negatives
    during training nor misses at retrieval time. ``threads``: torch CPU threads while probing (restored
    afterwards; None leaves the setting alone). One is the default because the heads are small: on a
    loaded 2-core machine, two threads made the same probe 20-40x slower (spinning threads waiting on
    each other), with identical results.
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise MetricOptionError(f"steps must be a positive integer, got {steps!r}")
    if not ks or any(int(k) < 1 for k in ks):
        raise MetricOptionError(f"ks must be positive integers, got {ks!r}")
    Xa, Ya = _as_numpy(X, "X"), _as_numpy(Y, "Y")
    if len(Xa) != len(Ya):
        raise MetricInputError(f"X and Y must be row-paired, got {len(Xa)} and {len(Ya)} rows")
    n = len(Xa)
    if n < 8:
        raise MetricInputError(f"alignment_probe needs at least 8 pairs, got {n}")
    g = np.arange(n) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1].astype(np.int64)
    tr, va = split_rows(n, None if groups is None else g, val_fraction, seed)
    cfg = TrainConfig(head="linear", loss="infonce", dim=dim, batch_size=min(batch_size, len(tr)), lr=lr,
                      weight_decay=0.02, warmup_steps=max(1, min(50, steps // 10)), max_steps=int(steps),
                      eval_every=0, patience=0, checkpoint_every=0, seed=seed, device=device)
    pairs = Pairs.from_lists(tr.tolist(), [[int(i)] for i in tr], g[tr].tolist())
    t0 = time.perf_counter()
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        res = train(Features([Xa]), Features([Ya]), pairs, cfg, validate=None, checkpoint=None, log=None, names=("x", "y"))
        heads = res.model.eval()
        with torch.no_grad():
            zi = torch.nn.functional.normalize(heads["x"](torch.from_numpy(Xa[va])).float(), dim=-1)
            zt = torch.nn.functional.normalize(heads["y"](torch.from_numpy(Ya[va])).float(), dim=-1)
    finally:
        torch.set_num_threads(before)
    recalls = _group_recalls(zi, zt, g[va], ks)
    score = float(np.mean(list(recalls.values())))
    if not math.isfinite(score):
        raise FloatingPointError("alignment probe produced a non-finite score")
    return ProbeResult(score, recalls, len(tr), len(va), res.steps, time.perf_counter() - t0, _chance(g[va], ks),
                       {"steps": int(steps), "val_fraction": val_fraction, "seed": seed, "dim": dim,
                        "batch_size": cfg.batch_size, "lr": lr, "ks": list(ks), "split": "group" if groups is not None else "row"})


def probe(X: ArrayLike, Y: ArrayLike, groups: Sequence[int] | np.ndarray | None = None, **options: Any) -> float:
    """:func:`alignment_probe`'s score alone: a metric ``f(X, Y) -> float`` like those of ``metrics.py``."""
    return alignment_probe(X, Y, groups, **options).score


register_metric("probe", probe)
