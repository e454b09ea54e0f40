"""Fit a recipe on training pairs: train heads with the loop, or fit a closed-form map. Either way the
result is one projection module per modality, ready for :class:`unialign.AlignedModel`."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from torch import nn

from ..features.cache import Features
from .closed_form import make_closed_form
from .hybrid import fit_hybrid
from .layer_weights import fit_balanced
from .loop import TrainResult, train
from .pairs import Pairs
from .prototypes import prototype_pairs
from .recipes import Recipe, closed_form_params, get_recipe, train_config
from .unpaired import fit_unpaired

Log = Callable[[str], None]
CLOSED_FORM_LOGIT_SCALE = 100.0  # CLIP's trained scale; closed-form maps have none of their own


@dataclass
class Fitted:
    """What a fit produced: the projections (keyed by modality), the logit scale, and what happened."""

    projections: dict[str, nn.Module]
    logit_scale: float
    info: dict[str, Any] = field(default_factory=dict)


def fit(recipe: Recipe, overrides: dict[str, Any] | None, x: Features, y: Features, pairs: Pairs,
        names: Sequence[str], validate: Callable[[Any], dict[str, float]] | None = None,
        checkpoint: str | Path | None = None, device: str = "auto", log: Log = print,
        unpaired: tuple[np.ndarray, np.ndarray] | None = None,
        layer_weights: Mapping[str, float] | None = None) -> Fitted:
    """Fit ``recipe`` (with the user's ``overrides`` of its settings) on ``pairs`` of features ``x`` and
    ``y``, the modalities ``names``. ``validate`` (trained recipes) drives early stopping; ``checkpoint``
    is the file a trained run resumes from; ``unpaired`` (x rows, y rows) are features without pairs that
    a recipe with an ``unpaired`` block learns from (unpaired.py), others ignore them. ``layer_weights``
    (by layer name): every closed-form map (a closed-form recipe, the closed-form part of a hybrid or
    unpaired one) sees a modality's several layers balanced and weighted (layer_weights.py); None joins
    them as they come."""
    a, b = names
    if recipe.anchor_input is not None or recipe.fuse is not None:  # hybrids build on this function
        return fit_hybrid(recipe, overrides, x, y, pairs, names, validate, checkpoint, device, log, fit, get_recipe,
                          layer_weights)
    if recipe.unpaired is not None:
        return fit_unpaired(recipe, overrides, x, y, pairs, names, unpaired, device, log, fit, layer_weights)
    if recipe.trained:
        if layer_weights is not None and max(len(x.arrays), len(y.arrays)) > 1:
            log(f"layer_weights apply to closed-form maps; {recipe.name}'s heads see the layers as they come")
        tcfg = train_config(recipe, overrides, device=device)
        if tcfg.prototypes:  # one pair per concept: its mean first-modality item with each of its captions
            x, pairs = prototype_pairs(x, pairs)
        res: TrainResult = train(x, y, pairs, tcfg, validate, checkpoint, log, names=names)
        info = {"recipe": recipe.name, "train_config": tcfg.model_dump(mode="json"), "history": res.history,
                "best_step": res.best_step, "steps": res.steps, "train_seconds": res.seconds,
                "parameters": res.parameters, "n_pairs": len(pairs)}
        return Fitted({a: res.model[a], b: res.model[b]}, float(res.loss.scale().item()), info)
    params = closed_form_params(recipe, overrides)
    t0 = time.perf_counter()
    aligner = make_closed_form(recipe.closed_form, **params)
    maps, scales, n_pairs = fit_balanced(aligner, x, y, pairs, layer_weights, names)
    info: dict[str, Any] = {"recipe": recipe.name, "params": params, "train_seconds": time.perf_counter() - t0,
                            "n_pairs": n_pairs}
    for n, f in ((a, x), (b, y)):
        if scales[n] is not None:
            info.setdefault("layer_scales", {})[n] = dict(zip(f.names, scales[n].scale.tolist()))
            named = ", ".join(f"{k} x{v:g}" for k, v in layer_weights.items() if k in f.names)
            log(f"{n}: {len(f.names)} layers balanced to one mean centred norm" + (f", then {named}" if named else ""))
    removed = getattr(aligner, "removed_rank", 0)
    if removed:
        info["nuisance_directions_removed"] = removed
    log(f"fitted {recipe.closed_form} on {n_pairs} pairs in {info['train_seconds']:.2f}s"
        + (f" ({removed} within-concept {a} directions removed)" if removed else ""))
    return Fitted(maps, CLOSED_FORM_LOGIT_SCALE, info)


__all__ = ["CLOSED_FORM_LOGIT_SCALE", "Fitted", "fit"]
