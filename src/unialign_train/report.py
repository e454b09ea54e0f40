"""``unialign report <run dir>``: PNG plots and an HTML + Markdown page for a finished run (the "use"
stage: it reads a saved model, its results and the cached features).

Reads what ``unialign run`` wrote (``history.jsonl``, ``run.json``, ``results/*.json``, ``model/``) and
recomputes what it did not save from the saved model and the cached features (nothing is re-encoded
when the feature stores exist; only prompts and queries go through the text encoder):

- ``report_curves.png``: training loss, temperature, learning rate and validation accuracy per
  validation step, with the best (restored) step marked;
- ``report_per_class_<dataset>.png``: zero-shot top-1 accuracy per class (few classes: one bar each,
  plus a confusion matrix), per category (emoji: Unicode category), or the distribution over classes;
- ``report_retrieval.png``: text queries (held-out concepts) with their top-k test images, hits framed
  green;
- ``report.md`` and ``report.html``: the results table, the recomputed accuracies beside the saved
  ones, per-class tables and the retrieval examples, linking the PNGs.
"""
from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from unialign.io import save_figure, write_text
from unialign.media import load_image
from unialign.search import topk
from unialign.results import markdown_rows

from .evaluate.tasks import zero_shot_predictions as _predictions

Log = Callable[[str], None]
MAX_BARS = 40  # more classes than this: per category, or a histogram


# -- data ----------------------------------------------------------------------------------------------
@dataclass
class ZeroShot:
    """Zero-shot predictions on one evaluation split, as :func:`~unialign_train.evaluate.classification` makes them."""

    dataset: str
    class_names: list[str]
    labels: np.ndarray  # (n,) true class index
    top5: np.ndarray  # (n, <=5) predicted class indices, best first
    items: np.ndarray  # dataset indices of the evaluated images
    groups: list[str] | None = None  # per-image category, when the dataset has one

    @property
    def acc1(self) -> float:
        return float((self.top5[:, 0] == self.labels).mean())

    @property
    def acc5(self) -> float:
        return float((self.top5 == self.labels[:, None]).any(1).mean())

    def per_class(self) -> list[tuple[str, int, float]]:
        """(class name, images, top-1 accuracy) for each class with images, in class order."""
        out = []
        for c, name in enumerate(self.class_names):
            m = self.labels == c
            if m.any():
                out.append((name, int(m.sum()), float((self.top5[m, 0] == c).mean())))
        return out

    def per_group(self) -> list[tuple[str, int, float]]:
        groups = np.asarray(self.groups)
        hit = self.top5[:, 0] == self.labels
        return [(g, int((groups == g).sum()), float(hit[groups == g].mean())) for g in dict.fromkeys(self.groups or [])]

    def confusion(self) -> np.ndarray:
        k = len(self.class_names)
        cm = np.zeros((k, k), dtype=np.int64)
        np.add.at(cm, (self.labels, self.top5[:, 0]), 1)
        return cm


def zero_shot_predictions(model: Any, cached: Any, indices: np.ndarray, name: str, modality: str,
                          templates: Sequence[str] | str) -> ZeroShot:
    """Top-5 zero-shot predictions with the same classes, prompts and features as the evaluation."""
    emb, weights, names, labels, kept = _predictions(model, cached, indices, modality, templates)
    top5 = topk(emb, weights, 5)[1].numpy()
    ds = cached.dataset
    groups = [str(ds.records[i].get("category")) for i in kept] if "category" in ds.records[0] else None
    return ZeroShot(name, names, np.asarray(labels), top5, np.asarray(kept), groups)


@dataclass
class Retrieval:
    dataset: Any
    queries: list[str]  # query texts
    query_concepts: list[str]
    top: np.ndarray  # (queries, k) dataset indices, best first
    scores: np.ndarray  # (queries, k) cosine similarities


