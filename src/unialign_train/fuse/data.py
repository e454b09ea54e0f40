"""What a fusion head learns from: a target in each record's metadata, each record's items of several
modalities as pooled features and as tokens, and the protocol's train / validation / test records.

A caption must not name the target: the emoji captions include the subcategory ("face smiling"), which
would make subcategory prediction from text a lookup. :func:`leak_free_caption` drops every caption that
contains the record's target value (case, hyphens and ampersands aside) and keeps the longest of the rest
(for emoji, "annotation: tags"), the same caption in training and test.

Token modules read at most ``max_tokens`` tokens of an item (:func:`prepare`): attention and the
managers' per-token maps cost in proportion to the padded length, and the longest captions (49 word
pieces for emoji categories; 95% have at most 33) would otherwise set every batch's length. The cut
drops the tail of a long caption's tag list; pooled modules read the whole caption.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from unialign.errors import DataError

from ..data.records import Dataset
from ..evaluate.metrics import logit_scores, regression_scores
from ..features.cache import Cached
from .modules import Batch
from .tokens import TokenStore

Kind = Literal["classification", "regression"]


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[-_&/]+", " ", str(text).lower()).split())


def leak_free_caption(record: Mapping[str, Any], target: str) -> str | None:
    """The record's longest caption that does not contain its ``target`` value (first of equals); None
    when every caption names it (or there is none)."""
    value = _norm(record.get(target, "") or "")
    captions = [c for c in dict.fromkeys(record.get("text") or []) if isinstance(c, str) and c.strip()]
    keep = [c for c in captions if not value or value not in _norm(c)]
    return max(keep, key=len) if keep else None


class Target:
    """The prediction target: outputs per record, the training loss and the scores of predictions.

    Classification: one logit per class (every value the dataset holds, so a class absent from the
    training concepts is still a possible answer), cross-entropy, acc1 / acc5 / mean per-class recall.
    Regression: one output, mean squared error on the target standardised with training statistics,
    MAE / RMSE / R^2 in the target's units."""

    def __init__(self, kind: Kind, classes: list[str] | None = None, mean: float = 0.0, std: float = 1.0):
        self.kind, self.classes, self.mean, self.std = kind, classes, float(mean), float(std)

    @property
    def n_out(self) -> int:
        return len(self.classes) if self.kind == "classification" else 1

    @property
    def primary(self) -> str:
        """The score early stopping maximises."""
        return "acc1" if self.kind == "classification" else "neg_mae"

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.kind == "classification":
            return F.cross_entropy(out, y.long())
        return F.mse_loss(out[:, 0], (y.float() - self.mean) / self.std)

    def predict(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.kind == "classification" else out[:, 0] * self.std + self.mean

    def scores(self, out: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        if self.kind == "classification":
            return logit_scores(out, y.long().numpy())
        s = regression_scores(self.predict(out).numpy(), y.numpy())
        return {**s, "neg_mae": -s["mae"]}

    def chance(self, y: np.ndarray) -> dict[str, float]:
        """A guesser that ignores the inputs: uniform over classes, or the training mean."""
        if self.kind == "classification":
            n = len(self.classes)
            return {"acc1": 1.0 / n, "acc5": min(5, n) / n, "mean_per_class_recall": 1.0 / n}
        return regression_scores(np.full(len(y), self.mean), y)


@dataclass
class FuseData:
    """A dataset prepared for fusion: each record's target, its pooled features and token rows per
    modality (``has[m]`` False where it has no item of m), and the record indices of each part."""

    dataset: Dataset
    target_name: str
    target: Target
    y: np.ndarray  # per record: class index (int64) or value (float32)
    parts: dict[str, np.ndarray]
    items: dict[str, list[str | None]]
    pooled: dict[str, np.ndarray]
    has: dict[str, np.ndarray]
    tokens: dict[str, TokenStore]
    token_rows: dict[str, np.ndarray]
    max_tokens: int | None = None  # token sequences cut after this many (None: whole)

    @property
    def modalities(self) -> list[str]:
        return list(self.pooled)

    def dims(self) -> dict[str, int]:
        return {m: int(x.shape[1]) for m, x in self.pooled.items()}

    def token_dims(self) -> dict[str, list[int]]:
        return {m: t.dims for m, t in self.tokens.items()}

    def batch(self, idx: Sequence[int], drop: Mapping[str, np.ndarray] | None = None, tokens: bool = False,
              fixed_length: bool = False) -> tuple[Batch, torch.Tensor]:
        """A :class:`Batch` of records ``idx`` and their targets; ``drop[m]`` (bool per record) hides
        modality m as if the record lacked it."""
        idx = np.asarray(idx, dtype=np.int64)
        present = {m: self.has[m][idx].copy() for m in self.modalities}
        for m, hidden in (drop or {}).items():
            present[m] &= ~np.asarray(hidden, dtype=bool)
        pooled = {m: torch.from_numpy(self.pooled[m][idx]) for m in self.modalities}
        toks = {}
        if tokens:
            for m, store in self.tokens.items():
                toks[m] = store.gather(self.token_rows[m][idx], pad_to=store.max_tokens if fixed_length else None,
                                       max_tokens=self.max_tokens)
        y = torch.from_numpy(self.y[idx])
        return Batch(pooled, toks, {m: torch.from_numpy(p) for m, p in present.items()}), y


def record_items(ds: Dataset, modality: str, target: str) -> list[str | None]:
    """Each record's item of ``modality`` that fusion reads: its image (audio, ...) file, its leak-free
    caption, its vector key; None when it has none."""
    if modality == "text":
        return [leak_free_caption(r, target) for r in ds.records]
    return [(ds.items(i, modality) or [None])[0] for i in range(len(ds))]


def target_of(ds: Dataset, target: str, kind: Kind) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """(values, records that have one, classes): class indices over every value present in the dataset
    (sorted), or floats."""
    raw = ds.column(target)
    if all(v is None or v == "" for v in raw):
        extra = sorted(k for k in ds.records[0] if k not in ("id", "image", "text")) if len(ds) else []
        raise DataError(f"records of {ds.name} have no {target!r} value; fields: {', '.join(extra)}")
    if kind == "classification":
        classes = sorted({str(v) for v in raw if v is not None and v != ""})
        cid = {c: j for j, c in enumerate(classes)}
        y = np.asarray([cid.get(str(v), -1) if v not in (None, "") else -1 for v in raw], dtype=np.int64)
        return y, y >= 0, classes
    y = np.full(len(raw), np.nan, dtype=np.float32)
    for i, v in enumerate(raw):
        try:
            y[i] = float(v)
        except (TypeError, ValueError):
            pass
    if not np.isfinite(y).any():
        raise DataError(f"{target!r} of {ds.name} holds no numbers; a regression target must")
    return y, np.isfinite(y), None


def prepare(ds: Dataset, parts: Mapping[str, Sequence[int]], target: str, kind: Kind, cached: Cached,
            tokens: Mapping[str, TokenStore] | None = None, modalities: Sequence[str] | None = None,
            max_tokens: int | None = None) -> FuseData:
    """Assemble :class:`FuseData` from a dataset, its parts (record indices), the cached pooled features
    of each modality (``cache_features``) and, for token modules, a token store per modality holding each
    record's item (sequences cut after ``max_tokens``). Records without a target value leave the parts."""
    mods = list(modalities or cached.modalities)
    y, labelled, classes = target_of(ds, target, kind)
    parts = {k: np.asarray([i for i in v if labelled[i]], dtype=np.int64) for k, v in parts.items()}
    items = {m: record_items(ds, m, target) for m in mods}
    pooled, has = {}, {}
    for m in mods:
        feats = cached[m]
        row_of = {it: j for j, it in enumerate(feats.store.items())}
        rows = np.asarray([row_of.get(it, -1) if it is not None else -1 for it in items[m]], dtype=np.int64)
        has[m] = rows >= 0
        x = np.zeros((len(ds), feats.features.dim), dtype=np.float32)
        x[has[m]] = feats.features[rows[has[m]]]
        pooled[m] = x
    token_rows = {}
    for m, store in (tokens or {}).items():
        row_of = store.row_of()
        token_rows[m] = np.asarray([row_of.get(it, -1) if it is not None else -1 for it in items[m]], dtype=np.int64)
        has[m] &= token_rows[m] >= 0
    train = parts["train"]
    if kind == "regression":
        mean, std = float(np.mean(y[train])), float(np.std(y[train]))
        tgt = Target(kind, mean=mean, std=std if std > 0 and math.isfinite(std) else 1.0)
    else:
        tgt = Target(kind, classes)
    return FuseData(ds, target, tgt, y, parts, items, pooled, has, dict(tokens or {}), token_rows, max_tokens)


__all__ = ["FuseData", "Target", "leak_free_caption", "prepare", "record_items", "target_of"]
