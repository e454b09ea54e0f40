"""Concept-rich curation of a dataset's training pairs (Freeze-Align, REFERENCE.md section 1) on the
cached features of the two aligned modalities (``unialign curate``).

The pool is the dataset's pairs -- by default only the *training split* of the protocol
(:func:`~unialign_train.data.make_splits`), so validation and test concepts can never enter a subset.
Each pair is represented either by the mean of its text items' cached features (``prototype="text"``:
concepts are class names through the text encoder, prompt-ensembled over ``templates`` by the one
zero-shot classifier) or by its cached features of the other modality (``prototype="media"``: each
concept's prototype is the mean feature of a few example items from the concepts dataset, e.g.
images). Optionally near-duplicate pairs are removed first (:func:`~unialign_train.curate.dedup_pairs`
on both modalities). The subset is chosen by :func:`~unialign_train.curate.curate`, and the saved
Parquet's ``row`` column holds **dataset record indices**, so ``unialign run --set
data.subset=subset.parquet`` trains on exactly those pairs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from unialign.encoders.base import Encoder
from unialign.io import write_json
from unialign.zeroshot import zero_shot_classifier

from ..data.protocol import DataConfig, make_splits
from ..data.records import Dataset
from ..features.cache import Cached
from .concepts import CurateInputError, CurateOptionError, CurationResult, curate, report_path
from .dedup import dedup_pairs

__all__ = ["DatasetCuration", "check_options", "concept_names", "curate_dataset", "media_prototypes", "pool_features", "text_prototypes"]

Log = Callable[[str], None]
PROTOTYPES = ("text", "media")
FILLS = ("farthest", "kmeans", "none")


# ------------------------------------------------------------------------------------------ pieces


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def concept_names(concepts: "str | Path | Sequence[str] | Dataset") -> tuple[list[str], Dataset | None]:
    """Target concept names and, when they came from a dataset, that dataset (for example items).

    ``concepts`` is a list of names, a text file (one name a line; blank lines and ``#`` comments
    skipped), a dataset spec (``fashion-mnist``, an image folder, ...) or a Dataset. A labelled
    dataset gives its ``classes`` (shown by their labels); any other dataset its unique concept labels.
    """
    from ..data import load_dataset
    from ..data.tables import TABLE_SUFFIXES

    ds = None
    if isinstance(concepts, Dataset):
        ds = concepts
    elif isinstance(concepts, (str, Path)):
        p = Path(concepts).expanduser()
        if p.is_file() and p.suffix.lower() not in TABLE_SUFFIXES:
            names = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
            names = [n for n in names if n and not n.startswith("#")]
            if not names:
                raise CurateOptionError(f"concepts file {p} holds no names (one class name a line)")
            return list(dict.fromkeys(names)), None
        ds = load_dataset(str(concepts))
    else:
        names = [str(n).strip() for n in concepts if str(n).strip()]
        if not names:
            raise CurateOptionError("no concept names given")
        return list(dict.fromkeys(names)), None
    labels = ds.concept_labels()
    keys = list(ds.classes) if ds.classes is not None else ds.concepts()
    return list(dict.fromkeys(labels.get(c, c) for c in keys)), ds


def text_prototypes(encoder: Encoder, layers: Sequence[str], names: Sequence[str],
                    templates: "str | Sequence[str]" = "photo") -> np.ndarray:
    """One prototype per name: the zero-shot classifier of the raw text encoder (prompt ensembling),
    in the space of the cached caption features (same encoder, same layers)."""
    encode = lambda prompts: encoder.encode(prompts, batch_size=256, layers=list(layers), show_progress_bar=False)  # noqa: E731
    return zero_shot_classifier(encode, names, templates).numpy()


def media_prototypes(encoder: Encoder, modality: str, layers: Sequence[str], ds: Dataset, names: Sequence[str],
                     n_examples: int = 8, seed: int = 0) -> np.ndarray:
    """One prototype per concept of ``ds`` (in the order of :func:`concept_names`): the mean of the
    unit-normalised features of up to ``n_examples`` of its items of ``modality``, drawn with ``seed``."""
    if n_examples < 1:
        raise CurateOptionError(f"examples per concept must be >= 1, got {n_examples}")
    labels = ds.concept_labels()
    keys = list(ds.classes) if ds.classes is not None else ds.concepts()
    by_name: dict[str, list[int]] = {}
    key_name = {k: labels.get(k, k) for k in keys}
    for i, r in enumerate(ds.records):
        name = key_name.get(r["concept"])
        if name is not None and ds.items(i, modality):
            by_name.setdefault(name, []).append(i)
    rng = np.random.default_rng(seed)
    protos = []
    for name in names:
        idx = by_name.get(name, [])
        if not idx:
            raise CurateInputError(f"concept {name!r} has no {modality} items in {ds.name}")
        pick = np.sort(rng.choice(idx, size=min(n_examples, len(idx)), replace=False))
        feats = encoder.encode([ds.items(int(i), modality)[0] for i in pick], batch_size=64, layers=list(layers),
                               show_progress_bar=False)
        protos.append(_unit(feats).mean(axis=0))
    return _unit(np.stack(protos))


def pool_features(cached: Cached, indices: np.ndarray, media: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pool pairs that can be trained on (at least one cached item in both ``media`` and text): the
    mean of each one's unit-normalised text features, its ``media`` features, and its record index."""
    T, M = cached["text"], cached[media]
    indices = np.asarray(indices, dtype=np.int64)
    keep = [int(i) for i in indices if len(T.rows(int(i))) and len(M.rows(int(i)))]
    idx = np.asarray(keep, dtype=np.int64)
    if len(idx) == 0:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32), idx
    text_rows = [T.rows(i) for i in keep]
    flat = np.concatenate(text_rows)
    starts = np.concatenate([[0], np.cumsum([len(r) for r in text_rows])[:-1]]).astype(np.int64)
    uniq, inv = np.unique(flat, return_inverse=True)  # gather each caption row once
    caps = _unit(T.features[uniq])[inv]
    counts = np.diff(np.append(starts, len(flat)))
    text = np.add.reduceat(caps, starts, axis=0) / counts[:, None].astype(np.float32)
    return text, M.record_features(idx)[0], idx


