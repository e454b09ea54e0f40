"""Trained projections (heads and the :class:`Tower` that standardises their input).

The implementation is :mod:`unialign.standalone.heads`: it imports only torch, so an exported
sentence-transformers folder ships that same file and runs these heads without unialign installed.
"""
from __future__ import annotations

from ..standalone.heads import (HEADS, LayerMixHead, LinearHead, MLPHead, ResidualHead, Standardize, StarHead, TemporalHead,
                                Tower, count_parameters, make_head)

__all__ = ["HEADS", "LayerMixHead", "LinearHead", "MLPHead", "ResidualHead", "Standardize", "StarHead", "TemporalHead",
           "Tower", "count_parameters", "make_head"]
