"""Hubness correction at retrieval time (an evaluation option, never inside the default's embeddings).

In a shared space a few candidates ("hubs") are near many queries and win too often. Two published
corrections subtract a per-candidate (and per-query) bias measured on a **reference bank** of training
items; the bank is training data only, never the split being scored:

- NNN (Chowdhury et al., EMNLP 2024): ``s'(q, c) = s(q, c) - alpha * r_c``, ``r_c`` the mean of the
  ``k`` largest similarities of candidate ``c`` to the bank of queries;
- CSLS (Conneau et al. 2018): ``2 s(q, c) - r_c - r_q``, ``r_q`` the same for the query against the
  bank of candidates (for one query's ranking ``r_q`` is a constant, so CSLS ranks as NNN with
  alpha 1/2 and its own bank).

Both change the score away from the cosine of ``encode_image`` / ``encode_text`` outputs, so tools that
score by that cosine (CLIP_benchmark, the server, FAISS) would not see them: they are reported as
separate rows of the benchmark tables, chosen (alpha, k) on validation.
"""
from __future__ import annotations

import torch

METHODS = ("none", "nnn", "csls")


def bank_bias(bank: torch.Tensor, items: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """Per item: the mean of its ``k`` largest similarities to the bank rows (``k`` capped at the bank size)."""
    if len(bank) == 0:
        raise ValueError("the reference bank is empty")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    kk = min(int(k), len(bank))
    outs = [torch.topk(items[s : s + chunk] @ bank.T, kk, dim=1).values.mean(1) for s in range(0, len(items), chunk)]
    return torch.cat(outs) if outs else items.new_zeros(0)


def corrected_scores(queries: torch.Tensor, candidates: torch.Tensor, bank_queries: torch.Tensor,
                     bank_candidates: torch.Tensor | None, method: str, alpha: float, k: int) -> torch.Tensor:
    """(queries, candidates) scores after the hubness correction ``method`` (see the module doc);
    ``method="none"`` or ``alpha=0`` (NNN) is the plain similarity, bit for bit."""
    if method not in METHODS:
        raise ValueError(f"hubness method {method!r}; accepted: {', '.join(METHODS)}")
    s = queries @ candidates.T
    if method == "none" or (method == "nnn" and alpha == 0):
        return s
    r_c = bank_bias(bank_queries, candidates, k)
    if method == "nnn":
        return s - alpha * r_c[None, :]
    if bank_candidates is None:
        raise ValueError("CSLS needs a bank of candidates too")
    return 2 * s - r_c[None, :] - bank_bias(bank_candidates, queries, k)[:, None]


__all__ = ["METHODS", "bank_bias", "corrected_scores"]