# ----------------------------------------------------------------------------------------- library


@dataclass
class DatasetCuration:
    """A curated training subset of one dataset. ``result.rows`` are **dataset record indices** (what
    ``data.subset`` expects); ``pool`` the dataset indices that were candidates (after dedup)."""

    result: CurationResult
    dataset: str
    fingerprint: str
    pool_size: int  # trainable pairs in the pool before dedup
    pool: np.ndarray
    dedup_removed: int
    prototype: str
    info: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def rows(self) -> np.ndarray:
        return self.result.rows

    def report(self) -> dict[str, Any]:
        """The coverage report plus how the subset was made (written next to the subset file)."""
        return {**self.result.coverage(), "dataset": self.dataset, "fingerprint": self.fingerprint,
                "row_meaning": "dataset record index", "pool_size": self.pool_size,
                "pool_after_dedup": int(len(self.pool)), "dedup_removed": self.dedup_removed,
                "prototype": self.prototype, **self.info}

    def summary(self, max_lines: int = 40) -> str:
        """Human-readable coverage: pairs per concept (most-covered last), empty concepts."""
        r = self.result
        cov = r.coverage()
        lines = [f"curated {cov['n_rows']} of {len(self.pool)} pairs from {self.dataset} "
                 f"(pool {self.pool_size}, {self.dedup_removed} near-duplicates removed): "
                 f"{cov['n_concept']} by concept, {cov['n_fill']} by diversity fill; "
                 f"{cov['concepts_covered']}/{cov['n_concepts']} concepts covered"]
        order = np.lexsort((np.arange(len(r.counts)), r.counts))
        shown = order if len(order) <= max_lines else order[:max_lines]
        lines.append(f"{'concept':32s} {'pairs':>5s} {'mean cos':>8s}")
        for c in shown:
            s = r.score[r.concept == c]
            lines.append(f"{r.name(int(c))[:32]:32s} {int(r.counts[c]):5d} {float(s.mean()) if len(s) else float('nan'):8.3f}")
        if len(order) > len(shown):
            lines.append(f"... {len(order) - len(shown)} more concepts (best covered); all in the coverage report")
        empty = [r.name(c) for c in np.flatnonzero(r.counts == 0)]
        lines.append("concepts with no candidates: " + (", ".join(r.name(c) for c in r.no_candidates) or "none"))
        if empty:
            lines.append(f"concepts with no pairs ({len(empty)}): " + ", ".join(empty[:50]) + (" ..." if len(empty) > 50 else ""))
        lines += [f"note: {n}" for n in r.notes]
        return "\n".join(lines)

    def save(self, path: str | Path) -> Path:
        """Parquet subset (``row`` = dataset index) and its coverage report, both atomically."""
        self.path = self.result.save(path)
        write_json(report_path(self.path), self.report())
        return self.path


def check_options(budget: int, prototype: str, fill: str | None, dedup: float | None) -> str | None:
    """Validate the options of :func:`curate_dataset` (before any feature is loaded); the fill to use."""
    if prototype not in PROTOTYPES:
        raise CurateOptionError(f"prototype must be one of {list(PROTOTYPES)}, got {prototype!r}")
    fill = None if fill in (None, "none") else fill
    if fill is not None and fill not in FILLS:
        raise CurateOptionError(f"fill must be one of {list(FILLS)}, got {fill!r}")
    if budget is None or int(budget) < 1:
        raise CurateOptionError(f"budget must be >= 1, got {budget}")
    if dedup is not None and not 0.0 < float(dedup) <= 1.0:
        raise CurateOptionError(f"dedup must be a cosine threshold in (0, 1], got {dedup}")
    return fill


