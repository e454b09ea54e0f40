"""Projections made of projections: a chain (a trained head on top of a closed-form map's output, e.g.
on ASIF anchor profiles) and a weighted concatenation (score fusion of two models).

Why concatenation expresses score fusion: if ``a`` and ``b`` are unit vectors from model A and ``a'``,
``b'`` from model B, then ``[sqrt(w) a, sqrt(1-w) a'] . [sqrt(w) b, sqrt(1-w) b'] = w a.b + (1-w) a'.b'``
and the concatenation has unit norm. So a fused model still scores by the cosine of its
``encode_image`` / ``encode_text`` outputs, and every consumer (CLIP_benchmark, exports, the server,
FAISS) sees the fused score without knowing it is one.

Standalone (imports only torch and the sibling standalone files), like ``heads.py`` and ``maps.py``:
a sentence-transformers export copies it next to them.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .heads import Tower
from .maps import AnchorMap, LayerScale, LinearMap


def build_part(config: dict[str, Any]) -> nn.Module:
    """A projection from ``{"type": ..., **constructor arguments}`` (untrained: load its state next)."""
    cfg = dict(config)
    kind = cfg.pop("type", None)
    known = projection_types()
    if kind not in known:
        raise ValueError(f"unknown projection type {kind!r}; known: {', '.join(known)}")
    return known[kind](**cfg)


def part_config(module: nn.Module) -> dict[str, Any]:
    return {"type": module.kind_of_projection, **module.config()}


def _out_dim(module: nn.Module) -> int:
    return int(module.out_dim)


class _Composite(nn.Module):
    """Parts given as modules or as their saved configs; the input is the first part's."""

    def __init__(self, parts: Sequence[dict[str, Any] | nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(p if isinstance(p, nn.Module) else build_part(p) for p in parts)

    @property
    def in_dim(self) -> int:
        return int(self.parts[0].in_dim)


class Chain(_Composite):
    """``parts[-1](... parts[1](parts[0](x)))``: e.g. an ASIF anchor map, then a trained head that reads
    the anchor profile instead of the raw encoder features."""

    kind_of_projection = "chain"

    def __init__(self, parts: Sequence[dict[str, Any] | nn.Module]):
        if not parts:
            raise ValueError("a chain needs at least one part")
        super().__init__(parts)

    @property
    def out_dim(self) -> int:
        return _out_dim(self.parts[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for p in self.parts:
            x = p(x)
        return x

    def config(self) -> dict[str, Any]:
        return {"parts": [part_config(p) for p in self.parts]}


class WeightedConcat(_Composite):
    """``[sqrt(w_1) normalize(P_1(x)), ..., sqrt(w_m) normalize(P_m(x))]`` with weights summing to 1:
    the cosine of two such embeddings is the ``w``-weighted sum of the parts' cosines (module docstring).
    Parts with weight 0 are kept (their zeros keep the width fixed) but not run."""

    kind_of_projection = "concat"

    def __init__(self, parts: Sequence[dict[str, Any] | nn.Module], weights: Sequence[float]):
        w = [float(v) for v in weights]
        if len(w) != len(parts) or not parts:
            raise ValueError(f"need one weight per part, got {len(w)} weights for {len(parts)} parts")
        if any(not math.isfinite(v) or v < 0 for v in w) or sum(w) <= 0:
            raise ValueError(f"weights must be finite, >= 0 and not all 0, got {w}")
        super().__init__(parts)
        self.weights = [v / sum(w) for v in w]

    @property
    def out_dim(self) -> int:
        return sum(_out_dim(p) for p in self.parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for w, p in zip(self.weights, self.parts):
            if w == 0.0:
                outs.append(x.new_zeros(len(x), _out_dim(p), dtype=torch.float32))
            else:
                outs.append(math.sqrt(w) * F.normalize(p(x).float(), dim=-1))
        return torch.cat(outs, dim=-1)

    def config(self) -> dict[str, Any]:
        return {"parts": [part_config(p) for p in self.parts], "weights": list(self.weights)}


def projection_types() -> dict[str, type[nn.Module]]:
    """Every projection type by its ``kind_of_projection``, the composite ones included."""
    return {c.kind_of_projection: c for c in (Tower, LinearMap, AnchorMap, LayerScale, Chain, WeightedConcat)}


__all__ = ["Chain", "WeightedConcat", "build_part", "part_config", "projection_types"]
