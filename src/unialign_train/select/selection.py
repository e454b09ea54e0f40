"""Choose encoders and layers before training: score every (encoder, layer) x (encoder, layer) of two
modalities (image x text, audio x text, ...).

What :func:`select` does, and why:

1. **Sample.** A seeded sample of ``sample`` paired items from the *training split* of the default
   protocol (training concepts in the training styles; ``split="all"`` for every record), so the
   choice never looks at test concepts. Items without a caption are left out.
2. **Pair each image with one text.** ``caption="first"`` (default): the item's first caption (for emoji,
   the Unicode name, e.g. "grinning face") -- one text per image, and 4x fewer texts to encode than all
   captions. ``caption="mean"``: the mean of the features of all the item's captions (Freeze-Align's
   choice with COCO's five captions), per layer.
3. **Features per layer.** Pooled per-layer features come from the feature store: an existing store of
   the *whole* dataset that holds the wanted layers is reused as is; otherwise the sample alone is
   extracted into a store of its own (so a rerun with the same sample reuses it).
4. **Score** every combination with the chosen metrics (default: mutual kNN with STRUCTURE's Rice-rule
   ``k = ceil(2 n^(1/3))``); ``calibrate=True`` replaces each raw score by ``raw - mean(null)``, the
   permutation null of :func:`unialign.select.metrics.calibrate`, which makes encoders of different
   width/depth comparable. ``"probe"`` is SAIL's alignment probe (:mod:`unialign.select.probe`).
5. **Report.** Rows ranked by the first metric; a heatmap PNG per encoder pair (image layers x text
   layers, one panel per metric), a JSON report, and the ``unialign run --set ...`` command that trains
   the best combination.
"""
from __future__ import annotations

import json
import math
import re
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from unialign.encoders.base import FINAL
from unialign.errors import ConfigError, DataError
from unialign.io import save_figure

from .metrics import EXTRA_METRICS, METRICS, MetricFn, calibrate as calibrate_metric, rice_k

__all__ = [
    "DEFAULT_METRICS",
    "Selection",
    "auto_layers",
    "layer_depth_order",
    "plot_heatmaps",
    "ranked_table",
    "resolve_layers",
    "run_command",
    "modality_features",
    "sample_items",
    "score_grid",
    "select",
    "select_metrics",
]

Log = Callable[[str], None]
DEFAULT_METRICS = ("mutual_knn",)
_TAKES_K = {"mutual_knn", "cknna"}


def select_metrics() -> dict[str, MetricFn]:
    """Every metric ``select`` accepts: the similarity metrics, plus those later stages registered (SAIL's
    alignment probe, once :mod:`unialign_train.align.probe` is imported)."""
    return {**METRICS, **EXTRA_METRICS}


# ------------------------------------------------------------------------------------------- layers


def layer_depth_order(names: Sequence[str]) -> list[str]:
    """Layers shallow to deep as the encoder lists them, with "final" (the embedding) last."""
    return [n for n in names if n != FINAL] + ([FINAL] if FINAL in names else [])


def auto_layers(encoder: Any, n_intermediate: int = 4) -> list[str]:
    """"final" plus ``n_intermediate`` intermediate layers evenly spaced in depth, the deepest included
    (Lite0: block3, block7, block11, block15; MiniLM: layer2, layer3, layer5, layer6)."""
    inner = [l for l in encoder.layer_dims if l != FINAL]
    if not inner or n_intermediate <= 0:
        return [FINAL]
    m = len(inner)
    picks = sorted({int(math.floor((m - 1) * (j + 1) / n_intermediate + 0.5)) for j in range(n_intermediate)})
    return [inner[i] for i in picks] + [FINAL]


