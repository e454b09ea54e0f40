"""Closed-form maps as modules: what a fitted ASIF, Procrustes, least-squares or CCA aligner *is* at
inference time, so a saved model is one module tree whatever fitted it.

Both maps start the same way as the estimators that fit them (``unialign_train.align.closed_form``):
each input row is L2-normalised, then centred by the fit-set mean of its modality, so an encoder's raw
feature scale never matters. They keep their state in buffers (saved with the model's safetensors)
and run in the dtype the fit chose (float64 for the linear maps, whose solves are ill-conditioned in
float32; float32 for anchor profiles, whose cost is the N-wide matmul).

Standalone (imports only torch): ``unialign.projections`` re-exports it, and a sentence-transformers
export copies this file verbatim, so the exported folder runs the very same maps.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class _KeepsFloat64(nn.Module):
    """Float64 buffers keep their dtype (and their exact values) through module-wide casts: a host that
    aligns every module to its backbone's dtype (sentence-transformers 6.3 does, with ``_apply``) would
    otherwise round the maps' float64 state to float32. Device moves still apply."""

    def _apply(self, fn: Any, recurse: bool = True) -> "_KeepsFloat64":
        kept = {n: b for n, b in self._buffers.items() if b is not None and b.dtype == torch.float64}
        super()._apply(fn, recurse)
        for name, b in kept.items():
            self._buffers[name] = b.to(device=self._buffers[name].device)
        return self


class LinearMap(_KeepsFloat64):
    """``(normalize(x) - mean) @ weight``: Procrustes, ridge least squares and CCA (canonical weights
    folded into ``weight``). ``weight`` may be absent (identity after centring: the least-squares text
    side, whose targets are the centred text features themselves)."""

    kind_of_projection = "linear_map"

    def __init__(self, in_dim: int, out_dim: int, identity: bool = False, dtype: str = "float64"):
        super().__init__()
        if identity and in_dim != out_dim:
            raise ValueError(f"an identity map needs in_dim == out_dim, got {in_dim} and {out_dim}")
        self.in_dim, self.out_dim, self.identity, self.dtype = int(in_dim), int(out_dim), bool(identity), str(dtype)
        dt = getattr(torch, self.dtype)
        self.register_buffer("mean", torch.zeros(self.in_dim, dtype=dt))
        self.register_buffer("weight", torch.zeros(0 if identity else self.in_dim, 0 if identity else self.out_dim, dtype=dt))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc = F.normalize(x.to(self.mean.dtype), dim=-1) - self.mean
        out = xc if self.identity else xc @ self.weight
        return out.float()

    def config(self) -> dict[str, Any]:
        return {"in_dim": self.in_dim, "out_dim": self.out_dim, "identity": self.identity, "dtype": self.dtype}


