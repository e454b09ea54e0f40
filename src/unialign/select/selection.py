"""Choose encoders and layers before training: score every (image encoder, layer) x (text encoder, layer).

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

from ..errors import ConfigError, DataError
from ..features.store import FINAL
from ..io import save_figure
from .metrics import METRICS, MetricFn, calibrate as calibrate_metric, rice_k
from .probe import probe

__all__ = [
    "DEFAULT_METRICS",
    "SELECT_METRICS",
    "Selection",
    "auto_layers",
    "layer_depth_order",
    "plot_heatmaps",
    "ranked_table",
    "resolve_layers",
    "run_command",
    "sample_items",
    "score_grid",
    "select",
]

Log = Callable[[str], None]
DEFAULT_METRICS = ("mutual_knn",)
#: Every metric ``select`` accepts: the similarity metrics plus SAIL's alignment probe.
SELECT_METRICS: dict[str, MetricFn] = {**METRICS, "probe": probe}
_TAKES_K = {"mutual_knn", "cknna"}


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


def sample_items(ds: Any, n: int, seed: int = 0, split: str = "train", cfg: Any = None) -> np.ndarray:
    """Sorted dataset indices of a seeded sample of up to ``n`` items that have a caption.

    ``split="train"``: only the protocol's training split (:func:`unialign.pipeline.make_splits` with
    ``cfg`` or the default config); ``"all"``: every record.
    """
    if isinstance(n, bool) or int(n) < 8:
        raise ConfigError(f"sample: need at least 8 pairs, got {n!r}")
    if split == "train":
        from ..config import load_config
        from ..pipeline import make_splits

        cfg = cfg if cfg is not None else load_config(None, {"data.dataset": ds.name})
        pool = make_splits(ds, cfg).train
    elif split == "all":
        pool = np.arange(len(ds))
    else:
        raise ConfigError(f"split: expected 'train' or 'all', got {split!r}")
    pool = np.asarray([i for i in pool if _captions(ds, i)], dtype=np.int64)
    if len(pool) < 8:
        raise DataError(f"{ds.name}: only {len(pool)} captioned items in the {split} split; need at least 8")
    rng = np.random.default_rng([seed, 11])
    pick = rng.choice(len(pool), size=min(int(n), len(pool)), replace=False)
    return np.sort(pool[pick])


def _captions(ds: Any, i: int) -> list[str]:
    return [c for c in ds.captions(int(i)) if isinstance(c, str) and c.strip()]


def _sample_dataset(ds: Any, indices: np.ndarray, caption: str) -> Any:
    """The sample as a dataset of its own (for extraction): first caption only, or all captions."""
    from ..data.base import PairDataset

    recs = []
    for i in indices:
        caps = _captions(ds, i)
        recs.append({**ds.records[int(i)], "captions": caps[:1] if caption == "first" else caps})
    return PairDataset(ds.name, recs, ds.root, ds.classes, dict(ds.meta))


# ------------------------------------------------------------------------------------------ features


def _find_full_store(ds: Any, encoder: Any, layers: Sequence[str]) -> Any:
    """A complete store of the whole dataset by this encoder that holds every wanted layer, or None."""
    from ..features.extract import default_store_path
    from ..features.store import FeatureStore

    folder = default_store_path(ds, encoder, [FINAL]).parent
    if not folder.is_dir():
        return None
    want_enc = json.loads(json.dumps(encoder.config()))
    fp = ds.fingerprint()
    for manifest in sorted(folder.glob("*/manifest.json")):
        try:
            m = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if (m.get("encoder") == want_enc and m.get("dataset", {}).get("fingerprint") == fp
                and set(layers) <= set(m.get("layer_dims", {}))):
            try:
                return FeatureStore.open(manifest.parent)
            except Exception:  # an unreadable store is simply not reused
                continue
    return None


def _sample_store_path(folder: str | Path | None, sub: Any, encoder: Any, layers: Sequence[str]) -> Path | None:
    if folder is None:
        return None  # extract's default: $UNIALIGN_HOME/features/<dataset>/<encoder>-<hash>
    from ..features.extract import default_store_path

    return Path(folder) / default_store_path(sub, encoder, [FINAL, *layers]).name


def image_features(ds: Any, indices: np.ndarray, encoder: Any, layers: Sequence[str], *, batch_size: int = 64,
                   num_workers: int | None = None, reuse: bool = True, features_dir: str | Path | None = None,
                   log: Log | None = None) -> tuple[dict[str, np.ndarray], np.ndarray, str]:
    """Per-layer float32 features of the sampled items' images, a mask of the items that have them,
    and where they came from (a store path). ``reuse=False`` ignores stores of the whole dataset;
    ``features_dir`` puts the sample's own store there instead of under ``$UNIALIGN_HOME``."""
    from ..features.extract import extract

    store = _find_full_store(ds, encoder, layers) if reuse else None
    if store is not None:
        rows = np.full(len(ds), -1, dtype=np.int64)
        rows[store.index] = np.arange(len(store))
        r = rows[indices]
    else:
        sub = _sample_dataset(ds, indices, "first")
        store = extract(sub, encoder, _sample_store_path(features_dir, sub, encoder, layers), layers=list(layers),
                        batch_size=batch_size, num_workers=num_workers, show_progress=log is not None)
        r = np.full(len(indices), -1, dtype=np.int64)
        r[store.index] = np.arange(len(store))
    ok = r >= 0
    feats = {l: np.zeros((len(indices), store.array(l).dim), np.float32) for l in layers}
    for l in layers:
        feats[l][ok] = np.asarray(store.array(l)[r[ok]], dtype=np.float32)
    return feats, ok, str(store.root)


