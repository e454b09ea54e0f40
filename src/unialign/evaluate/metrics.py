"""Zero-shot classification and retrieval metrics, with CLIP_benchmark's names and meanings.

Everything works in chunks of queries, so no N x N similarity matrix is ever held for large N.
Inputs are L2-normalised embeddings (torch or numpy).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def _t(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float()


def class_embeddings(per_template: torch.Tensor) -> torch.Tensor:
    """(classes, templates, d) normalised template embeddings -> (classes, d): mean, renormalised."""
    return F.normalize(F.normalize(per_template.float(), dim=-1).mean(1), dim=-1)


def topk_indices(queries: torch.Tensor, keys: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """Indices of the k most similar keys (inner product) for each query, computed in chunks."""
    queries, keys = _t(queries), _t(keys)
    k = min(k, len(keys))
    out = [torch.topk(queries[s : s + chunk] @ keys.T, k, dim=1).indices for s in range(0, len(queries), chunk)]
    return torch.cat(out) if out else torch.zeros(0, k, dtype=torch.long)


def zero_shot_scores(image_emb: torch.Tensor, class_emb: torch.Tensor, labels: Sequence[int]) -> dict[str, float]:
    """``acc1``, ``acc5`` and ``mean_per_class_recall`` (mean over classes present of top-1 recall)."""
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    top = topk_indices(image_emb, class_emb, 5)
    hit1 = top[:, 0] == labels_t
    hit5 = (top == labels_t[:, None]).any(1)
    present = torch.unique(labels_t)
    recalls = torch.stack([hit1[labels_t == c].float().mean() for c in present])
    return {"acc1": hit1.float().mean().item(), "acc5": hit5.float().mean().item(),
            "mean_per_class_recall": recalls.mean().item()}


def zero_shot_chance(labels: Sequence[int], n_classes: int) -> dict[str, float]:
    """Expected scores of a random guesser over ``n_classes``."""
    return {"acc1": 1.0 / n_classes, "acc5": min(5, n_classes) / n_classes, "mean_per_class_recall": 1.0 / n_classes}


def retrieval_scores(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: Sequence[int],
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """CLIP_benchmark retrieval: ``image_retrieval_recall@k`` (text query -> its image in the top k) and
    ``text_retrieval_recall@k`` (image query -> any of its captions in the top k)."""
    t2i = torch.as_tensor(np.asarray(text_to_image), dtype=torch.long)
    kmax = max(ks)
    top_i = topk_indices(text_emb, image_emb, kmax)  # (T, kmax) image ids
    top_t = topk_indices(image_emb, text_emb, kmax)  # (I, kmax) text ids
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = (top_i[:, :k] == t2i[:, None]).any(1).float().mean().item()
        out[f"text_retrieval_recall@{k}"] = (t2i[top_t[:, :k]] == torch.arange(len(image_emb))[:, None]).any(1).float().mean().item()
    return out


def retrieval_chance(n_images: int, text_to_image: Sequence[int], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Random ranking: a text finds its single image in the top k with probability k/I; an image with
    c captions among T texts has 1 - C(T-c, k)/C(T, k)."""
    t2i = np.asarray(text_to_image)
    n_text = len(t2i)
    counts = np.bincount(t2i, minlength=n_images)
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = min(1.0, k / n_images)
        miss = np.ones(n_images)
        for j in range(min(k, n_text)):
            miss *= np.clip((n_text - counts - j) / (n_text - j), 0, 1)
        out[f"text_retrieval_recall@{k}"] = float((1 - miss).mean())
    return out