class AnchorMap(_KeepsFloat64):
    """ASIF / relative representations: a row becomes its sparse, sharpened cosine profile over N anchors.

    ``forward``: normalise and centre; optionally project off the ``nuisance`` directions (orthonormal
    columns: how items of one concept differ, e.g. drawing styles); normalise; cosine to every anchor;
    keep the entries at or above the row's ``k``-th largest cosine, raise them to the sign-preserving
    power ``p``, zero the rest; L2-normalise. The cosines, the cut and the power are computed on the
    distinct anchors and spread to all N positions last (the default's 13569 anchors are 3965 distinct
    images and 3263 distinct captions). The output is normalised by definition (the profile *is*
    the embedding), so it is the same with and without a later normalisation.

    Anchors are stored de-duplicated (``anchors`` holds the U distinct rows, ``inverse`` maps each of
    the N anchor positions to its row): identical anchors (one caption shared by a concept's images in
    several styles) then get bit-identical cosines, and the cut at the ``k``-th value keeps all or none
    of them. The embedding of an input is thus a function of that input alone, never of which other
    inputs share its batch (ties at the cut would otherwise be broken by summation order).
    """

    kind_of_projection = "anchors"

    def __init__(self, in_dim: int, n_anchors: int, n_unique: int, k: int | None = None, p: float = 1.0,
                 nuisance_rank: int = 0, chunk_size: int = 4096):
        super().__init__()
        self.in_dim, self.n_anchors, self.n_unique = int(in_dim), int(n_anchors), int(n_unique)
        self.k = None if k is None or k >= n_anchors else int(k)
        self.p, self.nuisance_rank, self.chunk_size = float(p), int(nuisance_rank), int(chunk_size)
        self.register_buffer("mean", torch.zeros(self.in_dim, dtype=torch.float64))
        self.register_buffer("nuisance", torch.zeros(self.in_dim, self.nuisance_rank, dtype=torch.float64))
        self.register_buffer("anchors", torch.zeros(self.n_unique, self.in_dim))
        self.register_buffer("inverse", torch.zeros(self.n_anchors, dtype=torch.long))

    @property
    def out_dim(self) -> int:
        return self.n_anchors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc = F.normalize(x.to(torch.float64), dim=-1) - self.mean
        if self.nuisance_rank:
            xc = xc - (xc @ self.nuisance) @ self.nuisance.T
        q = F.normalize(xc, dim=-1).float()
        counts = torch.bincount(self.inverse, minlength=self.n_unique)  # positions per distinct anchor
        outs = [self._profile(q[s : s + self.chunk_size], counts) for s in range(0, len(q), self.chunk_size)]
        return torch.cat(outs) if outs else q.new_zeros(0, self.n_anchors)

    def _profile(self, q: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        s = q @ self.anchors.T  # (m, U): each distinct anchor's cosine, computed once
        if self.k is not None:  # the power on the kept cosines only (about k of U per row)
            keep = s >= self._cut(s, counts)
            kept, s = s[keep], torch.zeros_like(s)
            s[keep] = self._power(kept)
        else:
            s = self._power(s)
        return F.normalize(s[:, self.inverse], dim=-1)  # spread to the N anchor positions

    def _cut(self, s: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Each row's ``k``-th largest cosine over the N anchor positions, found among the U distinct
        anchors (an anchor held c times counts c times): the k largest of N entries cover at most k
        distinct values, so the cut is among the row's top ``min(k, U)`` distinct cosines, the first
        whose running count of positions reaches k. Same value as ``topk`` over the N-wide row, at a
        U-wide cost. ``counts``: how many of the N positions each distinct anchor holds."""
        top, idx = torch.topk(s, min(int(self.k), s.shape[1]), dim=1)
        before = (counts[idx].cumsum(dim=1) < self.k).sum(dim=1, keepdim=True)  # positions short of k
        return top.gather(1, before)

    def _power(self, s: torch.Tensor) -> torch.Tensor:
        """Sign-preserving ``sign(s) * |s|**p``; the identity, bit for bit, when p == 1."""
        return s if self.p == 1.0 else torch.sign(s) * s.abs().pow(self.p)

    def config(self) -> dict[str, Any]:
        return {"in_dim": self.in_dim, "n_anchors": self.n_anchors, "n_unique": self.n_unique, "k": self.k,
                "p": self.p, "nuisance_rank": self.nuisance_rank, "chunk_size": self.chunk_size}


class LayerScale(nn.Module):
    """Several layers' features side by side, each multiplied by its own constant: ``x[:, layer l] * scale[l]``.

    Concatenated layers otherwise weigh by their raw norms, which no one chose (EfficientNet-Lite0's
    block14 has about 2.4 times the centred norm of its final embedding, so in ``[block13 .. final]`` the
    embedding carries 6% of the variance). A closed-form map after this one compares rows by cosine, so
    the scales set how much each layer counts: ``unialign_train.align.layer_weights`` fits them (each
    layer to the same mean centred norm on the training rows, times a chosen weight). One float32
    multiply per element: the fit scales its training rows with this very module.
    """

    kind_of_projection = "layer_scale"

    def __init__(self, dims: list[int]):
        super().__init__()
        if not dims or any(int(d) < 1 for d in dims):
            raise ValueError(f"layer widths must be positive, got {dims}")
        self.dims = [int(d) for d in dims]
        self.register_buffer("scale", torch.ones(len(self.dims)))
        # each layer's width, to spread the per-layer scales over its columns (derived, so not saved)
        self.register_buffer("widths", torch.tensor(self.dims), persistent=False)

    @property
    def in_dim(self) -> int:
        return sum(self.dims)

    @property
    def out_dim(self) -> int:
        return sum(self.dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() * torch.repeat_interleave(self.scale, self.widths)

    def config(self) -> dict[str, Any]:
        return {"dims": list(self.dims)}


__all__ = ["AnchorMap", "LayerScale", "LinearMap"]
