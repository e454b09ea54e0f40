"""The evaluation protocol: concept-level train/val/test splits, styles held out, from dataset metadata.

Splitting by concept, never by record, is what makes evaluation honest here: the same emoji drawn by
another vendor is nearly the same picture, so a record-level split would measure memorisation. The
concept split depends only on the set of concepts and the seed (sorted, then a numpy ``default_rng``
permutation), so every stage and every machine gets the same split without storing it.

Which styles train and which test comes from the configuration, else from the dataset's own
``meta["protocol"]`` (the emoji builder records google + twitter + openmoji for training and apple for
testing), else every style is used for everything.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator

from unialign.errors import ConfigError, DataError

from .records import Dataset

PARTS = ("train", "val", "test")


class DataConfig(BaseModel):
    """The ``data`` section of a run configuration (every field is given by the packaged default)."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(description="emoji, fashion-mnist[:train|:test], a table (.csv/.jsonl/.parquet), a class "
                                     "folder, or a saved dataset folder")
    train_styles: list[str] | None = Field(description="styles to train (and validate) on; null: the dataset's own "
                                                       "protocol, else all")
    test_styles: list[str] | None = Field(description="styles to test on; null: the dataset's own protocol, else all")
    split: tuple[float, float, float] = Field(description="train / val / test fractions of the concepts")
    split_seed: int
    max_train_concepts: PositiveInt | None = Field(description="low-data runs: a seeded draw of this many training concepts")
    subset: str | None = Field(description="a subset file from `unialign curate`: train only on these records")
    concepts: Literal["split", "shared"] | None = Field(
        default=None, description="split: train/val/test concepts disjoint (held-out concepts); shared: every concept "
                                  "in every part, held-out styles only (e.g. pitches, voices); null: the dataset's "
                                  "own protocol, else split")

    @field_validator("split")
    @classmethod
    def _fractions(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        check_fractions(v)
        return v


@dataclass
class Splits:
    """Record indices of each part, and the concepts of each part."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    concepts: dict[str, list[str]]
    train_styles: list[str] | None
    test_styles: list[str] | None


def split_concepts(concepts: Iterable[str], fractions: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 0) -> dict[str, list[str]]:
    """Split unique concepts into disjoint ``train``/``val``/``test`` lists that cover them all.

    Sizes follow the fractions by largest remainder, then every part is given at least one concept
    (taken from the largest part), so a small set never yields an empty validation or test split.
    Each list is returned sorted.
    """
    fr = check_fractions(fractions)
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


def check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
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


def protocol_styles(ds: Dataset, cfg: DataConfig) -> tuple[list[str] | None, list[str] | None]:
    """(train styles, test styles): the configuration's, else the dataset's protocol, else None (all)."""
    own = ds.meta.get("protocol") or {}
    train_s = cfg.train_styles if cfg.train_styles is not None else own.get("train_styles")
    test_s = cfg.test_styles if cfg.test_styles is not None else own.get("test_styles")
    present = set(ds.column("style"))
    for key, styles in (("data.train_styles", train_s), ("data.test_styles", test_s)):
        missing = sorted(set(styles or []) - present)
        if missing:
            raise ConfigError(f"{key}: style(s) {missing} not in dataset {ds.name}; it has {sorted(present)}")
    return (list(train_s) or None) if train_s else None, (list(test_s) or None) if test_s else None


def make_splits(ds: Dataset, cfg: DataConfig) -> Splits:
    """Concept split (train/val/test concepts disjoint); training and validation in the training
    styles, test in the held-out styles (all styles for datasets without a protocol).

    With ``concepts: shared`` (the configuration's, else the dataset's protocol) every concept is in
    every part and only styles are held out: a set whose classes are fixed and whose test measures
    another condition (held-out pitches of the same instruments, a real voice after synthetic ones).
    Validation then uses the protocol's ``val_styles``, which must differ from the training styles."""
    own = ds.meta.get("protocol") or {}
    if (cfg.concepts or own.get("concepts") or "split") == "shared":
        return _shared_splits(ds, cfg, own)
    concepts = split_concepts(ds.concepts(), cfg.split, cfg.split_seed)
    if cfg.max_train_concepts is not None:  # a seeded random draw: the sorted prefix would be all flags
        rng = np.random.default_rng([cfg.split_seed, 1])
        n = min(cfg.max_train_concepts, len(concepts["train"]))
        concepts["train"] = sorted(rng.choice(concepts["train"], size=n, replace=False).tolist())
    train_styles, test_styles = protocol_styles(ds, cfg)
    sp = Splits(ds.indices(styles=train_styles, concepts=concepts["train"]),
                ds.indices(styles=train_styles, concepts=concepts["val"]),
                ds.indices(styles=test_styles, concepts=concepts["test"]), concepts, train_styles, test_styles)
    if cfg.subset:
        from .subsets import load_subset

        sp.train = np.intersect1d(sp.train, load_subset(cfg.subset))
    for name in PARTS:
        if len(getattr(sp, name)) == 0:
            raise DataError(f"the {name} split of {ds.name} is empty (styles {train_styles if name != 'test' else test_styles}); "
                            "check data.split, data.train_styles and data.test_styles")
    return sp


def _shared_splits(ds: Dataset, cfg: DataConfig, own: dict) -> Splits:
    """Every concept in every part; train / val / test told apart by style only (see make_splits)."""
    train_styles, test_styles = protocol_styles(ds, cfg)
    val_styles = own.get("val_styles")
    if not train_styles or not test_styles or not val_styles:
        raise ConfigError(f"{ds.name}: shared concepts need train, val and test styles (data.train_styles, "
                          "data.test_styles and the dataset's val_styles); the parts would overlap otherwise")
    if set(val_styles) & set(train_styles) or set(test_styles) & (set(train_styles) | set(val_styles)):
        raise ConfigError(f"{ds.name}: with shared concepts the train {train_styles}, val {val_styles} and test "
                          f"{test_styles} styles must not overlap")
    every = sorted(ds.concepts())
    train = every
    if cfg.max_train_concepts is not None:
        rng = np.random.default_rng([cfg.split_seed, 1])
        train = sorted(rng.choice(every, size=min(cfg.max_train_concepts, len(every)), replace=False).tolist())
    sp = Splits(ds.indices(styles=train_styles, concepts=train), ds.indices(styles=val_styles),
                ds.indices(styles=test_styles), {"train": train, "val": every, "test": every}, train_styles, test_styles)
    if cfg.subset:
        from .subsets import load_subset

        sp.train = np.intersect1d(sp.train, load_subset(cfg.subset))
    for name in PARTS:
        if len(getattr(sp, name)) == 0:
            raise DataError(f"the {name} split of {ds.name} is empty; check data.train_styles and data.test_styles")
    return sp


def unpaired_training(ds: Dataset, cfg: DataConfig, splits: Splits) -> np.ndarray:
    """Training records the run does not pair: those of the full training split that ``max_train_concepts``
    (or ``data.subset``) left out. Their images and texts, with the pairing thrown away, are what a recipe
    with an ``unpaired`` block learns from; empty when the run pairs every training record."""
    full = make_splits(ds, cfg.model_copy(update={"max_train_concepts": None, "subset": None}))
    return np.setdiff1d(full.train, splits.train)


def heldout_name(ds: Dataset, splits: Splits) -> str:
    """The dataset name of the test records, e.g. ``emoji-test-apple``."""
    return f"{ds.name}-test" + (f"-{'+'.join(splits.test_styles)}" if splits.test_styles else "")


def balanced_subset(ds: Dataset, n: int, seed: int = 0) -> Dataset:
    """About ``n`` records, the same number per concept, chosen with a seeded generator."""
    rng = np.random.default_rng(seed)
    concepts = ds.concepts()
    per = max(1, n // len(concepts))
    pick = [rng.permutation(ds.indices(concepts=[c]))[:per] for c in concepts]
    sub = ds.subset(np.sort(np.concatenate(pick)))
    sub.name = f"{ds.name}-{len(sub)}"
    return sub


__all__ = ["DataConfig", "PARTS", "Splits", "balanced_subset", "check_fractions", "make_splits", "protocol_styles",
           "split_concepts", "heldout_name", "unpaired_training"]