def retrieval_examples(model: Any, cached: Any, indices: np.ndarray, modality: str, templates: Sequence[str],
                       n_queries: int = 6, k: int = 5) -> Retrieval:
    """``n_queries`` held-out concepts spread over the split, each as a text query (first template) ranked
    against every ``modality`` item of the split, using the cached features."""
    ds = cached.dataset
    feats, kept = cached[modality].record_features(indices)
    concepts = list(dict.fromkeys(ds.records[i]["concept"] for i in kept))
    pick = [concepts[int(j)] for j in np.linspace(0, len(concepts) - 1, min(n_queries, len(concepts))).round()]
    pick = list(dict.fromkeys(pick))
    labels_of = ds.concept_labels()
    queries = [templates[0].format(labels_of[c]) for c in pick]
    items = model.project(modality, feats)
    txt = model.encode(queries, "text", convert_to_tensor=True, normalize_embeddings=True).cpu()
    s, j = topk(txt, items, min(k, len(kept)))
    return Retrieval(ds, queries, pick, np.asarray(kept)[j.numpy()], s.numpy())


# -- plots -----------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: list[dict[str, Any]], path: Path, best_step: int | None = None, title: str = "") -> Path:
    plt = _plt()
    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    panels = [("loss", "training loss", None), ("temperature", "temperature (1 / logit scale)", None),
              ("lr", "learning rate", None), (("val_acc1", "val_acc5"), "validation zero-shot accuracy", "%")]
    for ax, (key, name, unit) in zip(axes.ravel(), panels):
        for kk in (key if isinstance(key, tuple) else (key,)):
            vals = [h.get(kk) for h in history]
            if all(v is None for v in vals):
                continue
            y = np.asarray([np.nan if v is None else v for v in vals], dtype=float) * (100 if unit == "%" else 1)
            ax.plot(steps, y, marker="o", ms=3, label=kk)
        if isinstance(key, tuple):
            ax.legend(loc="lower right")
            ax.set_ylabel("accuracy (%)")
        if best_step is not None:
            ax.axvline(best_step, color="grey", ls="--", lw=1)
            ax.text(best_step, ax.get_ylim()[1], " best", va="top", ha="left", color="grey", fontsize=9)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title or "training curves (one point per validation)")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def plot_per_class(zs: ZeroShot, path: Path, chance: float | None = None) -> tuple[Path, str]:
    """Bars per class (+ confusion matrix), per category, or a histogram; returns (path, kind)."""
    plt = _plt()
    chance = 1.0 / len(zs.class_names) if chance is None else chance
    rows = zs.per_class()
    if len(rows) <= MAX_BARS:
        kind = "class"
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(15, 6), gridspec_kw={"width_ratios": [1.1, 1]})
        names, ns, accs = zip(*rows)
        order = np.argsort(accs)
        ax.barh(np.arange(len(rows)), np.asarray(accs)[order] * 100, color="tab:blue")
        ax.set_yticks(np.arange(len(rows)), [f"{names[i]} (n={ns[i]})" for i in order])
        cm = zs.confusion()
        rec = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        im = ax2.imshow(rec * 100, cmap="viridis", vmin=0, vmax=100)
        ax2.set_xticks(np.arange(len(zs.class_names)), zs.class_names, rotation=60, ha="right", fontsize=8)
        ax2.set_yticks(np.arange(len(zs.class_names)), zs.class_names, fontsize=8)
        ax2.set_xlabel("predicted")
        ax2.set_ylabel("true")
        ax2.set_title("confusion (% of each true class)")
        if len(zs.class_names) <= 15:
            for i in range(len(zs.class_names)):
                for j in range(len(zs.class_names)):
                    if cm[i, j]:
                        ax2.text(j, i, f"{rec[i, j] * 100:.0f}", ha="center", va="center", fontsize=7,
                                 color="white" if rec[i, j] < 0.6 else "black")
        fig.colorbar(im, ax=ax2, fraction=0.046)
    elif zs.groups:
        kind = "category"
        fig, ax = plt.subplots(figsize=(10, 0.45 * len(set(zs.groups)) + 2))
        grows = sorted(zs.per_group(), key=lambda r: r[2])
        ax.barh(np.arange(len(grows)), [r[2] * 100 for r in grows], color="tab:blue")
        ax.set_yticks(np.arange(len(grows)), [f"{g} (n={n})" for g, n, _ in grows])
    else:
        kind = "histogram"
        fig, ax = plt.subplots(figsize=(9, 5))
        ax.hist([r[2] * 100 for r in rows], bins=np.linspace(0, 100, 11), color="tab:blue")
        ax.set_xlabel("per-class top-1 accuracy (%)")
        ax.set_ylabel("classes")
    if kind != "histogram":
        ax.axvline(chance * 100, color="red", ls=":", lw=1.5, label=f"chance {chance * 100:.1f}%")
        ax.axvline(zs.acc1 * 100, color="black", ls="--", lw=1.2, label=f"overall {zs.acc1 * 100:.1f}%")
        ax.set_xlabel("zero-shot top-1 accuracy (%)")
        ax.set_xlim(0, 100)
        ax.legend(loc="lower right")
        ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"{zs.dataset}: zero-shot top-1 per {kind if kind != 'histogram' else 'class (distribution)'} "
                 f"({len(zs.class_names)} classes, {len(zs.labels)} images)")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path, kind


