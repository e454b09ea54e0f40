"""Scores that need time to be right: which of an object's motions a clip shows.

For datasets whose records carry a ``motion`` and a ``meta["reverse"]`` map of each motion to its time
reverse (the moving-emoji clips): every held-out clip is matched against the captions of its own
object only, so the object is given and only the motion is asked. Two scores:

- ``motion``: the right caption among all of the object's motions (chance 1 / number of motions);
- ``reverse_pair``: the right caption against the caption of the reversed motion ("moving left" vs
  "moving right"; chance 1/2). Features that average frames score 1/2 here whatever they are trained
  on: a clip and its reverse give them the same features.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from unialign.model import AlignedModel

from ..features.cache import Cached
from .metrics import zero_shot_scores


def motion_scores(model: AlignedModel, cached: Cached, indices: Sequence[int], query: str = "video") -> dict[str, float]:
    """``motion`` and ``reverse_pair`` accuracy (and their chance levels) of the records ``indices``."""
    ds, Q, T = cached.dataset, cached[query], cached["text"]
    reverse = ds.meta.get("reverse") or {}
    by_obj: dict[str, list[int]] = {}
    for i in indices:
        by_obj.setdefault(ds.records[int(i)]["concept"], []).append(int(i))
    hits, pair_hits, n_motions = 0.0, [], []
    for recs in by_obj.values():
        motions = [ds.records[i]["motion"] for i in recs]
        q = model.project(query, Q.record_features(recs)[0])
        cap = model.project("text", T.features[np.array([T.rows(i)[0] for i in recs])])
        hits += zero_shot_scores(q, cap, list(range(len(recs))))["acc1"] * len(recs)
        n_motions.append(len(recs))
        sim = (q @ cap.T).numpy()
        for a, m in enumerate(motions):
            if reverse.get(m) in motions:
                b = motions.index(reverse[m])
                pair_hits.append(float(sim[a, a] > sim[a, b]))
    n = sum(n_motions)
    return {"motion": hits / max(1, n), "motion_chance": float(np.mean([1 / k for k in n_motions])),
            "reverse_pair": float(np.mean(pair_hits)) if pair_hits else float("nan"), "reverse_pair_chance": 0.5}


__all__ = ["motion_scores"]