def curate_dataset(
    cached: Cached,
    concepts: "str | Path | Sequence[str] | Dataset",
    budget: int,
    *,
    text_encoder: Encoder,
    media: str = "image",
    media_encoder: Encoder | None = None,
    layers: dict[str, Sequence[str]] | None = None,
    protocol: DataConfig | None = None,
    out: str | Path | None = None,
    top_k: int | None = None,
    per_concept: int | None = None,
    prototype: str = "text",
    templates: "str | Sequence[str]" = "photo",
    fill: str | None = "farthest",
    dedup: float | None = None,
    seed: int = 0,
    n_examples: int = 8,
    min_score: float | None = None,
    fill_candidates: int | None = None,
    pool_indices: np.ndarray | None = None,
    log: Log = print,
) -> DatasetCuration:
    """Curate ``budget`` training pairs of ``cached.dataset`` (text and ``media`` features cached) for the
    target ``concepts``.

    The pool: ``pool_indices`` if given, else the training split of ``protocol`` (the training concepts
    in the training styles, never validation or test concepts; ``protocol.subset`` is ignored), else
    every record (with a note). Pairs without a cached item on either side are not candidates.

    ``prototype="text"``: pairs by the mean of their text features, concepts by prompt-ensembled class
    names (``templates``: a named set or a list of format strings) through ``text_encoder``. ``"media"``:
    pairs by their ``media`` features, concepts by the mean of ``n_examples`` items each from the
    concepts dataset through ``media_encoder``. ``dedup``: cosine threshold for near-duplicate pairs
    (both sides, :func:`dedup_pairs`), removed before curation; None skips it. ``fill``: ``farthest``,
    ``kmeans`` or ``none``/None (the subset may then be smaller than ``budget``). Other options go to
    :func:`~unialign_train.curate.curate`. Saves to ``out`` when given. Returns a
    :class:`DatasetCuration` whose rows are dataset indices.
    """
    fill = check_options(budget, prototype, fill, dedup)
    ds = cached.dataset
    if "text" not in cached or media not in cached:
        raise CurateInputError(f"{ds.name}: curation needs cached text and {media} features")
    layers = dict(layers or {})
    names, concepts_ds = concept_names(concepts)
    if prototype == "media" and (concepts_ds is None or media_encoder is None):
        raise CurateOptionError("--prototype media needs a concepts *dataset* with items (e.g. fashion-mnist:train) "
                                "and the media encoder, not a list of names")

    notes: list[str] = []
    if pool_indices is not None:
        candidates = np.unique(np.asarray(pool_indices, dtype=np.int64))
        if len(candidates) and (candidates[0] < 0 or candidates[-1] >= len(ds)):
            raise CurateInputError(f"pool_indices must be dataset indices in [0, {len(ds)})")
        scope = "given indices"
    elif protocol is not None:
        if protocol.subset:
            notes.append(f"data.subset={protocol.subset} ignored: the pool is the whole training split")
        candidates = make_splits(ds, protocol.model_copy(update={"subset": None})).train
        scope = "training split"
    else:
        candidates = np.arange(len(ds), dtype=np.int64)
        scope = "all records"
        notes.append("pool = all records: validation/test concepts may be selected")
    txt_pool, media_pool, pool = pool_features(cached, candidates, media)
    if len(pool) == 0:
        raise CurateInputError(f"{ds.name}: no trainable pairs in the pool ({scope})")
    pool_size = len(pool)
    log(f"pool: {pool_size} pairs of {ds.name} ({scope})")

    removed = 0
    if dedup is not None:
        keep = dedup_pairs(media_pool, txt_pool, float(dedup), float(dedup), mode="both")
        removed = pool_size - len(keep)
        pool, txt_pool, media_pool = pool[keep], txt_pool[keep], media_pool[keep]
        log(f"dedup at cosine {dedup}: removed {removed} near-duplicate pairs, {len(pool)} left")

    if prototype == "text":
        protos, feats = text_prototypes(text_encoder, layers.get("text", ["final"]), names, templates), txt_pool
    else:
        protos = media_prototypes(media_encoder, media, layers.get(media, ["final"]), concepts_ds, names, n_examples, seed)
        feats = media_pool

    res = curate(feats, protos, int(budget), top_k=top_k, per_concept=per_concept, fill=fill, seed=seed,
                 concept_names=names, min_score=min_score, fill_candidates=fill_candidates)
    res.rows = pool[res.rows]  # pool positions -> dataset record indices
    res.notes = notes + res.notes
    info = {"concepts_source": str(concepts) if isinstance(concepts, (str, Path)) else "names",
            "templates": templates if isinstance(templates, str) else list(templates), "fill": fill or "none",
            "dedup": dedup, "pool_scope": scope, "seed": seed, "top_k": top_k, "min_score": min_score,
            "text_encoder": text_encoder.spec, "media": media,
            "media_encoder": media_encoder.spec if media_encoder is not None else cached[media].store.encoder["spec"],
            "split": list(protocol.split) if protocol else None, "split_seed": protocol.split_seed if protocol else None}
    dc = DatasetCuration(res, ds.name, ds.fingerprint(), pool_size, pool, removed, prototype, info)
    if out is not None:
        dc.save(out)
    return dc