def plot_retrieval(ret: Retrieval, path: Path, title: str = "") -> Path:
    plt = _plt()
    ds = ret.dataset
    nq, k = ret.top.shape
    fig, axes = plt.subplots(nq, k + 1, figsize=(2.0 * (k + 1) + 1.5, 2.1 * nq), squeeze=False,
                             gridspec_kw={"width_ratios": [1.8] + [1] * k})
    labels_of = ds.concept_labels()
    for q in range(nq):
        ax = axes[q, 0]
        ax.axis("off")
        ax.text(0.0, 0.5, _wrap(ret.queries[q], 22), ha="left", va="center", fontsize=10, weight="bold",
                transform=ax.transAxes)
        for r in range(k):
            i = int(ret.top[q, r])
            ax = axes[q, r + 1]
            ax.imshow(np.asarray(load_image(ds.path(i))))
            hit = ds.records[i]["concept"] == ret.query_concepts[q]
            for sp in ax.spines.values():
                sp.set_edgecolor("tab:green" if hit else "tab:red")
                sp.set_linewidth(4 if hit else 1.5)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(_wrap(labels_of.get(ds.records[i]["concept"], ""), 18, 2), fontsize=8)
            ax.set_xlabel(f"#{r + 1}  cos {ret.scores[q, r]:.2f}", fontsize=8)
    fig.suptitle(title or f"text -> image retrieval: top {k} (green frame: the query's concept)")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


def _wrap(text: str, width: int, max_lines: int = 4) -> str:
    import textwrap

    lines = textwrap.wrap(text, width) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: width - 1] + "…"
    return "\n".join(lines)


# -- pages -----------------------------------------------------------------------------------------------
def _html_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def write_pages(out: Path, sections: list[tuple[str, str, list[tuple[Sequence[str], list[list[Any]]]], list[Path]]],
                title: str) -> tuple[Path, Path]:
    """sections: (heading, paragraph, [(header, rows)], [png paths])."""
    md = [f"# {title}", ""]
    body = [f"<h1>{html.escape(title)}</h1>"]
    for heading, para, tables, pngs in sections:
        md += [f"## {heading}", ""]
        body.append(f"<h2>{html.escape(heading)}</h2>")
        if para:
            md += [para, ""]
            body.append(f"<p>{html.escape(para)}</p>")
        for p in pngs:
            md += [f"![{p.stem}]({p.name})", ""]
            body.append(f'<p><img src="{html.escape(p.name)}" alt="{html.escape(p.stem)}" style="max-width:100%"></p>')
        for header, rows in tables:
            md += [markdown_rows(header, rows), ""]
            body.append(_html_table(header, rows))
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
             "th{background:#f0f0f0}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")
    write_text(out / "report.md", "\n".join(md) + "\n")
    write_text(out / "report.html", page)
    return out / "report.md", out / "report.html"


