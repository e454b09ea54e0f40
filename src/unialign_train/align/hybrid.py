"""Hybrid recipes: trained heads combined with closed-form maps, in ways a plain recipe cannot say.

- ``anchor_input``: the heads are trained on a closed-form map's outputs (e.g. ASIF anchor profiles:
  each sample as its sparse similarity profile over the training pairs) instead of the raw encoder
  features; the model is the chain map -> head on each side (:class:`unialign.projections.Chain`).
  Why: anchor profiles generalised to unseen styles better than raw features (docs/recipes.md), and a
  head can still learn which anchors matter.
- ``fuse``: after training, the model's scores are fused with a closed-form recipe's,
  ``w * cos_trained + (1 - w) * cos_closed``, with ``w`` the candidate that scores best on the
  validation concepts (the early-stopping validator; test data plays no part). Expressed as the
  weighted concatenation of both models' normalised embeddings
  (:class:`unialign.projections.WeightedConcat`), so the fused model still scores by the cosine of its
  own embeddings and exports, serves and indexes like any other.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from unialign.projections import Chain, WeightedConcat

from ..features.cache import Features
from .closed_form import CLOSED_FORM, make_closed_form
from .layer_weights import fit_balanced
from .pairs import Pairs


Log = Callable[[str], None]
# Recipes and fits are typed ``Any`` here: recipes.py imports this module for its settings model, and
# fit.py calls into it, so naming their types would close an import cycle (lint-imports forbids one).


class AnchorInput(BaseModel):
    """The closed-form map whose outputs the heads read."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    closed_form: str = Field("asif", description="aligner name")
    params: dict[str, Any] = Field(default_factory=dict, description="aligner parameters")

    @field_validator("closed_form")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in CLOSED_FORM:
            raise ValueError(f"closed_form {v!r} is not one of {', '.join(CLOSED_FORM)}")
        return v