def text_features(ds: Any, indices: np.ndarray, encoder: Any, layers: Sequence[str], caption: str = "first", *,
                  batch_size: int = 64, reuse: bool = True, features_dir: str | Path | None = None,
                  log: Log | None = None) -> tuple[dict[str, np.ndarray], str]:
    """Per-layer float32 text features, one row per sampled item: its first caption, or the mean over
    its captions' features (``caption="mean"``)."""
    from ..features.extract import extract

    store = _find_full_store(ds, encoder, layers) if reuse else None
    if store is None:
        sub = _sample_dataset(ds, indices, caption)
        store = extract(sub, encoder, _sample_store_path(features_dir, sub, encoder, layers), layers=list(layers),
                        batch_size=batch_size, show_progress=log is not None)
    row_of = {t: i for i, t in enumerate(store.texts())}
    caps = [_captions(ds, i) for i in indices]
    caps = [c[:1] for c in caps] if caption == "first" else caps
    flat = np.asarray([row_of[c] for cs in caps for c in cs], dtype=np.int64)
    owner = np.repeat(np.arange(len(indices)), [len(cs) for cs in caps])
    counts = np.bincount(owner, minlength=len(indices)).astype(np.float32)[:, None]
    feats = {}
    for l in layers:
        arr = np.asarray(store.array(l)[flat], dtype=np.float32)
        out = np.zeros((len(indices), arr.shape[1]), np.float32)
        np.add.at(out, owner, arr)
        feats[l] = out / counts
    return feats, str(store.root)


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
    if not names:
        raise ConfigError(f"metrics: give at least one of {', '.join(SELECT_METRICS)}")
    bad = [m for m in names if m not in SELECT_METRICS]
    if bad:
        raise ConfigError(f"metrics: unknown metric(s) {bad}; accepted: {', '.join(SELECT_METRICS)}")
    return names


