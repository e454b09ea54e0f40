"""Zero-shot classification and retrieval metrics, with CLIP_benchmark's names and meanings, and the
metrics of the supervised fusion heads (classification from logits, regression) and of image-text
consistency (ROC AUC, expected calibration error, token-grounding precision / recall / F1).

Everything works in chunks of queries, so no N x N similarity matrix is ever held for large N.
Inputs of the zero-shot and retrieval metrics are L2-normalised embeddings (torch or numpy).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from unialign.search import topk


def zero_shot_hits(image_emb: torch.Tensor, class_emb: torch.Tensor, labels: Sequence[int] | torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: is the true class the top-1 prediction, and is it among the top 5 (paired tests need these)."""
    return _hits(topk(image_emb, class_emb, 5)[1], labels)


def _hits(top: torch.Tensor, labels: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    return top[:, 0] == labels_t, (top == labels_t[:, None]).any(1)


def zero_shot_scores(image_emb: torch.Tensor, class_emb: torch.Tensor, labels: Sequence[int]) -> dict[str, float]:
    """``acc1``, ``acc5`` and ``mean_per_class_recall`` (mean over classes present of top-1 recall),
    counted in float64 as CLIP_benchmark counts them, so the two agree to the last digit."""
    return ranking_scores(topk(image_emb, class_emb, 5)[1], labels)


def logit_scores(logits: torch.Tensor, labels: Sequence[int]) -> dict[str, float]:
    """:func:`zero_shot_scores` of a trained classifier's (N, classes) logits."""
    logits = torch.as_tensor(logits).float()
    return ranking_scores(torch.topk(logits, min(5, logits.shape[1]), dim=1)[1], labels)


def ranking_scores(top: torch.Tensor, labels: Sequence[int]) -> dict[str, float]:
    """``acc1``, ``acc5`` and ``mean_per_class_recall`` from each item's (N, 5) best classes, best first."""
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    hit1, hit5 = _hits(top, labels_t)
    present = torch.unique(labels_t)
    recalls = np.array([hit1[labels_t == c].double().mean().item() for c in present])
    n = max(1, len(labels_t))
    return {"acc1": int(hit1.sum()) / n, "acc5": int(hit5.sum()) / n, "mean_per_class_recall": float(np.mean(recalls))}


def zero_shot_chance(labels: Sequence[int], n_classes: int) -> dict[str, float]:
    """Expected scores of a random guesser over ``n_classes``."""
    return {"acc1": 1.0 / n_classes, "acc5": min(5, n_classes) / n_classes, "mean_per_class_recall": 1.0 / n_classes}


def retrieval_scores(x_emb: torch.Tensor, y_emb: torch.Tensor, y_to_x: Sequence[int], ks: Sequence[int] = (1, 5, 10),
                     names: Sequence[str] = ("image", "text"), budget: int = 1 << 26) -> dict[str, float]:
    """CLIP_benchmark retrieval between items ``x`` (one per record, e.g. images) and ``y`` (several per
    record, e.g. captions; ``y_to_x[j]`` is the x row of y item j), named by modality:
    ``image_retrieval_recall@k`` (a text query finds its image in the top k) and
    ``text_retrieval_recall@k`` (an image query finds any of its captions in the top k).

    Computed the way CB computes it: similarities ``y @ x.T`` and ``torch.topk`` with each k, over the
    rows for y queries and over the columns for x queries. Exact ties at the cut are common (identical
    captions of different records, identical sparse ASIF embeddings) and any tie rule is arbitrary;
    using CB's makes the two agree to the last digit. Chunks of at most ``budget`` similarities.
    """
    x, y = (torch.as_tensor(np.asarray(e) if not isinstance(e, torch.Tensor) else e).float().cpu() for e in (x_emb, y_emb))
    t2i = torch.as_tensor(np.asarray(y_to_x), dtype=torch.long)
    nx, ny = names
    hits_x: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    hits_y: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    rows = max(1, budget // max(1, len(x)))
    for s in range(0, len(y), rows):  # y queries: rows of y @ x.T
        sim = y[s : s + rows] @ x.T
        for k in ks:
            top = torch.topk(sim, min(k, len(x)), dim=1)[1]
            hits_x[k].append((top == t2i[s : s + rows, None]).any(1))
    cols = max(1, budget // max(1, len(y)))
    for s in range(0, len(x), cols):  # x queries: columns of the same y @ x.T
        sim = y @ x[s : s + cols].T
        for k in ks:
            top = torch.topk(sim, min(k, len(y)), dim=0)[1]
            hits_y[k].append((t2i[top] == torch.arange(s, s + sim.shape[1])[None, :]).any(0))
    out = {}
    for k in ks:
        out[f"{nx}_retrieval_recall@{k}"] = torch.cat(hits_x[k]).float().mean().item()
        out[f"{ny}_retrieval_recall@{k}"] = torch.cat(hits_y[k]).float().mean().item()
    return out


def retrieval_chance(n_x: int, y_to_x: Sequence[int], ks: Sequence[int] = (1, 5, 10),
                     names: Sequence[str] = ("image", "text")) -> dict[str, float]:
    """Random ranking: a y query finds its single x item in the top k with probability k/X; an x item
    with c y items among Y has 1 - C(Y-c, k)/C(Y, k)."""
    t2i = np.asarray(y_to_x)
    n_y = len(t2i)
    counts = np.bincount(t2i, minlength=n_x)
    nx, ny = names
    out = {}
    for k in ks:
        out[f"{nx}_retrieval_recall@{k}"] = min(1.0, k / n_x)
        miss = np.ones(n_x)
        for j in range(min(k, n_y)):
            miss *= np.clip((n_y - counts - j) / (n_y - j), 0, 1)
        out[f"{ny}_retrieval_recall@{k}"] = float((1 - miss).mean())
    return out


def regression_scores(pred: Sequence[float], target: Sequence[float]) -> dict[str, float]:
    """Mean absolute error, root mean squared error and R^2 (1 - SSE / SS around the target mean), in float64."""
    p, t = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    err = p - t
    ss = float(((t - t.mean()) ** 2).sum())
    return {"mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err ** 2).mean())),
            "r2": 1.0 - float((err ** 2).sum()) / ss if ss > 0 else float("nan")}


def binary_auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve: the probability that a positive scores above a negative, ties counting
    one half (the Mann-Whitney U statistic over average ranks)."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if not n_pos or not n_neg:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    for a, b in zip(starts, ends):  # tied scores share their average rank (1-based)
        ranks[order[a:b]] = (a + b + 1) / 2.0
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def expected_calibration_error(probs: Sequence[float], labels: Sequence[bool], bins: int = 15) -> float:
    """ECE of predicted probabilities of the positive class: over ``bins`` equal-width bins of the
    probability, the sample-weighted mean of |mean predicted probability - fraction positive|."""
    p, y = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if not len(p):
        return float("nan")
    which = np.minimum((p * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in np.unique(which):
        sel = which == b
        total += sel.sum() * abs(p[sel].mean() - y[sel].mean())
    return float(total / len(p))


def precision_recall_f1(pred: Sequence[bool], labels: Sequence[bool]) -> dict[str, float]:
    """Micro precision, recall and F1 of binary decisions (token grounding: each word manipulated or not);
    NaN where the denominator is empty."""
    p, y = np.asarray(pred, dtype=bool), np.asarray(labels, dtype=bool)
    tp, fp, fn = int((p & y).sum()), int((p & ~y).sum()), int((~p & y).sum())
    prec = tp / (tp + fp) if tp + fp else float("nan")
    rec = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else float("nan")
    return {"precision": prec, "recall": rec, "f1": f1}
