"""``unialign curate``: concept-rich curation of a dataset's training pairs (Freeze-Align, REFERENCE.md
section 1) on the cached features of the configured encoders.

:func:`curate_dataset` is the library function; :func:`curate_command` is the thin CLI layer over it.

The pool is the dataset's pairs -- by default only the *training split* of the config's protocol
(``pipeline.make_splits(...).train``), so validation and test concepts can never enter a subset. Each
pair is represented either by the mean of its captions' cached text features (``prototype="text"``:
concepts are class names through the text encoder, prompt-ensembled over ``templates``) or by its cached
image features (``prototype="image"``: each concept's prototype is the mean image feature of a few
example images from the concepts dataset). Optionally near-duplicate pairs are removed first
(:func:`~unialign.curate.dedup_pairs` on image + text). The subset is chosen by
:func:`~unialign.curate.curate`, and the saved Parquet's ``row`` column holds **dataset record
indices**, so ``unialign run --set data.subset=subset.parquet`` trains on exactly those pairs
(``make_splits`` intersects its training indices with them).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Sequence

import numpy as np
import typer

from ..io import write_json
from .concepts import CurateInputError, CurateOptionError, CurationResult, curate, report_path
from .dedup import dedup_pairs

if TYPE_CHECKING:  # the pipeline pulls in the training stack; imported lazily at run time
    from ..config import RunConfig
    from ..data.base import PairDataset
    from ..encoders.base import Encoder
    from ..pipeline import Cached

__all__ = ["DatasetCuration", "concept_names", "curate_command", "curate_dataset", "image_prototypes",
           "pool_features", "text_prototypes"]

Log = Callable[[str], None]
PROTOTYPES = ("text", "image")
FILLS = ("farthest", "kmeans", "none")


# ------------------------------------------------------------------------------------------ pieces


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def concept_names(concepts: "str | Path | Sequence[str] | PairDataset") -> tuple[list[str], "PairDataset | None"]:
    """Target concept names and, when they came from a dataset, that dataset (for example images).

    ``concepts`` is a list of names, a text file (one name a line; blank lines and ``#`` comments
    skipped), a dataset spec (``fashion-mnist``, an image folder, ...) or a PairDataset. A labelled
    dataset gives its ``classes`` (shown by their labels); any other dataset its unique concept labels.
    """
    from ..data import PairDataset, load_dataset
    from ..data.user import TABLE_SUFFIXES

    ds = None
    if isinstance(concepts, PairDataset):
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


def text_prototypes(encoder: "Encoder", layers: Sequence[str], names: Sequence[str],
                    templates: "str | Sequence[str]" = "photo") -> np.ndarray:
    """One prototype per name: the mean of its unit-normalised prompt embeddings (prompt ensembling),
    in the space of the cached caption features (same encoder, same layers)."""
    from ..evaluate.templates import get_templates
    from ..pipeline import prompt_features

    temps = get_templates(templates if isinstance(templates, str) else list(templates))
    feats = _unit(prompt_features(encoder, layers, names, temps)).reshape(len(names), len(temps), -1)
    return _unit(feats.mean(axis=1))


def image_prototypes(encoder: "Encoder", layers: Sequence[str], ds: "PairDataset", names: Sequence[str],
                     n_examples: int = 8, seed: int = 0) -> np.ndarray:
    """One prototype per concept of ``ds`` (in the order of :func:`concept_names`): the mean of the
    unit-normalised image features of up to ``n_examples`` of its images, drawn with ``seed``."""
    if n_examples < 1:
        raise CurateOptionError(f"examples per concept must be >= 1, got {n_examples}")
    labels = ds.concept_labels()
    keys = list(ds.classes) if ds.classes is not None else ds.concepts()
    by_name: dict[str, list[int]] = {}
    key_name = {k: labels.get(k, k) for k in keys}
    for i, r in enumerate(ds.records):
        name = key_name.get(r["concept"])
        if name is not None:
            by_name.setdefault(name, []).append(i)
    rng = np.random.default_rng(seed)
    protos = []
    for name in names:
        idx = by_name.get(name, [])
        if not idx:
            raise CurateInputError(f"concept {name!r} has no images in {ds.name}")
        pick = np.sort(rng.choice(idx, size=min(n_examples, len(idx)), replace=False))
        feats = encoder.encode([ds.image_path(int(i)) for i in pick], batch_size=64, layers=list(layers),
                               show_progress_bar=False)
        protos.append(_unit(feats).mean(axis=0))
    return _unit(np.stack(protos))


def pool_features(cached: "Cached", indices: np.ndarray, modality: str) -> tuple[np.ndarray, np.ndarray]:
    """Features of the pool pairs that can be trained on (an image feature row and at least one cached
    caption), and which dataset indices those are. ``text``: the mean of each pair's unit-normalised
    caption features; ``image``: its image features."""
    ds = cached.dataset
    indices = np.asarray(indices, dtype=np.int64)
    has_img = cached.image_row[indices] >= 0
    text_rows: list[list[int]] = []
    keep: list[int] = []
    for i, ok in zip(indices.tolist(), has_img.tolist()):
        rows = [cached.text_row[c] for c in ds.captions(i) if c in cached.text_row] if cached.text_row else []
        if ok and rows:
            keep.append(i)
            text_rows.append(rows)
    idx = np.asarray(keep, dtype=np.int64)
    if len(idx) == 0:
        return np.zeros((0, 0), np.float32), idx
    if modality == "image":
        return cached.image[cached.image_row[idx]], idx
    flat = np.asarray([r for rows in text_rows for r in rows], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum([len(r) for r in text_rows])[:-1]]).astype(np.int64)
    uniq, inv = np.unique(flat, return_inverse=True)  # gather each caption row once
    caps = _unit(cached.text[uniq])[inv]
    counts = np.diff(np.append(starts, len(flat)))
    return np.add.reduceat(caps, starts, axis=0) / counts[:, None].astype(np.float32), idx


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


def curate_dataset(
    data: "str | PairDataset | None",
    concepts: "str | Path | Sequence[str] | PairDataset",
    budget: int,
    *,
    cfg: "RunConfig | None" = None,
    out: str | Path | None = None,
    top_k: int | None = None,
    per_concept: int | None = None,
    prototype: str = "text",
    templates: "str | Sequence[str]" = "photo",
    fill: str | None = "farthest",
    dedup: float | None = None,
    restrict_train: bool = True,
    seed: int = 0,
    n_examples: int = 8,
    min_score: float | None = None,
    fill_candidates: int | None = None,
    cached: "Cached | None" = None,
    text_encoder: "Encoder | None" = None,
    image_encoder: "Encoder | None" = None,
    pool_indices: np.ndarray | None = None,
    log: Log = print,
) -> DatasetCuration:
    """Curate ``budget`` training pairs of dataset ``data`` for the target ``concepts``.

    ``cfg`` (default: the built-in config) names the encoders, layers and the split protocol; ``data``
    overrides ``cfg.data.dataset`` (None keeps it). With ``restrict_train`` (default) the pool is
    ``make_splits(ds, cfg).train`` -- the training concepts in the training styles, never validation or
    test concepts -- computed without ``cfg.data.subset``; otherwise every record is a candidate.
    ``pool_indices`` replaces that pool with the given dataset indices. Pairs without an image feature
    or a cached caption are not candidates (they cannot be trained on).

    ``prototype="text"``: pairs by the mean of their caption features, concepts by prompt-ensembled
    class names (``templates``: a named set or a list of format strings). ``"image"``: pairs by their
    image features, concepts by the mean of ``n_examples`` images each from the concepts dataset.
    ``dedup``: cosine threshold for near-duplicate pairs (image *and* text, :func:`dedup_pairs`), removed
    before curation; None skips it. ``fill``: ``farthest``, ``kmeans`` or ``none``/None (the subset
    may then be smaller than ``budget``). Other options go to :func:`~unialign.curate.curate`.

    Already-built ``cached`` features and loaded encoders may be passed in to avoid reloading them
    (benchmarks); otherwise the encoders of ``cfg`` are loaded and the features cached (or reused).
    Saves to ``out`` when given. Returns a :class:`DatasetCuration` whose rows are dataset indices.
    """
    from ..config import load_config
    from ..data import load_dataset
    from ..encoders import load_encoder
    from ..pipeline import cache_features, make_splits

    if prototype not in PROTOTYPES:
        raise CurateOptionError(f"prototype must be one of {list(PROTOTYPES)}, got {prototype!r}")
    fill = None if fill in (None, "none") else fill
    if fill is not None and fill not in FILLS:
        raise CurateOptionError(f"fill must be one of {list(FILLS)}, got {fill!r}")
    if budget is None or int(budget) < 1:
        raise CurateOptionError(f"budget must be >= 1, got {budget}")
    if dedup is not None and not 0.0 < float(dedup) <= 1.0:
        raise CurateOptionError(f"dedup must be a cosine threshold in (0, 1], got {dedup}")
    cfg = cfg if cfg is not None else load_config()
    notes: list[str] = []
    if cfg.data.subset:
        notes.append(f"data.subset={cfg.data.subset} ignored: the pool is the whole training split")
    data_cfg = dataclasses.replace(cfg.data, subset=None)
    if isinstance(data, str):
        data_cfg.dataset = data
    cfg = dataclasses.replace(cfg, data=data_cfg)

    names, concepts_ds = concept_names(concepts)
    if prototype == "image" and concepts_ds is None:
        raise CurateOptionError("--prototype image needs a concepts *dataset* with images (e.g. fashion-mnist:train), "
                                "not a list of names")

    e = cfg.encoders
    if cached is None:
        ds = data if data is not None and not isinstance(data, str) else load_dataset(cfg.data.dataset)
        image_encoder = image_encoder or load_encoder(e.image, device=cfg.device)
        text_encoder = text_encoder or load_encoder(e.text, device=cfg.device)
        cached = cache_features(ds, image_encoder, text_encoder, cfg, log)
    ds = cached.dataset
    if cached.text is None:
        raise CurateInputError(f"{ds.name}: curation needs the cached caption features (cache with a text encoder)")

    if pool_indices is not None:
        candidates = np.unique(np.asarray(pool_indices, dtype=np.int64))
        if len(candidates) and (candidates[0] < 0 or candidates[-1] >= len(ds)):
            raise CurateInputError(f"pool_indices must be dataset indices in [0, {len(ds)})")
        scope = "given indices"
    elif restrict_train:
        candidates = make_splits(ds, cfg).train
        scope = "training split"
    else:
        candidates = np.arange(len(ds), dtype=np.int64)
        scope = "all records"
        notes.append("pool = all records (--all): validation/test concepts may be selected")
    txt_pool, pool = pool_features(cached, candidates, "text")
    if len(pool) == 0:
        raise CurateInputError(f"{ds.name}: no trainable pairs in the pool ({scope})")
    pool_size = len(pool)
    log(f"pool: {pool_size} pairs of {ds.name} ({scope})")

    removed = 0
    if dedup is not None:
        img_pool = cached.image[cached.image_row[pool]]
        keep = dedup_pairs(img_pool, txt_pool, float(dedup), float(dedup), mode="both")
        removed = pool_size - len(keep)
        pool, txt_pool = pool[keep], txt_pool[keep]
        log(f"dedup at cosine {dedup}: removed {removed} near-duplicate pairs, {len(pool)} left")

    if prototype == "text":
        text_encoder = text_encoder or load_encoder(e.text, device=cfg.device)
        protos = text_prototypes(text_encoder, e.text_layers, names, templates)
        feats = txt_pool
    else:
        image_encoder = image_encoder or load_encoder(e.image, device=cfg.device)
        protos = image_prototypes(image_encoder, e.image_layers, concepts_ds, names, n_examples, seed)
        feats = cached.image[cached.image_row[pool]]

    res = curate(feats, protos, int(budget), top_k=top_k, per_concept=per_concept, fill=fill, seed=seed,
                 concept_names=names, min_score=min_score, fill_candidates=fill_candidates)
    res.rows = pool[res.rows]  # pool positions -> dataset record indices
    res.notes = notes + res.notes
    info = {"concepts_source": str(concepts) if isinstance(concepts, (str, Path)) else "names",
            "templates": templates if isinstance(templates, str) else list(templates), "fill": fill or "none",
            "dedup": dedup, "pool_scope": scope, "seed": seed, "top_k": top_k, "min_score": min_score,
            "image_encoder": e.image, "text_encoder": e.text, "split": list(cfg.data.split),
            "split_seed": cfg.data.split_seed}
    dc = DatasetCuration(res, ds.name, ds.fingerprint(), pool_size, pool, removed, prototype, info)
    if out is not None:
        dc.save(out)
    return dc


# ------------------------------------------------------------------------------------------ command


def curate_command(
    concepts: str = typer.Option(..., help="Target concepts: a text file (one class name a line) or a dataset spec "
                                 "with classes, e.g. fashion-mnist."),
    budget: int = typer.Option(..., help="Number of pairs to keep."),
    out: Path = typer.Option(..., help="Subset Parquet to write (its `row` column: dataset record indices); a "
                             "<out>.coverage.json report goes next to it."),
    data: Optional[str] = typer.Option(None, help="Dataset spec to curate from (default: the config's data.dataset)."),
    config: Optional[Path] = typer.Option(None, help="YAML/TOML config (encoders, split protocol); default built-in."),
    top_k: Optional[int] = typer.Option(None, help="Candidates kept per concept (default 2 x budget / concepts)."),
    prototype: str = typer.Option("text", help="text: class-name prompts vs caption features; image: a few example "
                                  "images per class (concepts dataset) vs image features."),
    templates: str = typer.Option("photo", help="Prompt template set for text prototypes (photo, emoji, plain)."),
    fill: str = typer.Option("farthest", help="Fill the rest of the budget: farthest, kmeans or none."),
    dedup: Optional[float] = typer.Option(None, help="Remove near-duplicate pairs first (cosine threshold on image "
                                          "and text, e.g. 0.95)."),
    restrict_train: bool = typer.Option(True, "--restrict-train/--all", help="Pool = the protocol's training split "
                                        "(default) or every record (may pick test concepts)."),
    examples: int = typer.Option(8, help="Example images per concept for --prototype image."),
    min_score: Optional[float] = typer.Option(None, help="Ignore candidates below this cosine to their concept."),
    seed: int = typer.Option(0, help="Seed of the diversity fill and of example-image draws."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a config field: --set encoders.text=st:..."),
) -> None:
    """Concept-rich subset of a dataset's training pairs for target concepts (Freeze-Align curation);
    train on it with `unialign run --set data.subset=<out>`."""
    from ..cli import _config

    cfg = _config(config, set_)
    dc = curate_dataset(data, concepts, budget, cfg=cfg, out=out, top_k=top_k, prototype=prototype,
                        templates=templates, fill=fill, dedup=dedup, restrict_train=restrict_train, seed=seed,
                        n_examples=examples, min_score=min_score, log=typer.echo)
    typer.echo(dc.summary())
    typer.echo(f"subset written to {dc.path} (coverage: {report_path(dc.path)}); "
               f"train on it with: unialign run --set data.subset={dc.path}")
