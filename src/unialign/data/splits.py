"""Concept-level train/val/test splits.

Splitting by concept, never by image, is what makes evaluation honest here: the same emoji drawn by
another vendor is nearly the same picture, so an image-level split would measure memorisation. The split
depends only on the set of concepts and the seed (sorted, then a numpy ``default_rng`` permutation), so
every stage and every machine gets the same split without storing it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from ..errors import ConfigError, DataError
from .base import PairDataset

PARTS = ("train", "val", "test")


def split_concepts(
    concepts: Iterable[str],
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
) -> dict[str, list[str]]:
    """Split unique concepts into disjoint ``train``/``val``/``test`` lists that cover them all.

    Sizes follow the fractions by largest remainder, then every part is given at least one concept
    (taken from the largest part), so a small set never yields an empty validation or test split.
    Each list is returned sorted.
    """
    fr = _check_fractions(fractions)
    unique = sorted({str(c) for c in concepts})
    n = len(unique)
    if n < len(PARTS):
        raise DataError(f"need at least {len(PARTS)} distinct concepts to split into {PARTS}, got {n}")
    exact = np.asarray(fr) * n
    sizes = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - sizes), kind="stable")[: n - sizes.sum()]:
        sizes[i] += 1
    for i in range(len(sizes)):
        if sizes[i] == 0:
            sizes[int(np.argmax(sizes))] -= 1
            sizes[i] = 1
    order = np.random.default_rng(seed).permutation(n)
    bounds = np.cumsum(sizes)[:-1]
    return {part: sorted(unique[j] for j in idx) for part, idx in zip(PARTS, np.split(order, bounds))}


def _check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    try:
        fr = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        raise ConfigError(f"split fractions must be {len(PARTS)} numbers (train, val, test), got {fractions!r}") from None
    if len(fr) != len(PARTS):
        raise ConfigError(f"split fractions must be {len(PARTS)} numbers (train, val, test), got {fractions!r}")
    if any(not np.isfinite(f) or f <= 0 for f in fr):
        raise ConfigError(f"split fractions must all be positive, got {fractions!r}")
    if abs(sum(fr) - 1.0) > 1e-6:
        raise ConfigError(f"split fractions must sum to 1, got {fractions!r} (sum {sum(fr):g})")
    return fr


@dataclass(frozen=True)
class ConceptSplit:
    """A concept split plus the record indices it selects in a dataset (optionally limited to styles)."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    seed: int = 0

    @classmethod
    def of(cls, dataset: PairDataset, fractions: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 0) -> "ConceptSplit":
        parts = split_concepts(dataset.concepts(), fractions, seed)
        return cls(tuple(parts["train"]), tuple(parts["val"]), tuple(parts["test"]), seed)

    def concepts(self, part: str) -> tuple[str, ...]:
        if part not in PARTS:
            raise ConfigError(f"split part must be one of {PARTS}, got {part!r}")
        return getattr(self, part)

    def indices(self, dataset: PairDataset, part: str, styles: Iterable[str] | None = None) -> np.ndarray:
        """Record indices of ``part``'s concepts, e.g. ``indices(ds, "test", styles=["openmoji"])``."""
        return dataset.indices(styles=styles, concepts=self.concepts(part))

    def as_dict(self) -> dict[str, list[str]]:
        return {p: list(self.concepts(p)) for p in PARTS}


__all__ = ["split_concepts", "ConceptSplit", "PARTS"]