class Fuse(BaseModel):
    """Score fusion with a closed-form recipe; the trained model's weight is chosen on validation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    recipe: str = Field(description="a closed-form recipe's name")
    weights: list[float] = Field(default=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], min_length=1,
                                 description="candidate weights of the trained model's cosine, in [0, 1]")
    default: float = Field(0.5, ge=0.0, le=1.0, description="the weight when no validation data is given")

    @field_validator("weights")
    @classmethod
    def _unit(cls, v: list[float]) -> list[float]:
        if any(not 0.0 <= w <= 1.0 for w in v):
            raise ValueError(f"fusion weights must lie in [0, 1], got {v}")
        return v


def fit_closed_form_map(name: str, params: dict[str, Any], x: Features, y: Features, pairs: Pairs,
                        layer_weights: Mapping[str, float] | None = None) -> tuple[nn.Module, nn.Module]:
    """A closed-form aligner fitted on every (x, y) combination of the pairs (layers balanced and weighted
    by ``layer_weights``), as its two modules."""
    maps, _, _ = fit_balanced(make_closed_form(name, **params), x, y, pairs, layer_weights, ("x", "y"))
    return maps["x"], maps["y"]


@torch.no_grad()
def mapped_features(module: nn.Module, feats: Features, rows: np.ndarray, block: int = 2048) -> Features:
    """``module`` applied to the given rows of ``feats`` (in blocks), as in-memory features."""
    parts = [module(torch.from_numpy(feats[rows[s : s + block]])).float().numpy() for s in range(0, len(rows), block)]
    return Features([np.concatenate(parts) if parts else np.zeros((0, int(module.out_dim)), np.float32)], ["mapped"])


def remap_pairs(pairs: Pairs, x_rows: np.ndarray, y_rows: np.ndarray) -> Pairs:
    """The pairs with row numbers pointing into the compact arrays of rows ``x_rows`` / ``y_rows`` (sorted)."""
    return Pairs(np.searchsorted(x_rows, pairs.x_flat), pairs.x_offsets.copy(), np.searchsorted(y_rows, pairs.y_flat),
                 pairs.y_offsets.copy(), pairs.groups.copy())


def fit_hybrid(recipe: Any, overrides: dict[str, Any] | None, x: Features, y: Features, pairs: Pairs,
               names: Sequence[str], validate: Callable[[Any], dict[str, float]] | None, checkpoint: Any,
               device: str, log: Log, plain: Callable[..., Any], closed_recipe: Callable[[str], Any],
               layer_weights: Mapping[str, float] | None = None) -> Any:
    """Fit a recipe with ``anchor_input`` and/or ``fuse`` (module docstring). ``plain`` fits a recipe
    without them (``fit``'s own path) and ``closed_recipe`` looks a recipe up by name; ``layer_weights``
    go to the closed-form parts (layer_weights.py)."""
    a, b = names
    base = recipe.model_copy(update={"anchor_input": None, "fuse": None})
    if recipe.anchor_input is not None:
        fitted = _fit_on_anchors(recipe.anchor_input, base, overrides, x, y, pairs, names, validate, checkpoint,
                                 device, log, plain, layer_weights)
    else:
        fitted = plain(base, overrides, x, y, pairs, names, validate, checkpoint, device, log,
                       layer_weights=layer_weights)
    if recipe.fuse is None:
        return fitted
    other = closed_recipe(recipe.fuse.recipe)
    if other.trained:
        raise ValueError(f"recipe {recipe.name}: fuse.recipe {other.name!r} must be a closed-form recipe")
    closed = plain(other, None, x, y, pairs, names, None, None, device, log, layer_weights=layer_weights)
    scores: list[float] = []
    if validate is None:  # e.g. a quick fit without a validation split: the recipe's stated default
        w = recipe.fuse.default
        log(f"fusion with {other.name}: no validation data, weight {w} of the trained model (the default)")
    else:
        for v in recipe.fuse.weights:
            fused = {m: WeightedConcat([fitted.projections[m], closed.projections[m]], [v, 1.0 - v]) for m in (a, b)}
            scores.append(float(validate(nn.ModuleDict(fused))["score"]))
        w = recipe.fuse.weights[int(np.argmax(scores))]  # first of equals: the grid's order breaks ties
        log(f"fusion with {other.name}: weight {w} of the trained model (validation scores "
            + ", ".join(f"{v}: {s:.4f}" for v, s in zip(recipe.fuse.weights, scores)) + ")")
    projections = {m: WeightedConcat([fitted.projections[m], closed.projections[m]], [w, 1.0 - w]) for m in (a, b)}
    scale = w * fitted.logit_scale + (1.0 - w) * closed.logit_scale
    info = {**fitted.info, "recipe": recipe.name, "fuse": {"recipe": other.name, "weight": w,
                                                           "validation": dict(zip(map(str, recipe.fuse.weights), scores)) if scores else None},
            "train_seconds": fitted.info["train_seconds"] + closed.info["train_seconds"]}
    return type(fitted)(projections, scale, info)


def _fit_on_anchors(spec: AnchorInput, base: Any, overrides: dict[str, Any] | None, x: Features, y: Features,
                    pairs: Pairs, names: Sequence[str], validate: Callable[[Any], dict[str, float]] | None,
                    checkpoint: Any, device: str, log: Log, plain: Callable[..., Any],
                    layer_weights: Mapping[str, float] | None) -> Any:
    import time

    a, b = names
    t0 = time.perf_counter()
    mx, my = fit_closed_form_map(spec.closed_form, spec.params, x, y, pairs, layer_weights)
    xs, ys = np.unique(pairs.x_flat), np.unique(pairs.y_flat)
    ax, ay = mapped_features(mx, x, xs), mapped_features(my, y, ys)
    map_seconds = time.perf_counter() - t0
    log(f"{spec.closed_form} inputs: {len(xs)} {a} and {len(ys)} {b} rows mapped to {ax.dim} dims "
        f"in {map_seconds:.1f}s")

    def chained(model: Any) -> nn.ModuleDict:
        return nn.ModuleDict({a: Chain([mx, model[a]]), b: Chain([my, model[b]])})

    inner = (lambda model: validate(chained(model))) if validate is not None else None
    fitted = plain(base, overrides, ax, ay, remap_pairs(pairs, xs, ys), names, inner, checkpoint, device, log)
    info = {**fitted.info, "anchor_input": spec.model_dump(), "anchor_dim": ax.dim,
            "train_seconds": fitted.info["train_seconds"] + map_seconds}
    return type(fitted)(dict(chained(fitted.projections)), fitted.logit_scale, info)


__all__ = ["AnchorInput", "Fuse", "fit_closed_form_map", "fit_hybrid", "mapped_features", "remap_pairs"]