def resolve_layers(encoder: Any, spec: str | Sequence[str]) -> list[str]:
    """``"auto"``, ``"all"`` or a list / comma-separated string of layer names.

    A list names layers of possibly several encoders at once (``block11,layer3,final``): each encoder keeps
    the names it has, and it is an error only when an encoder keeps none.
    """
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key == "auto":
            return auto_layers(encoder)
        if key == "all":
            return layer_depth_order(list(encoder.layer_dims))
        names = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        names = [str(s) for s in spec]
    if not names:
        raise ConfigError("layers: give auto, all, or a comma-separated list of layer names")
    kept = [n for n in dict.fromkeys(names) if n in encoder.layer_dims]
    if not kept:
        raise ConfigError(f"layers: none of {names} is a layer of {encoder.spec}; it has {layer_depth_order(list(encoder.layer_dims))}")
    order = {n: i for i, n in enumerate(layer_depth_order(list(encoder.layer_dims)))}
    return sorted(kept, key=order.__getitem__)


# ------------------------------------------------------------------------------------------- sample


def sample_items(ds: Any, n: int, seed: int = 0, split: str = "train", protocol: Any = None,
                 modalities: Sequence[str] = ("image", "text")) -> np.ndarray:
    """Sorted record indices of a seeded sample of up to ``n`` records that have items of every one of
    ``modalities``.

    ``split="train"``: only the protocol's training split (:func:`unialign_train.data.make_splits` with
    ``protocol``, a :class:`~unialign_train.data.DataConfig`); ``"all"``: every record.
    """
    from ..data.protocol import make_splits

    if isinstance(n, bool) or int(n) < 8:
        raise ConfigError(f"sample: need at least 8 pairs, got {n!r}")
    if split == "train":
        if protocol is None:
            raise ConfigError("split='train' needs the protocol (a DataConfig, e.g. load_config().data); "
                              "or sample from every record with split='all'")
        pool = make_splits(ds, protocol).train
    elif split == "all":
        pool = np.arange(len(ds))
    else:
        raise ConfigError(f"split: expected 'train' or 'all', got {split!r}")
    pool = np.asarray([i for i in pool if all(ds.items(int(i), m) for m in modalities)], dtype=np.int64)
    if len(pool) < 8:
        raise DataError(f"{ds.name}: only {len(pool)} records with {' and '.join(modalities)} items in the {split} "
                        "split; need at least 8")
    rng = np.random.default_rng([seed, 11])
    pick = rng.choice(len(pool), size=min(int(n), len(pool)), replace=False)
    return np.sort(pool[pick])


def _sample_dataset(ds: Any, indices: np.ndarray, modality: str, reduce: str) -> Any:
    """The sample as a dataset of its own (for extraction): each record's first item of ``modality``,
    or all of them (``reduce="mean"``, for text)."""
    from ..data.records import Dataset

    recs = []
    for i in indices:
        r = dict(ds.records[int(i)])
        if modality == "text":
            caps = ds.items(int(i), "text")
            r["text"] = caps[:1] if reduce == "first" else caps
        recs.append(r)
    return Dataset(ds.name, recs, ds.root, ds.classes, dict(ds.meta))


# ------------------------------------------------------------------------------------------ features


def _find_full_store(ds: Any, encoder: Any, modality: str, layers: Sequence[str]) -> Any:
    """A complete store of the whole dataset by this encoder that holds every wanted layer, or None."""
    from ..features.extract import default_store_path
    from ..features.store import FeatureStore

    folder = default_store_path(ds, encoder, [FINAL], modality=modality).parent
    if not folder.is_dir():
        return None
    want_enc = json.loads(json.dumps(encoder.config()))
    fp = ds.fingerprint(modality)
    for manifest in sorted(folder.glob("*/manifest.json")):
        try:
            m = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if (m.get("encoder") == want_enc and m.get("modality") == modality
                and m.get("dataset", {}).get("fingerprint") == fp and set(layers) <= set(m.get("layer_dims", {}))):
            try:
                return FeatureStore.open(manifest.parent)
            except Exception:  # an unreadable store is simply not reused
                continue
    return None


