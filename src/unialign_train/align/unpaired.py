"""Semi-supervised alignment: unpaired images and texts refine a map fitted on a few pairs.

The idea of SUE / SOTAlign (REFERENCE.md section 9) in closed form: a *teacher* map is fitted on the
pairs; it embeds a set of images and a set of texts that come without correspondences (other concepts'
images and captions, with the pairing thrown away); an entropic optimal-transport plan between the two
sets (Sinkhorn on the teacher's cosines, uniform marginals) proposes correspondences; the confident
ones (mutual best matches under the plan, the most certain ``fraction`` of them) join the pairs as
pseudo-pairs, each its own group, and the map is refitted. ``rounds`` repeats the last two steps with
the refitted map as the teacher.

Why transport rather than nearest neighbours: the plan's marginals stop one hub text from taking every
image (the hubness that nearest-neighbour pseudo-labelling suffers from), which is what SOTAlign's
Sinkhorn plans buy.

The unpaired sets are the caller's choice, and that choice decides what a result means: drawn from
training data only it is semi-supervised; drawn from the test images (and the test class prompts) it
is *transductive* and is reported in a separate row, never as a default.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ..features.cache import Cached, Features
from .hybrid import mapped_features
from .pairs import Pairs


Log = Callable[[str], None]
# Recipes and fits are typed ``Any`` here: recipes.py imports this module for its settings model, and
# fit.py calls into it, so naming their types would close an import cycle (lint-imports forbids one).


class Unpaired(BaseModel):
    """How unpaired data refines the map (settings of the recipe's ``unpaired`` block)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rounds: int = Field(1, ge=1, le=10, description="teacher -> pseudo-pairs -> refit repetitions")
    fraction: float = Field(0.5, gt=0.0, le=1.0, description="share of the mutual best matches kept (most certain first)")
    epsilon: float = Field(0.05, gt=0.0, description="entropic regularisation of the transport plan, in cosine units")
    iterations: int = Field(100, ge=1, description="Sinkhorn iterations")
    max_rows: int = Field(8000, ge=1, description="at most this many unpaired rows per side, a seeded draw: the "
                                                  "plan is dense (rows x rows floats, several copies per iteration)")


def sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """Entropic OT plan with uniform marginals for a (m, n) score matrix (higher: more similar), in the
    log domain so small ``epsilon`` does not underflow. Rows sum to 1/m, columns to 1/n (converged)."""
    m, n = scores.shape
    log_k = scores.float() / epsilon  # cosines / epsilon: |values| <= 1/epsilon, float32 is ample
    log_a, log_b = torch.full((m,), -math.log(m), dtype=log_k.dtype), torch.full((n,), -math.log(n), dtype=log_k.dtype)
    u, v = torch.zeros_like(log_a), torch.zeros_like(log_b)
    for _ in range(iterations):
        u = log_a - torch.logsumexp(log_k + v[None, :], dim=1)
        v = log_b - torch.logsumexp(log_k + u[:, None], dim=0)
    return (log_k + u[:, None] + v[None, :]).exp()


def pseudo_pairs(plan: torch.Tensor, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Mutual best matches under the plan (row i's best column j has i as its best row), the most
    certain ``fraction`` of them (by the plan's mass on the match relative to its row's mass), as
    (row indices, column indices)."""
    best_col = plan.argmax(dim=1)
    best_row = plan.argmax(dim=0)
    rows = torch.nonzero(best_row[best_col] == torch.arange(len(plan)), as_tuple=True)[0]
    cols = best_col[rows]
    certainty = plan[rows, cols] / plan[rows].sum(dim=1).clamp_min(1e-300)
    keep = torch.argsort(certainty, descending=True, stable=True)[: max(1, int(round(fraction * len(rows))))] if len(rows) else rows
    return rows[keep].numpy(), cols[keep].numpy()


def with_pseudo_pairs(pairs: Pairs, x_rows: np.ndarray, y_rows: np.ndarray) -> Pairs:
    """The pairs plus one record per pseudo-pair, each in a new group of its own (no concept is known)."""
    start = int(pairs.groups.max()) + 1 if len(pairs) else 0
    xs = [pairs.x_flat[pairs.x_offsets[i] : pairs.x_offsets[i + 1]].tolist() for i in range(len(pairs))]
    ys = [pairs.y_flat[pairs.y_offsets[i] : pairs.y_offsets[i + 1]].tolist() for i in range(len(pairs))]
    xs += [[int(r)] for r in x_rows]
    ys += [[int(r)] for r in y_rows]
    return Pairs.from_lists(xs, ys, pairs.groups.tolist() + list(range(start, start + len(x_rows))))


def _at_most(rows: np.ndarray, n: int) -> np.ndarray:
    """``rows``, or a seeded draw of ``n`` of them in their order."""
    return rows if len(rows) <= n else np.sort(np.random.default_rng(0).choice(rows, size=n, replace=False))


def unpaired_rows(cached: Cached, records: Sequence[int], x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``x`` and ``y`` feature rows of ``records`` (each sorted, without repeats), their pairing thrown
    away: the ``unpaired`` argument of :func:`fit_unpaired`."""
    def rows(m: str) -> np.ndarray:
        parts = [cached[m].rows(int(i)) for i in records]
        return np.unique(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, np.int64)
    return rows(x), rows(y)


def fit_unpaired(recipe: Any, overrides: dict[str, Any] | None, x: Features, y: Features, pairs: Pairs,
                 names: Sequence[str], unpaired: tuple[np.ndarray, np.ndarray] | None, device: str, log: Log,
                 plain: Callable[..., Any], layer_weights: Mapping[str, float] | None = None) -> Any:
    """Fit ``recipe`` (closed-form, with an ``unpaired`` block) on ``pairs``, refined by the unpaired rows
    ``unpaired = (x rows, y rows)`` of ``x`` / ``y`` (module docstring). Without unpaired rows it is the
    teacher alone. Every fit joins layers by ``layer_weights`` (layer_weights.py)."""
    t0 = time.perf_counter()
    spec: Unpaired = recipe.unpaired
    base = recipe.model_copy(update={"unpaired": None})
    fitted = plain(base, overrides, x, y, pairs, names, None, None, device, log, layer_weights=layer_weights)
    if unpaired is None or min(len(unpaired[0]), len(unpaired[1])) == 0:
        log(f"{recipe.name}: no unpaired data given; the map fitted on the pairs alone")
        return type(fitted)(fitted.projections, fitted.logit_scale, {**fitted.info, "recipe": recipe.name, "pseudo_pairs": 0})
    ux, uy = (_at_most(np.asarray(r, dtype=np.int64), spec.max_rows) for r in unpaired)
    a, b = names
    if (len(ux), len(uy)) != tuple(len(r) for r in unpaired):
        log(f"{recipe.name}: a seeded draw of {len(ux)} of {len(unpaired[0])} unpaired {a} and {len(uy)} of "
            f"{len(unpaired[1])} {b} rows (unpaired.max_rows {spec.max_rows})")
    added = 0
    for r in range(spec.rounds):
        ex = torch.from_numpy(mapped_features(fitted.projections[a], x, ux)[np.arange(len(ux))])
        ey = torch.from_numpy(mapped_features(fitted.projections[b], y, uy)[np.arange(len(uy))])
        scores = F.normalize(ex, dim=-1) @ F.normalize(ey, dim=-1).T
        i, j = pseudo_pairs(sinkhorn(scores, spec.epsilon, spec.iterations), spec.fraction)
        added = len(i)
        log(f"{recipe.name} round {r + 1}: {added} pseudo-pairs from {len(ux)} unpaired {a} and {len(uy)} {b} rows")
        fitted = plain(base, overrides, x, y, with_pseudo_pairs(pairs, ux[i], uy[j]), names, None, None, device, log,
                       layer_weights=layer_weights)
    info = {**fitted.info, "recipe": recipe.name, "pseudo_pairs": added, "n_unpaired": [len(ux), len(uy)],
            "train_seconds": time.perf_counter() - t0}
    return type(fitted)(fitted.projections, fitted.logit_scale, info)


__all__ = ["Unpaired", "fit_unpaired", "pseudo_pairs", "sinkhorn", "unpaired_rows", "with_pseudo_pairs"]
