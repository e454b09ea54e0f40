"""How several layers of one modality are joined before a closed-form map: balanced, then weighted.

Concatenated raw layers weigh by their norms, which nobody chose: in EfficientNet-Lite0's
``[block13, block14, block15, final]`` the final embedding holds 6% of the centred variance and
block14 37%, so the cosine that anchor representations rank by hardly sees the embedding. Here each
layer is scaled to the same mean centred norm over the rows the map is fitted on (the training pairs;
in ``unialign-unpaired``'s refit, its pseudo-pairs too), then multiplied by its weight
(``layer_weights`` in the run config, by layer name, others 1; chosen on style-held-out validation,
docs/quality.md). The scales become a :class:`~unialign.projections.LayerScale` in front of the map,
so a saved model applies them itself.

Closed-form maps only (plain closed-form recipes, and the closed-form parts of hybrid and unpaired
ones, all through :func:`fit_balanced`): a trained head standardises every input dimension first, which
undoes any per-layer constant.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from unialign.errors import ConfigError, DataError
from unialign.projections import Chain, LayerScale

from ..features.cache import Features
from .pairs import Pairs


def fit_layer_scale(feats: Features, rows: np.ndarray, weights: Mapping[str, float]) -> LayerScale | None:
    """The scales of ``feats``'s layers from its training ``rows``; None when it has one layer (a
    constant factor changes no cosine). A weight naming a layer that is not there is ignored, so one
    config (``{final: 2}``) serves any layer set."""
    if len(feats.arrays) < 2:
        return None
    module = LayerScale(feats.dims)
    scales = []
    for name, arr in zip(feats.names, feats.arrays):
        v = np.asarray(arr[rows], dtype=np.float64)
        norm = float(np.linalg.norm(v - v.mean(0), axis=1).mean()) if len(v) else 0.0
        if not np.isfinite(norm) or norm <= 0:
            raise DataError(f"layer {name!r}: its {len(v)} training rows do not vary (mean centred norm {norm}), "
                            "so it cannot be balanced against the other layers; drop it from layers or set "
                            "layer_weights: null")
        scales.append(float(weights.get(name, 1.0)) / norm)
    with torch.no_grad():
        module.scale.copy_(torch.tensor(scales, dtype=torch.float32))
    return module


def fit_balanced(aligner: Any, x: Features, y: Features, pairs: Pairs, weights: Mapping[str, float] | None,
                 names: Sequence[str]) -> tuple[dict[str, nn.Module], dict[str, LayerScale | None], int]:
    """``aligner`` (a closed-form map) fitted on every (x, y) combination of ``pairs``, each side's layers
    balanced and weighted by ``weights`` first (None: joined as they come). Returns, keyed by the two
    modality ``names``, its modules (each behind its :class:`LayerScale` where one was fitted) and the
    scales, and the number of anchor pairs."""
    a, b = names
    xr, yr, groups = pairs.all_pairs()  # one anchor per (x item, y item) combination of a record
    scales = {n: fit_layer_scale(f, np.unique(r), weights) if weights is not None else None
              for n, f, r in ((a, x, xr), (b, y, yr))}
    aligner.fit(apply_scale(scales[a], x[xr]), apply_scale(scales[b], y[yr]), groups=groups)
    maps = dict(zip((a, b), aligner.projections_))
    return {n: m if scales[n] is None else Chain([scales[n], m]) for n, m in maps.items()}, scales, len(xr)


def check_weight_names(weights: Mapping[str, float] | None, encoders: Mapping[str, Any]) -> None:
    """Every name in ``layer_weights`` must be a layer of one of the run's ``encoders``: a weight for a layer
    the run did not select is fine (``{final: 2}`` serves any layer set), a misspelt one is an error
    before any feature is extracted."""
    known = {n for enc in encoders.values() for n in enc.layer_dims}
    unknown = sorted(set(weights or {}) - known)
    if unknown:
        have = "; ".join(f"{enc.spec}: {', '.join(enc.layer_dims)}" for enc in encoders.values())
        raise ConfigError(f"layer_weights: {', '.join(map(repr, unknown))} is not a layer of any encoder of this run "
                          f"({have})")


@torch.no_grad()
def apply_scale(module: LayerScale | None, x: np.ndarray) -> np.ndarray:
    """``x`` through ``module`` (the same float32 multiply a saved model does), or ``x`` itself."""
    return x if module is None else module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()


__all__ = ["apply_scale", "check_weight_names", "fit_balanced", "fit_layer_scale"]
