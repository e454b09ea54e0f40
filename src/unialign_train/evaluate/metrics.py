"""Zero-shot classification and retrieval metrics, with CLIP_benchmark's names and meanings.

Everything works in chunks of queries, so no N x N similarity matrix is ever held for large N.
Inputs are L2-normalised embeddings (torch or numpy).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from unialign.search import topk


def zero_shot_hits(image_emb: torch.Tensor, class_emb: torch.Tensor, labels: Sequence[int] | torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: is the true class the top-1 prediction, and is it among the top 5 (paired tests need these)."""
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    top = topk(image_emb, class_emb, 5)[1]
    return top[:, 0] == labels_t, (top == labels_t[:, None]).any(1)


def zero_shot_scores(image_emb: torch.Tensor, class_emb: torch.Tensor, labels: Sequence[int]) -> dict[str, float]:
    """``acc1``, ``acc5`` and ``mean_per_class_recall`` (mean over classes present of top-1 recall)."""
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    hit1, hit5 = zero_shot_hits(image_emb, class_emb, labels_t)
    present = torch.unique(labels_t)
    recalls = torch.stack([hit1[labels_t == c].float().mean() for c in present])
    return {"acc1": hit1.float().mean().item(), "acc5": hit5.float().mean().item(),
            "mean_per_class_recall": recalls.mean().item()}


def zero_shot_chance(labels: Sequence[int], n_classes: int) -> dict[str, float]:
    """Expected scores of a random guesser over ``n_classes``."""
    return {"acc1": 1.0 / n_classes, "acc5": min(5, n_classes) / n_classes, "mean_per_class_recall": 1.0 / n_classes}


def retrieval_scores(x_emb: torch.Tensor, y_emb: torch.Tensor, y_to_x: Sequence[int], ks: Sequence[int] = (1, 5, 10),
                     names: Sequence[str] = ("image", "text")) -> dict[str, float]:
    """CLIP_benchmark retrieval between items ``x`` (one per record, e.g. images) and ``y`` (several per
    record, e.g. captions; ``y_to_x[j]`` is the x row of y item j), named by modality:
    ``image_retrieval_recall@k`` (a text query finds its image in the top k) and
    ``text_retrieval_recall@k`` (an image query finds any of its captions in the top k)."""
    t2i = torch.as_tensor(np.asarray(y_to_x), dtype=torch.long)
    kmax = max(ks)
    top_x = topk(y_emb, x_emb, kmax)[1]  # (Y, kmax) x ids
    top_y = topk(x_emb, y_emb, kmax)[1]  # (X, kmax) y ids
    nx, ny = names
    out = {}
    for k in ks:
        out[f"{nx}_retrieval_recall@{k}"] = (top_x[:, :k] == t2i[:, None]).any(1).float().mean().item()
        out[f"{ny}_retrieval_recall@{k}"] = (t2i[top_y[:, :k]] == torch.arange(len(x_emb))[:, None]).any(1).float().mean().item()
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
