"""A dataset's cached features, modality by modality: what every stage after extraction reads.

:func:`cache_features` extracts (or reuses) one store per modality and returns :class:`Cached`: for each
modality the stored rows (its layers concatenated, memory-mapped) and, for every record, the rows of
its items (an image's one row, a record's several caption rows), so stages address features by
record index and modality name and never by store layout.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt

from unialign.encoders.base import FINAL, Encoder
from unialign.errors import DataError

from ..data.records import Dataset
from .extract import extract
from .store import FeatureStore

Log = Callable[[str], None]


class ExtractConfig(BaseModel):
    """The ``extract`` section of a run configuration: how encoders run over a dataset."""

    model_config = ConfigDict(extra="forbid")

    batch_size: PositiveInt
    dtype: str = Field(pattern="^(float16|float32)$", description="stored dtype of the features")
    num_workers: NonNegativeInt | None = Field(description="decoding worker processes (null: cores - 1, at most 4)")
    strict: bool = Field(description="stop at the first unreadable item instead of skipping and listing it")


class Features:
    """Row-gatherable features: one array, or several layers concatenated along the feature axis
    (what a layer-mixing head reads). Arrays may be numpy or memory-mapped ``ShardedArray``s.
    ``steps``: time steps each row holds side by side in every layer (a ``pool=concat`` video encoder's
    frames; 1 for pooled features), which a temporal head needs to see the frames."""

    def __init__(self, arrays: Sequence[Any], names: Sequence[str] | None = None, steps: int = 1):
        self.arrays = list(arrays)
        self.steps = int(steps)
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

    def __getitem__(self, rows: Any) -> np.ndarray:
        parts = [np.asarray(a[rows], dtype=np.float32) for a in self.arrays]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


@dataclass
class ModalityFeatures:
    """One modality's features of a dataset, addressed by record."""

    modality: str
    store: FeatureStore
    features: Features
    offsets: np.ndarray  # record i's rows are flat[offsets[i]:offsets[i+1]]
    flat: np.ndarray

    @classmethod
    def build(cls, ds: Dataset, modality: str, store: FeatureStore, layers: Sequence[str], steps: int = 1
              ) -> "ModalityFeatures":
        row_of = {it: j for j, it in enumerate(store.items())}
        per = [[row_of[it] for it in ds.items(i, modality) if it in row_of] for i in range(len(ds))]
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in per])]).astype(np.int64)
        flat = np.fromiter((r for p in per for r in p), dtype=np.int64, count=int(offsets[-1]))
        return cls(modality, store, Features([store.array(l) for l in layers], list(layers), steps),
                   offsets, flat)

    def rows(self, i: int) -> np.ndarray:
        """Feature rows of record ``i``'s items (empty when it has none that could be encoded)."""
        return self.flat[self.offsets[i] : self.offsets[i + 1]]

    def first_rows(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(row of each record's first item, the records that have one): one row per record, e.g. an image."""
        idx = np.asarray(indices, dtype=np.int64)
        has = self.offsets[idx + 1] > self.offsets[idx]
        return self.flat[self.offsets[idx[has]]], idx[has]

    def record_features(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(features of each record's first item, the records that have one)."""
        rows, kept = self.first_rows(indices)
        return self.features[rows], kept


@dataclass
class Cached:
    """A dataset with the cached features of some of its modalities."""

    dataset: Dataset
    modalities: dict[str, ModalityFeatures] = field(default_factory=dict)

    def __getitem__(self, modality: str) -> ModalityFeatures:
        if modality not in self.modalities:
            raise DataError(f"no cached {modality} features for {self.dataset.name}; have {sorted(self.modalities)}")
        return self.modalities[modality]

    def __contains__(self, modality: str) -> bool:
        return modality in self.modalities


def cache_features(ds: Dataset, encoders: Mapping[str, Encoder], layers: Mapping[str, Sequence[str]],
                   cfg: ExtractConfig, log: Log = print, show_progress: bool = True) -> Cached:
    """Extract (or reuse) a store per modality of ``encoders`` (keyed by modality) and index it by record."""
    t0 = time.perf_counter()
    cached = Cached(ds)
    for m, enc in encoders.items():
        want = list(layers.get(m, [FINAL]))
        log(f"{m} encoder {enc.spec} runs on {enc.backend_info()}")
        store = extract(ds, enc, layers=want, batch_size=cfg.batch_size, dtype=cfg.dtype, strict=cfg.strict,
                        num_workers=cfg.num_workers, modality=m, show_progress=show_progress)
        if store.skipped:
            log(f"{ds.name}: {len(store.skipped)} {m} item(s) skipped (listed in {store.root}/manifest.json)")
        cached.modalities[m] = ModalityFeatures.build(ds, m, store, want, enc.steps)
    sizes = ", ".join(f"{len(c.store)} {m}" for m, c in cached.modalities.items())
    log(f"features for {ds.name} ready in {time.perf_counter() - t0:.1f}s ({sizes})")
    return cached


__all__ = ["Cached", "ExtractConfig", "Features", "ModalityFeatures", "cache_features"]
