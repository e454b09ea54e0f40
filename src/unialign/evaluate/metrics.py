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


def topk_indices(queries: torch.Tensor, keys: torch.Tensor, k: int, chunk: int = 4096, backend: str = "torch") -> torch.Tensor:
    """Indices of the k most similar keys (inner product) for each query, computed in chunks.

    ``backend="faiss"`` searches an exact FAISS inner-product index instead (same results up to ties);
    for approximate search over very large collections see :func:`topk_indices_faiss`."""
    if backend == "faiss":
        return topk_indices_faiss(queries, keys, k, index="flat")
    if backend != "torch":
        raise ValueError(f"backend must be 'torch' or 'faiss', got {backend!r}")
    queries, keys = _t(queries), _t(keys)
    k = min(k, len(keys))
    chunk = max(1, min(chunk, (1 << 26) // max(1, len(keys))))  # at most 64M similarities (256 MB) at a time
    out = [torch.topk(queries[s : s + chunk] @ keys.T, k, dim=1).indices for s in range(0, len(queries), chunk)]
    return torch.cat(out) if out else torch.zeros(0, k, dtype=torch.long)


def zero_shot_hits(image_emb: torch.Tensor, class_emb: torch.Tensor, labels: Sequence[int] | torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: is the true class the top-1 prediction, and is it among the top 5 (paired tests need these)."""
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    top = topk_indices(image_emb, class_emb, 5)
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


def topk_indices_faiss(queries: np.ndarray | torch.Tensor, keys: np.ndarray | torch.Tensor, k: int, index: str = "flat",
                       nlist: int | None = None, nprobe: int = 16, chunk: int = 65536, seed: int = 0) -> torch.Tensor:
    """Top-k by inner product with FAISS: ``index="flat"`` is exact; ``"ivf"`` (IVF-Flat, ``nlist``
    default ~4 sqrt(N) clusters trained by k-means on a seeded sample of 64 points per cluster, ``nprobe`` probed) is approximate and
    much faster for millions of keys. Queries are searched in chunks; memory is O(N d) for the keys."""
    import faiss

    def f32(x: np.ndarray | torch.Tensor) -> np.ndarray:
        x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        return np.ascontiguousarray(x, dtype=np.float32)

    keys_np = f32(keys)
    n, d = keys_np.shape
    k = min(k, n)
    if index == "flat":
        ix = faiss.IndexFlatIP(d)
    elif index == "ivf":
        nlist = nlist or max(1, min(n // 39, int(4 * np.sqrt(n))))
        ix = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        train = keys_np[np.sort(rng.choice(n, size=min(n, 64 * nlist), replace=False))]
        ix.train(train)
        ix.nprobe = nprobe
    else:
        raise ValueError(f"index must be 'flat' or 'ivf', got {index!r}")
    ix.add(keys_np)
    q = queries
    out = [torch.from_numpy(ix.search(f32(q[s : s + chunk]), k)[1]) for s in range(0, len(q), chunk)]
    return torch.cat(out).long() if out else torch.zeros(0, k, dtype=torch.long)
