"""Projections: what maps one modality's frozen features into the shared space.

Trained heads (:class:`Tower`) and fitted closed-form maps (:class:`LinearMap`, :class:`AnchorMap`)
are all ``nn.Module``s with a ``config()`` from which ``type(m)(**m.config())`` rebuilds them, so an
aligned model saves as one module tree (config JSON + one safetensors file) whatever produced it.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import UnialignError
from .heads import HEADS, LayerMixHead, Standardize, TemporalHead, Tower, count_parameters, make_head
from .maps import AnchorMap, LayerScale, LinearMap

from ..standalone.compose import Chain, WeightedConcat

PROJECTIONS: dict[str, type[nn.Module]] = {"head": Tower, "linear_map": LinearMap, "anchors": AnchorMap, "layer_scale": LayerScale,
                                           "chain": Chain, "concat": WeightedConcat}


def projection_config(module: nn.Module) -> dict[str, Any]:
    """``{"type": ..., **constructor arguments}`` of a projection module."""
    kind = getattr(module, "kind_of_projection", None)
    if kind not in PROJECTIONS:
        raise UnialignError(f"{type(module).__name__} is not a unialign projection; types: {', '.join(PROJECTIONS)}")
    return {"type": kind, **module.config()}


def build_projection(config: dict[str, Any]) -> nn.Module:
    """An untrained projection of the recorded shape (load its state dict next)."""
    cfg = dict(config)
    kind = cfg.pop("type", None)
    if kind not in PROJECTIONS:
        raise UnialignError(f"unknown projection type {kind!r}; known: {', '.join(PROJECTIONS)}")
    try:
        return PROJECTIONS[kind](**cfg)
    except (TypeError, ValueError) as e:
        raise UnialignError(f"projection config {config!r} is invalid ({e})") from None


__all__ = ["HEADS", "PROJECTIONS", "AnchorMap", "Chain", "WeightedConcat", "LayerMixHead", "LayerScale", "LinearMap", "Standardize", "TemporalHead", "Tower",
           "build_projection", "count_parameters", "make_head", "projection_config"]
