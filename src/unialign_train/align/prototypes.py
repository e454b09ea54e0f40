"""Concept prototypes for pair sampling: one training record per concept, whose first-modality item is
the mean of that concept's items across its records (a concept drawn in three styles becomes its mean
drawing) and whose second-modality items are all the concept's captions.

Averaging several exemplars of a concept raises cross-modal alignment (He, Trott, Khosla 2025), and
concept-level maps generalise to held-out concepts (Li et al., TACL 2024). The closed-form recipes take
the same idea as their ``prototypes`` parameter (anchors = concept means); this module gives it to the
trained recipes (``train.prototypes: true``), by rewriting their pairs before the loop sees them.
"""
from __future__ import annotations

import numpy as np

from ..features.cache import Features
from .pairs import Pairs


def prototype_pairs(x: Features, pairs: Pairs) -> tuple[Features, Pairs]:
    """(prototype features, pairs over them): row g of the new features is the mean of the x rows of
    group g's records, layer by layer (so a layer-mixing head still sees its layers); its y rows are the
    distinct y rows of those records, in first-seen order. Groups keep their order of first appearance."""
    groups = list(dict.fromkeys(pairs.groups.tolist()))
    members = {g: [] for g in groups}
    for i, g in enumerate(pairs.groups.tolist()):
        members[g].append(i)
    x_rows, y_rows = [], []
    for g in groups:
        recs = members[g]
        x_rows.append(np.concatenate([pairs.x_flat[pairs.x_offsets[i]:pairs.x_offsets[i + 1]] for i in recs]))
        y_rows.append(list(dict.fromkeys(int(r) for i in recs for r in pairs.y_flat[pairs.y_offsets[i]:pairs.y_offsets[i + 1]])))
    arrays = [np.stack([np.asarray(a[rows], dtype=np.float32).mean(0) for rows in x_rows]) for a in x.arrays]
    return Features(arrays, x.names, x.steps), Pairs.from_lists(list(range(len(groups))), y_rows, groups)


__all__ = ["prototype_pairs"]
