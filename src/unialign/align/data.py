"""Training data on cached features: which text rows caption which image row, and batch gathering
from (possibly memory-mapped, possibly multi-layer) feature arrays."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


class Features:
    """Row-gatherable features: one array, or several layers concatenated along the feature axis
    (what the layer-mixing head reads). Arrays may be numpy or memory-mapped ``ShardedArray``s."""

    def __init__(self, arrays: Sequence, names: Sequence[str] | None = None):
        self.arrays = list(arrays)
        lengths = {len(a) for a in self.arrays}
        if len(lengths) != 1:
            raise ValueError(f"feature arrays have different row counts: {sorted(lengths)}")
        self.dims = [int(a.shape[1]) for a in self.arrays]
        self.names = list(names) if names else [f"part{i}" for i in range(len(self.arrays))]

    @property
    def dim(self) -> int:
        return sum(self.dims)

    def __len__(self) -> int:
        return len(self.arrays[0])

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        parts = [np.asarray(a[rows], dtype=np.float32) for a in self.arrays]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


@dataclass
class Pairs:
    """Image rows and, for each, the text rows of its captions (ragged, stored flat).

    ``groups`` holds one integer per image (its concept): pairs of the same group are not negatives.
    """

    image_rows: np.ndarray
    text_flat: np.ndarray
    text_offsets: np.ndarray
    groups: np.ndarray

    @classmethod
    def from_lists(cls, image_rows: Sequence[int], text_rows: Sequence[Sequence[int]], groups: Sequence[int]) -> "Pairs":
        keep = [i for i, t in enumerate(text_rows) if len(t) > 0]  # an image with no caption cannot be paired
        lens = [len(text_rows[i]) for i in keep]
        return cls(
            image_rows=np.asarray([image_rows[i] for i in keep], dtype=np.int64),
            text_flat=np.asarray([r for i in keep for r in text_rows[i]], dtype=np.int64),
            text_offsets=np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
            groups=np.asarray([groups[i] for i in keep], dtype=np.int64),
        )

    def __len__(self) -> int:
        return len(self.image_rows)

    def n_captions(self) -> np.ndarray:
        return np.diff(self.text_offsets)

    def caption_rows(self, items: np.ndarray, draw: np.ndarray, shift: int = 0) -> np.ndarray:
        """One caption row per item: caption ``floor(draw * n) + shift`` (mod n) of each item."""
        n = self.text_offsets[items + 1] - self.text_offsets[items]  # not n_captions(): this runs every step
        pick = (np.floor(draw * n).astype(np.int64) + shift) % n
        return self.text_flat[self.text_offsets[items] + pick]

    def subset(self, items: np.ndarray) -> "Pairs":
        rows = [self.text_flat[self.text_offsets[i] : self.text_offsets[i + 1]] for i in items]
        return Pairs.from_lists(self.image_rows[items].tolist(), [r.tolist() for r in rows], self.groups[items].tolist())