def score_grid(
    image_feats: Mapping[str, Mapping[str, np.ndarray]],
    text_feats: Mapping[str, Mapping[str, np.ndarray]],
    metrics: Sequence[str] = DEFAULT_METRICS,
    *,
    k: int | str = "rice",
    calibrate: bool = False,
    n_perm: int = 5,
    seed: int = 0,
    groups: np.ndarray | None = None,
    probe_options: Mapping[str, Any] | None = None,
    log: Log | None = None,
) -> list[dict[str, Any]]:
    """Score every (image encoder, layer) x (text encoder, layer) combination; rows in grid order.

    ``image_feats[spec][layer]`` and ``text_feats[spec][layer]`` are row-paired (n, d) arrays. Each row
    holds ``scores`` (what ranks: the raw score, or ``raw - null_mean`` with ``calibrate``), ``raw``,
    and with ``calibrate`` also ``null_mean`` / ``null_std`` per metric, plus seconds spent.
    """
    names = check_metrics(metrics)
    rows = []
    for ispec, ilayers in image_feats.items():
        for tspec, tlayers in text_feats.items():
            for il, X in ilayers.items():
                for tl, Y in tlayers.items():
                    row: dict[str, Any] = {"image": ispec, "image_layer": il, "text": tspec, "text_layer": tl,
                                           "image_dim": int(X.shape[1]), "text_dim": int(Y.shape[1]),
                                           "scores": {}, "raw": {}, "seconds": {}}
                    for name in names:
                        fn = SELECT_METRICS[name]
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
                        log(f"  {_short(ispec)}:{il} x {_short(tspec)}:{tl}  "
                            + "  ".join(f"{m}={row['scores'][m]:.4f}" for m in names))
    return rows