# -- the whole report ------------------------------------------------------------------------------------
def report(run_dir: str | Path, out: str | Path | None = None, n_queries: int = 6, k: int = 5,
           zero_shot_sets: bool | None = None, device: str | None = None, show_progress: bool = True,
           log: Log = print) -> dict[str, Path]:
    """Write the plots and pages for a finished run; returns {name: path}."""
    from unialign.errors import UnialignError
    from unialign.io import read_json
    from unialign.model import AlignedModel
    from unialign.progress import progress
    from unialign.results import result_rows

    from .data import DataConfig, heldout_name, load_dataset, make_splits
    from .evaluate.tasks import EvalConfig
    from .evaluate.tasks import zero_shot_sets as zero_shot_sets_of
    from .features.cache import ExtractConfig, cache_features

    run_dir = Path(run_dir)
    if not (run_dir / "model" / "config.json").exists() or not (run_dir / "run.json").exists():
        raise UnialignError(f"{run_dir} is not a finished run folder (no model/config.json or run.json); "
                            "give the --output folder of `unialign run`")
    out = Path(out) if out is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    run_info = read_json(run_dir / "run.json")
    cfg = run_info.get("config", {})
    data_cfg, eval_cfg = DataConfig.model_validate(cfg["data"]), EvalConfig.model_validate(cfg["eval"])
    extract_cfg = ExtractConfig.model_validate(cfg["extract"])
    align = list(cfg.get("align", ["image", "text"]))
    query = next((m for m in align if m != "text"), align[0])
    info = run_info.get("info", {})
    records = [json.loads(p.read_text()) for p in sorted((run_dir / "results").glob("*.json"))]
    history = [json.loads(l) for l in (run_dir / "history.jsonl").read_text().splitlines() if l.strip()] \
        if (run_dir / "history.jsonl").exists() else []
    sets = zero_shot_sets_of(eval_cfg.zero_shot_sets, align, log) if zero_shot_sets is not False else []
    written: dict[str, Path] = {}
    sections: list = []
    steps = ["curves", "model + features", f"zero-shot {data_cfg.dataset}", *(f"zero-shot {n}" for n, *_ in sets),
             "retrieval examples", "pages"]
    bar = progress(total=len(steps), desc="report", disable=not show_progress)

    # 1. curves
    bar.set_postfix_str("curves")
    best = info.get("best_step")
    if history:
        written["curves"] = plot_curves(history, out / "report_curves.png", best,
                                        f"{cfg.get('name')}: {info.get('recipe', cfg.get('recipe'))} on {data_cfg.dataset}")
        para = (f"{len(history)} validations; training stopped at step {info.get('steps', history[-1]['step'])}, "
                f"best step {best} restored (validation score = mean of val acc1 and acc5).")
    else:
        para = "no history.jsonl (a closed-form recipe, or the run was not trained): no curves."
    sections.append(("Training curves", para, [], [written["curves"]] if "curves" in written else []))
    bar.update()

    # 2. model, data, cached features (the same stores the run used; extraction is a no-op when cached)
    bar.set_postfix_str("model + features")
    model = AlignedModel.from_pretrained(run_dir / "model", device=device or cfg.get("device"))
    quiet: Log = lambda *_: None  # noqa: E731
    ds = load_dataset(data_cfg.dataset)
    cached = cache_features(ds, {query: model.encoders[query]}, model.layers, extract_cfg, quiet, show_progress=False)
    splits = make_splits(ds, data_cfg)
    tag = heldout_name(ds, splits)
    bar.update()

    # 3. per-class zero-shot: the held-out split, then each zero-shot set the run scored
    saved = {(r["dataset"], r["task"]): r for r in records}
    check_rows, per_class_sections = [], []
    evals: list[tuple[str, Any, Any, str]] = [(tag, cached, splits.test, eval_cfg.templates)]
    evals += [(name, zds, None, zs.templates) for name, zs, zds, _ in sets]
    for name, c, idx, templates in evals:
        bar.set_postfix_str(f"zero-shot {name}")
        if idx is None:  # a zero-shot set: the same records the run scored (its limit applies here too)
            c, idx = cache_features(c, {query: model.encoders[query]}, model.layers, extract_cfg, quiet,
                                    show_progress=False), np.arange(len(c))
        zs = zero_shot_predictions(model, c, idx, name, query, templates)
        rec = saved.get((name, "zeroshot_classification"))
        chance = rec["chance"]["acc1"] if rec and "chance" in rec else None
        png, kind = plot_per_class(zs, out / f"report_per_class_{_slug(name)}.png", chance)
        written[f"per_class_{name}"] = png
        if rec:
            check_rows.append([name, f"{100 * rec['metrics']['acc1']:.2f}", f"{100 * zs.acc1:.2f}",
                               f"{100 * rec['metrics']['acc5']:.2f}", f"{100 * zs.acc5:.2f}"])
        rows = zs.per_group() if kind == "category" else zs.per_class()
        rows = sorted(rows, key=lambda r: -r[2])
        table = (["category" if kind == "category" else "class", "items", "top-1 %"],
                 [[n, cnt, f"{100 * a:.1f}"] for n, cnt, a in rows])
        if kind == "histogram":  # too many classes to list all: the best and worst ten
            table = (table[0], table[1][:10] + [["...", "", ""]] + table[1][-10:])
        per_class_sections.append((f"Zero-shot accuracy per {kind}: {name}",
                                   f"{len(zs.labels)} {query} items, {len(zs.class_names)} classes, templates "
                                   f"'{templates}'; overall top-1 {100 * zs.acc1:.2f}%, top-5 {100 * zs.acc5:.2f}%.",
                                   [table], [png]))
        bar.update()

    # 4. retrieval examples on the test split
    bar.set_postfix_str("retrieval examples")
    from unialign.zeroshot import get_templates

    ret = retrieval_examples(model, cached, splits.test, query, get_templates(eval_cfg.templates), n_queries, k)
    if query == "image":
        written["retrieval"] = plot_retrieval(ret, out / "report_retrieval.png",
                                              f"{tag}: text query -> top {ret.top.shape[1]} of {len(splits.test)} "
                                              f"test images (green: the query's concept)")
    labels_of = ds.concept_labels()
    ret_rows = []
    for q in range(len(ret.queries)):
        hits = [ds.records[int(i)]["concept"] == ret.query_concepts[q] for i in ret.top[q]]
        ret_rows.append([ret.queries[q], next((r + 1 for r, h in enumerate(hits) if h), "-"),
                         "; ".join(labels_of.get(ds.records[int(i)]["concept"], "") for i in ret.top[q])])
    bar.update()

    # 5. pages
    bar.set_postfix_str("pages")
    mcfg = read_json(run_dir / "model" / "config.json")["modalities"]
    summary = [["run", str(run_dir)], ["recipe", info.get("recipe", cfg.get("recipe"))]]
    summary += [[f"{m} encoder", f"{part['encoder']['spec']} (layers {', '.join(part['layers'])}; projection "
                                 f"{part['projection']['type']})"] for m, part in mcfg.items()]
    summary += [["logit scale", f"{float(model.logit_scale.exp()):.2f}"], ["training pairs", info.get("n_pairs", "-")],
                ["steps / best step", f"{info.get('steps', '-')} / {best}"],
                ["training seconds", f"{info['train_seconds']:.1f}" if "train_seconds" in info else "-"]]
    sections.insert(0, ("Run", "", [(["", ""], summary)], []))
    sections.insert(1, ("Results (CLIP_benchmark records)", "Scores beside the chance level of each metric.",
                        [(["dataset", "task", "metric", "score %", "chance %", "x chance"], result_rows(records))], []))
    if check_rows:
        sections.append(("Recomputed from the saved model", "Zero-shot accuracy recomputed for this report from the "
                         "saved model and the cached features, beside the numbers the run saved.",
                         [(["dataset", "saved acc1 %", "recomputed acc1 %", "saved acc5 %", "recomputed acc5 %"],
                           check_rows)], []))
    sections += per_class_sections
    sections.append(("Retrieval examples", "Each query (a held-out concept in the first prompt template) ranked "
                     f"against every test {query} item; 'first hit' is the rank of the first item of the query's concept.",
                     [(["query", "first hit", f"top {ret.top.shape[1]} (concept of each item)"], ret_rows)],
                     [written["retrieval"]] if "retrieval" in written else []))
    md, page = write_pages(out, sections, f"unialign report: {cfg.get('name')} ({run_dir.name})")
    written.update(markdown=md, html=page)
    bar.update()
    bar.close()
    log(f"report written to {out}: " + ", ".join(p.name for p in written.values()))
    return written


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in name)


__all__ = ["ZeroShot", "plot_curves", "plot_per_class", "plot_retrieval", "report", "retrieval_examples", "write_pages",
           "zero_shot_predictions"]