def modality_features(ds: Any, indices: np.ndarray, encoder: Any, modality: str, layers: Sequence[str],
                      reduce: str = "first", *, batch_size: int = 64, num_workers: int | None = None,
                      reuse: bool = True, features_dir: str | Path | None = None, log: Log | None = None
                      ) -> tuple[dict[str, np.ndarray], np.ndarray, str]:
    """Per-layer float32 features of the sampled records' items of ``modality``, one row per record (its
    first item, or the mean over its items with ``reduce="mean"``), a mask of the records that have
    them, and the store they came from. ``reuse=False`` ignores stores of the whole dataset;
    ``features_dir`` puts the sample's own store there instead of under ``$UNIALIGN_HOME``."""
    from ..features.extract import default_store_path, extract

    store = _find_full_store(ds, encoder, modality, layers) if reuse else None
    if store is None:
        sub = _sample_dataset(ds, indices, modality, reduce)
        folder = None if features_dir is None else Path(features_dir) / default_store_path(
            sub, encoder, [FINAL, *layers], modality=modality).name
        store = extract(sub, encoder, folder, layers=list(layers), batch_size=batch_size, num_workers=num_workers,
                        show_progress=log is not None, modality=modality)
    row_of = {t: i for i, t in enumerate(store.items())}
    items = [[it for it in ds.items(int(i), modality) if it in row_of] for i in indices]
    items = [its[:1] for its in items] if reduce == "first" else items
    ok = np.asarray([bool(its) for its in items])
    flat = np.asarray([row_of[it] for its in items for it in its], dtype=np.int64)
    owner = np.repeat(np.arange(len(indices)), [len(its) for its in items])
    counts = np.maximum(np.bincount(owner, minlength=len(indices)), 1).astype(np.float32)[:, None]
    feats = {}
    for l in layers:
        arr = np.asarray(store.array(l)[flat], dtype=np.float32)
        out = np.zeros((len(indices), arr.shape[1]), np.float32)
        np.add.at(out, owner, arr)
        feats[l] = out / counts
    return feats, ok, str(store.root)


# ------------------------------------------------------------------------------------------- scoring


def _metric_kwargs(name: str, k: Any, groups: np.ndarray | None, probe_options: Mapping[str, Any] | None) -> dict[str, Any]:
    if name in _TAKES_K:
        return {"k": k}
    if name == "probe":
        return {"groups": groups, **(probe_options or {})}
    return {}


def check_metrics(metrics: Sequence[str] | str) -> list[str]:
    names = [m.strip() for m in metrics.split(",")] if isinstance(metrics, str) else [str(m) for m in metrics]
    names = [m for m in dict.fromkeys(names) if m]
    known = select_metrics()
    if not names:
        raise ConfigError(f"metrics: give at least one of {', '.join(known)}")
    bad = [m for m in names if m not in known]
    if bad:
        hint = " (probe: import unialign_train.align.probe first)" if "probe" in bad else ""
        raise ConfigError(f"metrics: unknown metric(s) {bad}; accepted: {', '.join(known)}{hint}")
    return names


