"""Closed-form maps (ASIF / relative representations, Procrustes, least squares, CCA, layer scales) as modules.

The implementation is :mod:`unialign.standalone.maps`: it imports only torch, so an exported
sentence-transformers folder ships that same file and runs these maps without unialign installed.
"""
from __future__ import annotations

from ..standalone.maps import AnchorMap, LayerScale, LinearMap

__all__ = ["AnchorMap", "LayerScale", "LinearMap"]
