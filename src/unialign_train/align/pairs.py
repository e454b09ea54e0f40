"""Training pairs on cached features: for each training record, the feature rows of its items in the
two aligned modalities (one image and several captions, one recording and one word, ...), stored flat.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..features.cache import Cached


def _ragged(rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    return np.fromiter((x for r in rows for x in r), dtype=np.int64, count=int(offsets[-1])), offsets


@dataclass
class Pairs:
    """Records that have items in both modalities x and y: the rows of each (ragged, stored flat) and
    one group per record (its concept): pairs of the same group are not contrasted as negatives."""

    x_flat: np.ndarray
    x_offsets: np.ndarray
    y_flat: np.ndarray
    y_offsets: np.ndarray
    groups: np.ndarray

    @classmethod
    def from_lists(cls, x_rows: Sequence[Sequence[int] | int], y_rows: Sequence[Sequence[int]],
                   groups: Sequence[int]) -> "Pairs":
        """Records with at least one row on each side (an int is one x row)."""
        xs = [[r] if isinstance(r, (int, np.integer)) else list(r) for r in x_rows]
        keep = [i for i in range(len(xs)) if len(xs[i]) and len(y_rows[i])]
        x_flat, x_off = _ragged([xs[i] for i in keep])
        y_flat, y_off = _ragged([list(y_rows[i]) for i in keep])
        return cls(x_flat, x_off, y_flat, y_off, np.asarray([groups[i] for i in keep], dtype=np.int64))

    def __len__(self) -> int:
        return len(self.groups)

    def x_counts(self) -> np.ndarray:
        return np.diff(self.x_offsets)

    def y_counts(self) -> np.ndarray:
        return np.diff(self.y_offsets)

    def x_rows(self, items: np.ndarray, draw: np.ndarray) -> np.ndarray:
        """One x row per item. With one x item per record (an image) this is that row; otherwise the
        draw's low-order bits pick one, independently of the y pick made from its high-order bits."""
        n = self.x_offsets[items + 1] - self.x_offsets[items]
        pick = np.floor(np.modf(draw * 1048576.0)[0] * n).astype(np.int64)
        return self.x_flat[self.x_offsets[items] + np.minimum(pick, n - 1)]

    def y_rows(self, items: np.ndarray, draw: np.ndarray, shift: int = 0) -> np.ndarray:
        """One y row per item: item ``floor(draw * n) + shift`` (mod n) of each record."""
        n = self.y_offsets[items + 1] - self.y_offsets[items]  # not y_counts(): this runs every step
        pick = (np.floor(draw * n).astype(np.int64) + shift) % n
        return self.y_flat[self.y_offsets[items] + pick]

    def all_pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every (x row, y row) combination of every record, and its group: the anchors of closed-form fits
        (for an image and its captions: the image once per caption)."""
        nx, ny = self.x_counts(), self.y_counts()
        xs, ys, gs = [], [], []
        for i in range(len(self)):
            xr = self.x_flat[self.x_offsets[i] : self.x_offsets[i + 1]]
            yr = self.y_flat[self.y_offsets[i] : self.y_offsets[i + 1]]
            xs.append(np.repeat(xr, ny[i]))
            ys.append(np.tile(yr, nx[i]))
            gs.append(np.full(nx[i] * ny[i], self.groups[i]))
        cat = lambda a: np.concatenate(a) if a else np.zeros(0, np.int64)  # noqa: E731
        return cat(xs), cat(ys), cat(gs)

    def subset(self, items: np.ndarray) -> "Pairs":
        xs = [self.x_flat[self.x_offsets[i] : self.x_offsets[i + 1]].tolist() for i in items]
        ys = [self.y_flat[self.y_offsets[i] : self.y_offsets[i + 1]].tolist() for i in items]
        return Pairs.from_lists(xs, ys, self.groups[items].tolist())


def make_pairs(cached: Cached, indices: Sequence[int], x: str, y: str) -> Pairs:
    """Pairs of the given records for modalities ``x`` and ``y``; groups are concepts."""
    ds = cached.dataset
    concept_id = {c: i for i, c in enumerate(ds.concepts())}
    X, Y = cached[x], cached[y]
    idx = [int(i) for i in indices]
    return Pairs.from_lists([X.rows(i) for i in idx], [Y.rows(i) for i in idx],
                            [concept_id[ds.records[i]["concept"]] for i in idx])


__all__ = ["Pairs", "make_pairs"]