def score_grid(
    x_feats: Mapping[str, Mapping[str, np.ndarray]],
    y_feats: Mapping[str, Mapping[str, np.ndarray]],
    metrics: Sequence[str] = DEFAULT_METRICS,
    *,
    modalities: Sequence[str] = ("image", "text"),
    k: int | str = "rice",
    calibrate: bool = False,
    n_perm: int = 5,
    seed: int = 0,
    groups: np.ndarray | None = None,
    probe_options: Mapping[str, Any] | None = None,
    log: Log | None = None,
) -> list[dict[str, Any]]:
    """Score every (x encoder, layer) x (y encoder, layer) combination; rows in grid order.

    ``x_feats[spec][layer]`` and ``y_feats[spec][layer]`` are row-paired (n, d) arrays of the two
    ``modalities``; a row names its encoders and layers by modality (``row["image"]``,
    ``row["image_layer"]``, ``row["text"]``, ...). Each row holds ``scores`` (what ranks: the raw score,
    or ``raw - null_mean`` with ``calibrate``), ``raw``, and with ``calibrate`` also ``null_mean`` /
    ``null_std`` per metric, plus seconds spent.
    """
    names = check_metrics(metrics)
    mx, my = modalities
    rows = []
    for xspec, xlayers in x_feats.items():
        for yspec, ylayers in y_feats.items():
            for xl, X in xlayers.items():
                for yl, Y in ylayers.items():
                    row: dict[str, Any] = {mx: xspec, f"{mx}_layer": xl, my: yspec, f"{my}_layer": yl,
                                           f"{mx}_dim": int(X.shape[1]), f"{my}_dim": int(Y.shape[1]),
                                           "scores": {}, "raw": {}, "seconds": {}}
                    for name in names:
                        fn = select_metrics()[name]
                        kw = _metric_kwargs(name, k, groups, probe_options)
                        t0 = time.perf_counter()
                        if calibrate:
                            c = calibrate_metric(fn, X, Y, n_perm=n_perm, seed=seed, mode="diff", **kw)
                            row["scores"][name], row["raw"][name] = c.calibrated, c.raw
                            row.setdefault("null_mean", {})[name] = c.null_mean
                            row.setdefault("null_std", {})[name] = c.null_std
                        else:
                            v = float(fn(X, Y, **kw))
                            row["scores"][name] = row["raw"][name] = v
                        row["seconds"][name] = time.perf_counter() - t0
                    rows.append(row)
                    if log:
                        log(f"  {_short(xspec)}:{xl} x {_short(yspec)}:{yl}  "
                            + "  ".join(f"{m}={row['scores'][m]:.4f}" for m in names))
    return rows


def rank_rows(rows: list[dict[str, Any]], metric: str, modalities: Sequence[str] = ("image", "text")) -> list[dict[str, Any]]:
    """Rows sorted by ``metric`` (descending; NaN last; on ties "final" layers first), each given its 1-based ``rank``."""
    mx, my = modalities

    def key(r: dict[str, Any]) -> tuple[float, int]:
        v = r["scores"][metric]
        # ties (e.g. a sentence model whose "final" is its last layer's mean) go to "final": the default
        return (-math.inf if v is None or not math.isfinite(v) else v,
                (r[f"{mx}_layer"] == FINAL) + (r[f"{my}_layer"] == FINAL))

    out = sorted(rows, key=key, reverse=True)
    for i, r in enumerate(out):
        r["rank"] = i + 1
    return out


# -------------------------------------------------------------------------------------------- report


def _short(spec: str) -> str:
    """A readable encoder name for tables and titles: the last path component of st:/hf:/vectors: paths."""
    name, sep, opts = spec.partition("?")
    for prefix in ("st:", "hf:", "vectors:"):
        if name.startswith(prefix):
            name = prefix + Path(name[len(prefix):]).name
    return name + (sep + opts if opts else "")


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", _short(spec)).strip("_")[:60]


def run_command(best: Mapping[str, Any], data: str = "emoji", modalities: Sequence[str] = ("image", "text")) -> str:
    """The ``unialign run`` command (shell-quoted) that aligns the chosen encoders and layers."""
    sets = [s for m in modalities for s in (f"encoders.{m}={best[m]}", f"layers.{m}=[{best[f'{m}_layer']}]")]
    if tuple(modalities) != ("image", "text"):
        sets.insert(0, f"align=[{','.join(modalities)}]")
    if data != "emoji":
        sets.insert(0, f"data.dataset={data}")
    return "unialign run " + " ".join(f"--set {shlex.quote(s)}" for s in sets)


@dataclass
class Selection:
    """What :func:`select` found; ``rows`` are ranked by ``primary`` (the first metric)."""

    rows: list[dict[str, Any]]
    metrics: list[str]
    primary: str
    calibrated: bool
    n: int
    k: int
    data: str
    modalities: tuple[str, str] = ("image", "text")
    config: dict[str, Any] = field(default_factory=dict)
    layers: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # {modality: {spec: layers}}
    stores: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    heatmaps: list[str] = field(default_factory=list)
    report: str | None = None

    @property
    def best(self) -> dict[str, Any]:
        return self.rows[0]

    @property
    def command(self) -> str:
        return run_command(self.best, self.data, self.modalities)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        mx, my = self.modalities
        d["best"] = {key: self.best[key] for key in (mx, f"{mx}_layer", my, f"{my}_layer", "scores")}
        d["command"] = self.command
        return d