def rank_rows(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Rows sorted by ``metric`` (descending; NaN last; on ties "final" layers first), each given its 1-based ``rank``."""
    def key(r: dict[str, Any]) -> tuple[float, int]:
        v = r["scores"][metric]
        # ties (e.g. a sentence model whose "final" is its last layer's mean) go to "final": the default
        return (-math.inf if v is None or not math.isfinite(v) else v, (r["image_layer"] == FINAL) + (r["text_layer"] == FINAL))

    out = sorted(rows, key=key, reverse=True)
    for i, r in enumerate(out):
        r["rank"] = i + 1
    return out


# -------------------------------------------------------------------------------------------- report


def _short(spec: str) -> str:
    """A readable encoder name for tables and titles: the last path component of st:/hf: paths."""
    name, sep, opts = spec.partition("?")
    for prefix in ("st:", "hf:"):
        if name.startswith(prefix):
            name = prefix + Path(name[len(prefix):]).name
    return name + (sep + opts if opts else "")


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", _short(spec)).strip("_")[:60]


def run_command(best: Mapping[str, Any], data: str = "emoji") -> str:
    """The ``unialign run`` command (shell-quoted) that trains heads on the chosen encoders and layers."""
    sets = [f"encoders.image={best['image']}", f"encoders.image_layers=[{best['image_layer']}]",
            f"encoders.text={best['text']}", f"encoders.text_layers=[{best['text_layer']}]"]
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
    config: dict[str, Any] = field(default_factory=dict)
    layers: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # {"image"|"text": {spec: layers}}
    stores: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    heatmaps: list[str] = field(default_factory=list)
    report: str | None = None

    @property
    def best(self) -> dict[str, Any]:
        return self.rows[0]

    @property
    def command(self) -> str:
        return run_command(self.best, self.data)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["best"] = {key: self.best[key] for key in ("image", "image_layer", "text", "text_layer", "scores")}
        d["command"] = self.command
        return d


def ranked_table(sel: Selection, top: int | None = 20) -> Any:
    """A rich Table of the ranked combinations (the best first)."""
    from rich.table import Table

    what = "raw - permutation null" if sel.calibrated else "raw"
    t = Table(title=f"encoder/layer selection on {sel.data}: {sel.n} pairs, ranked by {sel.primary} ({what}; k={sel.k})")
    t.add_column("rank", justify="right")
    for col in ("image encoder", "image layer", "text encoder", "text layer"):
        t.add_column(col, no_wrap=True)
    for m in sel.metrics:
        t.add_column(m, justify="right")
    shown = sel.rows if top is None or top <= 0 else sel.rows[:top]
    for r in shown:
        style = "bold green" if r["rank"] == 1 else None
        t.add_row(str(r["rank"]), _short(r["image"]), r["image_layer"], _short(r["text"]), r["text_layer"],
                  *[f"{r['scores'][m]:.4f}" for m in sel.metrics], style=style)
    if len(shown) < len(sel.rows):
        t.caption = f"{len(sel.rows) - len(shown)} more in the JSON report"
    return t


def plot_heatmaps(sel: Selection, out_dir: str | Path, prefix: str = "selection") -> list[Path]:
    """One PNG per (image encoder, text encoder): image layers (rows) x text layers (columns), a panel per
    metric with its colour bar; the best cell of each panel is outlined."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    pairs = list(dict.fromkeys((r["image"], r["text"]) for r in sel.rows))
    for ispec, tspec in pairs:
        il = sel.layers["image"][ispec]
        tl = sel.layers["text"][tspec]
        cell = {(r["image_layer"], r["text_layer"]): r for r in sel.rows if r["image"] == ispec and r["text"] == tspec}
        nm = len(sel.metrics)
        ncols = min(nm, 3)
        nrows = -(-nm // ncols)
        w = max(4.2, 0.62 * len(tl) + 2.6)
        h = max(3.4, 0.42 * len(il) + 1.8)
        fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols, h * nrows + 0.6), squeeze=False)
        for j, m in enumerate(sel.metrics):
            ax = axes[j // ncols][j % ncols]
            M = np.array([[cell[(a, b)]["scores"][m] if (a, b) in cell else np.nan for b in tl] for a in il], dtype=float)
            im = ax.imshow(M, cmap="viridis", aspect="auto", interpolation="nearest")
            ax.set_xticks(range(len(tl)), [f"{i}: {n}" for i, n in enumerate(tl)], rotation=45, ha="right", fontsize=8)
            ax.set_yticks(range(len(il)), [f"{i}: {n}" for i, n in enumerate(il)], fontsize=8)
            ax.set_xlabel(f"text layer ({_short(tspec)})")
            ax.set_ylabel(f"image layer ({_short(ispec)})")
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
        fig.suptitle(f"{', '.join(sel.metrics)}: {_short(ispec)} x {_short(tspec)} "
                     f"({sel.data}, {sel.n} pairs; red box = best)", fontsize=11)
        fig.tight_layout()
        path = out_dir / f"{prefix}_{_slug(ispec)}__{_slug(tspec)}.png"
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
    images: str | Sequence[str],
    texts: str | Sequence[str],
    data: str = "emoji",
    *,
    layers: str | Sequence[str] = "auto",
    image_layers: str | Sequence[str] | Mapping[str, Any] | None = None,
    text_layers: str | Sequence[str] | Mapping[str, Any] | None = None,
    sample: int = 2000,
    metrics: str | Sequence[str] = DEFAULT_METRICS,
    calibrate: bool = False,
    n_perm: int = 5,
    k: int | str = "rice",
    caption: str = "first",
    split: str = "train",
    seed: int = 0,
    probe_options: Mapping[str, Any] | None = None,
    out: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 64,
    num_workers: int | None = None,
    reuse: bool = True,
    features_dir: str | Path | None = None,
    dataset: Any = None,
    cfg: Any = None,
    log: Log | None = print,
) -> Selection:
    """Score every (image encoder, layer) x (text encoder, layer) on a seeded sample (see module doc).

    ``images`` / ``texts``: encoder specs (list or comma-separated). ``layers`` applies to all encoders,
    ``image_layers`` / ``text_layers`` override it per side (a mapping ``{spec: layers}``: per encoder). ``out``: folder for ``selection.json`` and
    the heatmaps (nothing written when None). ``dataset``: an already loaded PairDataset instead of
    ``data``. ``reuse=False`` ignores whole-dataset stores and ``features_dir`` holds the sample's own
    stores (the benchmark uses both to time a cold selection). Returns a :class:`Selection`; ``selection.command`` is the ``unialign run`` line.
    """
    from ..data import load_dataset
    from ..encoders import load_encoder

    say = log or (lambda s: None)
    t_start = time.perf_counter()
    if caption not in ("first", "mean"):
        raise ConfigError(f"caption: expected 'first' or 'mean', got {caption!r}")
    names = check_metrics(metrics)
    image_specs, text_specs = _split_specs(images, "images"), _split_specs(texts, "texts")
    if k != "rice" and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ConfigError(f"k: expected a positive integer or 'rice', got {k!r}")
    ds = dataset if dataset is not None else load_dataset(data)
    indices = sample_items(ds, sample, seed, split, cfg)
    say(f"{ds.name}: {len(indices)} sampled pairs ({split} split, seed {seed}, caption={caption})")

    timings: dict[str, float] = {}
    stores: dict[str, str] = {}
    img_feats: dict[str, dict[str, np.ndarray]] = {}
    txt_feats: dict[str, dict[str, np.ndarray]] = {}
    chosen: dict[str, dict[str, list[str]]] = {"image": {}, "text": {}}
    keep = np.ones(len(indices), dtype=bool)
    for side, specs, feats in (("image", image_specs, img_feats), ("text", text_specs, txt_feats)):
        want = image_layers if side == "image" else text_layers
        for spec in specs:
            t0 = time.perf_counter()
            enc = load_encoder(spec, device=device)
            if enc.modality != side:
                raise ConfigError(f"{'images' if side == 'image' else 'texts'}: {spec} is a {enc.modality} encoder")
            if isinstance(want, Mapping):  # per-encoder layers, keyed by the spec as given
                ls = resolve_layers(enc, want.get(spec, want.get(enc.spec, layers)))
            else:
                ls = resolve_layers(enc, want if want is not None else layers)
            if side == "image":
                f, ok, root = image_features(ds, indices, enc, ls, batch_size=batch_size, num_workers=num_workers,
                                             reuse=reuse, features_dir=features_dir, log=log)
                keep &= ok
            else:
                f, root = text_features(ds, indices, enc, ls, caption, batch_size=batch_size, reuse=reuse,
                                        features_dir=features_dir, log=log)
            if enc.spec in feats:
                raise ConfigError(f"{side} encoder {enc.spec} given twice")
            feats[enc.spec], chosen[side][enc.spec], stores[enc.spec] = f, ls, root
            timings[f"features {enc.spec}"] = time.perf_counter() - t0
            say(f"{side} {enc.spec}: layers {', '.join(ls)} ({time.perf_counter() - t0:.1f}s, store {root})")
            del enc
    if not keep.all():
        say(f"{int((~keep).sum())} sampled image(s) could not be encoded; scoring the other {int(keep.sum())}")
        for feats in (img_feats, txt_feats):
            for spec in feats:
                feats[spec] = {l: a[keep] for l, a in feats[spec].items()}
    indices = indices[keep]
    concept_id = {c: i for i, c in enumerate(ds.concepts())}
    groups = np.asarray([concept_id[ds.records[int(i)]["concept"]] for i in indices], dtype=np.int64)
    n = len(indices)
    kk = rice_k(n) if k == "rice" else int(k)
    n_combos = sum(len(v) for v in chosen["image"].values()) * sum(len(v) for v in chosen["text"].values())
    say(f"scoring {n_combos} combinations with {', '.join(names)} (k={kk}{', calibrated' if calibrate else ''})")
    t0 = time.perf_counter()
    rows = score_grid(img_feats, txt_feats, names, k=kk, calibrate=calibrate, n_perm=n_perm, seed=seed,
                      groups=groups, probe_options=probe_options, log=log)
    timings["scoring"] = time.perf_counter() - t0
    sel = Selection(rank_rows(rows, names[0]), names, names[0], bool(calibrate), n, kk, data if dataset is None else ds.name,
                    config={"sample": int(sample), "seed": seed, "split": split, "caption": caption, "k": k,
                            "n_perm": n_perm if calibrate else None, "probe_options": dict(probe_options or {}),
                            "images": image_specs, "texts": text_specs, "layers": layers if isinstance(layers, str) else list(layers)},
                    layers=chosen, stores=stores, timings=timings)
    if out is not None:
        out = Path(out)
        sel.heatmaps = [str(p) for p in plot_heatmaps(sel, out)]
        sel.timings["total"] = time.perf_counter() - t_start
        sel.report = str(out / "selection.json")
        from ..io import write_json

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