def ranked_table(sel: Selection, top: int | None = 20) -> Any:
    """A rich Table of the ranked combinations (the best first)."""
    from rich.table import Table

    mx, my = sel.modalities
    what = "raw - permutation null" if sel.calibrated else "raw"
    t = Table(title=f"encoder/layer selection on {sel.data}: {sel.n} pairs, ranked by {sel.primary} ({what}; k={sel.k})")
    t.add_column("rank", justify="right")
    for col in (f"{mx} encoder", f"{mx} layer", f"{my} encoder", f"{my} layer"):
        t.add_column(col, no_wrap=True)
    for m in sel.metrics:
        t.add_column(m, justify="right")
    shown = sel.rows if top is None or top <= 0 else sel.rows[:top]
    for r in shown:
        style = "bold green" if r["rank"] == 1 else None
        t.add_row(str(r["rank"]), _short(r[mx]), r[f"{mx}_layer"], _short(r[my]), r[f"{my}_layer"],
                  *[f"{r['scores'][m]:.4f}" for m in sel.metrics], style=style)
    if len(shown) < len(sel.rows):
        t.caption = f"{len(sel.rows) - len(shown)} more in the JSON report"
    return t


def plot_heatmaps(sel: Selection, out_dir: str | Path, prefix: str = "selection") -> list[Path]:
    """One PNG per (x encoder, y encoder): x layers (rows) x y layers (columns), a panel per metric with
    its colour bar; the best cell of each panel is outlined."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    mx, my = sel.modalities
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    pairs = list(dict.fromkeys((r[mx], r[my]) for r in sel.rows))
    for xspec, yspec in pairs:
        xl = sel.layers[mx][xspec]
        yl = sel.layers[my][yspec]
        cell = {(r[f"{mx}_layer"], r[f"{my}_layer"]): r for r in sel.rows if r[mx] == xspec and r[my] == yspec}
        nm = len(sel.metrics)
        ncols = min(nm, 3)
        nrows = -(-nm // ncols)
        w = max(4.2, 0.62 * len(yl) + 2.6)
        h = max(3.4, 0.42 * len(xl) + 1.8)
        fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols, h * nrows + 0.6), squeeze=False)
        for j, m in enumerate(sel.metrics):
            ax = axes[j // ncols][j % ncols]
            M = np.array([[cell[(a, b)]["scores"][m] if (a, b) in cell else np.nan for b in yl] for a in xl], dtype=float)
            im = ax.imshow(M, cmap="viridis", aspect="auto", interpolation="nearest")
            ax.set_xticks(range(len(yl)), [f"{i}: {n}" for i, n in enumerate(yl)], rotation=45, ha="right", fontsize=8)
            ax.set_yticks(range(len(xl)), [f"{i}: {n}" for i, n in enumerate(xl)], fontsize=8)
            ax.set_xlabel(f"{my} layer ({_short(yspec)})")
            ax.set_ylabel(f"{mx} layer ({_short(xspec)})")
            label = m + (" - null" if sel.calibrated else "") + (f" (k={sel.k})" if m in _TAKES_K else "")
            ax.set_title(label, fontsize=10)
            fig.colorbar(im, ax=ax, label=label, fraction=0.046, pad=0.04)
            if np.isfinite(M).any():
                flat = np.where(np.isfinite(M), M, -np.inf).ravel()
                last = flat.size - 1 - int(np.argmax(flat[::-1]))  # on ties the deepest cell ("final" is last)
                bi, bj = np.unravel_index(last, M.shape)
                ax.add_patch(Rectangle((bj - 0.5, bi - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
                if M.size <= 150:
                    lo, hi = np.nanmin(M), np.nanmax(M)
                    for a in range(M.shape[0]):
                        for b in range(M.shape[1]):
                            if np.isfinite(M[a, b]):
                                bright = (M[a, b] - lo) / (hi - lo + 1e-12) > 0.6
                                ax.text(b, a, f"{M[a, b]:.3f}", ha="center", va="center", fontsize=6.5,
                                        color="black" if bright else "white")
        for j in range(nm, nrows * ncols):
            axes[j // ncols][j % ncols].axis("off")
        fig.suptitle(f"{', '.join(sel.metrics)}: {_short(xspec)} x {_short(yspec)} "
                     f"({sel.data}, {sel.n} pairs; red box = best)", fontsize=11)
        fig.tight_layout()
        path = out_dir / f"{prefix}_{_slug(xspec)}__{_slug(yspec)}.png"
        save_figure(fig, path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------- driver


def _split_specs(specs: str | Sequence[str], what: str) -> list[str]:
    out = [s.strip() for s in specs.split(",")] if isinstance(specs, str) else [str(s).strip() for s in specs]
    out = [s for s in dict.fromkeys(out) if s]
    if not out:
        raise ConfigError(f"{what}: give at least one encoder spec")
    return out


def select(
    first: str | Sequence[str],
    second: str | Sequence[str],
    data: str = "emoji",
    *,
    layers: str | Sequence[str] = "auto",
    first_layers: str | Sequence[str] | Mapping[str, Any] | None = None,
    second_layers: str | Sequence[str] | Mapping[str, Any] | None = None,
    sample: int = 2000,
    metrics: str | Sequence[str] = DEFAULT_METRICS,
    calibrate: bool = False,
    n_perm: int = 5,
    k: int | str = "rice",
    caption: str = "first",
    split: str = "train",
    protocol: Any = None,
    seed: int = 0,
    probe_options: Mapping[str, Any] | None = None,
    out: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 64,
    num_workers: int | None = None,
    reuse: bool = True,
    features_dir: str | Path | None = None,
    dataset: Any = None,
    log: Log | None = print,
) -> Selection:
    """Score every (first encoder, layer) x (second encoder, layer) on a seeded sample (see module doc).

    ``first`` / ``second``: encoder specs (list or comma-separated); all encoders of one side share a
    modality (images and texts, audio and texts, ...), read from the encoders. ``layers`` applies to all
    encoders, ``first_layers`` / ``second_layers`` override it per side (a mapping ``{spec: layers}``: per
    encoder). ``caption``: a record's first text item, or the ``mean`` of its texts' features. ``out``:
    folder for ``selection.json`` and the heatmaps (nothing written when None). ``dataset``: an already
    loaded Dataset instead of ``data``; ``protocol``: the DataConfig whose training split is sampled.
    ``reuse=False`` ignores whole-dataset stores and ``features_dir`` holds the sample's own stores (the
    benchmark uses both to time a cold selection). Returns a :class:`Selection`; ``selection.command``
    is the ``unialign run`` line.
    """
    from unialign.encoders import load_encoder

    from ..data import load_dataset

    say = log or (lambda s: None)
    t_start = time.perf_counter()
    if caption not in ("first", "mean"):
        raise ConfigError(f"caption: expected 'first' or 'mean', got {caption!r}")
    names = check_metrics(metrics)
    specs = (_split_specs(first, "first encoders"), _split_specs(second, "second encoders"))
    if k != "rice" and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ConfigError(f"k: expected a positive integer or 'rice', got {k!r}")
    ds = dataset if dataset is not None else load_dataset(data)
    encoders: list[list[Any]] = [[load_encoder(sp, device=device) for sp in side] for side in specs]
    modalities: list[str] = []
    for side, encs in zip(("first", "second"), encoders):
        kinds = sorted({e.modality for e in encs})
        if len(kinds) != 1:
            raise ConfigError(f"{side} encoders mix modalities {kinds}; give one modality per side")
        modalities.append(kinds[0])
    if modalities[0] == modalities[1]:
        raise ConfigError(f"both sides are {modalities[0]} encoders; select aligns two different modalities")
    mx, my = modalities
    indices = sample_items(ds, sample, seed, split, protocol, modalities)
    say(f"{ds.name}: {len(indices)} sampled pairs ({split} split, seed {seed}, caption={caption})")

    timings: dict[str, float] = {}
    stores: dict[str, str] = {}
    feats: list[dict[str, dict[str, np.ndarray]]] = [{}, {}]
    chosen: dict[str, dict[str, list[str]]] = {mx: {}, my: {}}
    keep = np.ones(len(indices), dtype=bool)
    for side, (m, encs, want) in enumerate(zip(modalities, encoders, (first_layers, second_layers))):
        for enc in encs:
            t0 = time.perf_counter()
            if isinstance(want, Mapping):  # per-encoder layers, keyed by the spec as given
                spec_given = specs[side][encs.index(enc)]
                ls = resolve_layers(enc, want.get(spec_given, want.get(enc.spec, layers)))
            else:
                ls = resolve_layers(enc, want if want is not None else layers)
            reduce = caption if m == "text" else "first"
            f, ok, root = modality_features(ds, indices, enc, m, ls, reduce, batch_size=batch_size,
                                            num_workers=num_workers, reuse=reuse, features_dir=features_dir, log=log)
            keep &= ok
            if enc.spec in feats[side]:
                raise ConfigError(f"{m} encoder {enc.spec} given twice")
            feats[side][enc.spec], chosen[m][enc.spec], stores[enc.spec] = f, ls, root
            timings[f"features {enc.spec}"] = time.perf_counter() - t0
            say(f"{m} {enc.spec}: layers {', '.join(ls)} ({time.perf_counter() - t0:.1f}s, store {root})")
    del encoders
    if not keep.all():
        say(f"{int((~keep).sum())} sampled record(s) could not be encoded; scoring the other {int(keep.sum())}")
        for fs in feats:
            for spec in fs:
                fs[spec] = {l: a[keep] for l, a in fs[spec].items()}
    indices = indices[keep]
    concept_id = {c: i for i, c in enumerate(ds.concepts())}
    groups = np.asarray([concept_id[ds.records[int(i)]["concept"]] for i in indices], dtype=np.int64)
    n = len(indices)
    kk = rice_k(n) if k == "rice" else int(k)
    n_combos = sum(len(v) for v in chosen[mx].values()) * sum(len(v) for v in chosen[my].values())
    say(f"scoring {n_combos} combinations with {', '.join(names)} (k={kk}{', calibrated' if calibrate else ''})")
    t0 = time.perf_counter()
    rows = score_grid(feats[0], feats[1], names, modalities=modalities, k=kk, calibrate=calibrate, n_perm=n_perm,
                      seed=seed, groups=groups, probe_options=probe_options, log=log)
    timings["scoring"] = time.perf_counter() - t0
    sel = Selection(rank_rows(rows, names[0], modalities), names, names[0], bool(calibrate), n, kk,
                    data if dataset is None else ds.name, (mx, my),
                    config={"sample": int(sample), "seed": seed, "split": split, "caption": caption, "k": k,
                            "n_perm": n_perm if calibrate else None, "probe_options": dict(probe_options or {}),
                            "first": specs[0], "second": specs[1],
                            "layers": layers if isinstance(layers, str) else list(layers)},
                    layers=chosen, stores=stores, timings=timings)
    if out is not None:
        out = Path(out)
        sel.heatmaps = [str(p) for p in plot_heatmaps(sel, out)]
        sel.timings["total"] = time.perf_counter() - t_start
        sel.report = str(out / "selection.json")
        from unialign.io import write_json

        write_json(out / "selection.json", _jsonable(sel.to_dict()))
    sel.timings["total"] = time.perf_counter() - t_start
    return sel


def _jsonable(obj: Any) -> Any:
    """NaN/Inf become null (strict JSON); numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
