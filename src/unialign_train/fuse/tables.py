"""Result tables of the fuse stage: one row per method, mean +- std over seeds.

The fusion table compares each method with the best single modality *as measured*: for every seed, the
method's test score minus the best unimodal model's (the unimodal family with the highest mean), so the
difference and its spread are paired by seed.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from unialign.results import markdown_rows


def mean_std(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64) * scale
    if not len(v):
        return "-"
    return f"{v.mean():.{digits}f} +- {v.std():.{digits}f}" if len(v) > 1 else f"{v.mean():.{digits}f}"


def summarize(rows: Sequence[dict[str, Any]], metric: str, lower_is_better: bool = False) -> list[dict[str, Any]]:
    """Per method (in first-appearance order): its seeds' rows and the paired difference to the best
    unimodal method (the highest mean ``metric``; the lowest with ``lower_is_better``, e.g. MAE)."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {m: {r["seed"]: r for r in rows if r["method"] == m} for m in methods}
    uni = [m for m in methods if next(iter(by[m].values()))["family"] == "unimodal"]
    sign = -1.0 if lower_is_better else 1.0
    best = max(uni, key=lambda m: sign * np.mean([r["test"][metric] for r in by[m].values()])) if uni else None
    out = []
    for m in methods:
        seeds = by[m]
        delta = [seeds[s]["test"][metric] - by[best][s]["test"][metric] for s in seeds if best and s in by[best]]
        out.append({"method": m, "family": next(iter(seeds.values()))["family"], "rows": list(seeds.values()),
                    "delta": delta, "best_single": best})
    return out


def fusion_table(rows: Sequence[dict[str, Any]], kind: str = "classification") -> str:
    """Markdown: method, its number of seeds, test scores (all modalities), difference to the best single
    modality, scores with each modality hidden, trainable parameters, training time."""
    metric, extra = ("acc1", "acc5") if kind == "classification" else ("mae", "r2")
    scale = 100.0 if kind == "classification" else 1.0
    lower = kind != "classification"  # MAE
    summary = summarize(rows, metric, lower_is_better=lower)
    mods = list(dict.fromkeys(m for r in rows for m in r["without"]))
    header = ["method", "seeds", f"{metric} %" if scale == 100 else metric, f"{extra} %" if scale == 100 else extra,
              f"vs best single ({summary[0]['best_single'] if summary else '-'})"]
    header += [f"without {m}" for m in mods] + ["trainable params", "train s"]
    table = []
    for s in summary:
        rs = s["rows"]
        cells = [s["method"], len(rs), mean_std([r["test"][metric] for r in rs], scale),
                 mean_std([r["test"][extra] for r in rs], scale),
                 "-" if s["family"] == "unimodal" or not s["delta"] else
                 mean_std(s["delta"], scale) + f" ({sum((d < 0) if lower else (d > 0) for d in s['delta'])}/"
                                               f"{len(s['delta'])} seeds {'below' if lower else 'above'})"]
        cells += [mean_std([r["without"][m][metric] for r in rs], scale) if m in rs[0]["without"] else "-" for m in mods]
        cells += [f"{int(np.mean([r['parameters'] for r in rs])):,}", mean_std([r["seconds"] for r in rs], 1.0, 0)]
        table.append(cells)
    return markdown_rows(header, table, align="lrrrr" + "r" * len(mods) + "rr")


def consistency_table(results: dict[str, Sequence[dict[str, Any]]]) -> str:
    """Markdown: per detector (its seeds' results), AUC, accuracy, ECE and word grounding P / R / F1."""
    header = ["detector", "AUC %", "accuracy %", "ECE %", "word precision %", "word recall %", "word F1 %"]
    table = []
    for name, rs in results.items():
        table.append([name, mean_std([r["auc"] for r in rs]), mean_std([r["accuracy"] for r in rs]),
                      mean_std([r["ece"] for r in rs]), mean_std([r["words"]["precision"] for r in rs]),
                      mean_std([r["words"]["recall"] for r in rs]), mean_std([r["words"]["f1"] for r in rs])])
    return markdown_rows(header, table, align="lrrrrrr")


def consistency_by_type(results: dict[str, Sequence[dict[str, Any]]]) -> str:
    """Markdown: per detector and manipulation type, the type's count, AUC against real pairs, accuracy,
    word F1 (types whose caption is manipulated) and the share of words flagged."""
    header = ["detector", "type", "pairs", "AUC vs real %", "accuracy %", "word F1 %", "words flagged %"]
    table = []
    for name, rs in results.items():
        for kind, first in rs[0]["by_type"].items():
            per = [r["by_type"][kind] for r in rs]
            table.append([name, kind, first["n"], mean_std([p.get("auc") for p in per]) if "auc" in first else "-",
                          mean_std([p["accuracy"] for p in per]),
                          mean_std([p["words"]["f1"] for p in per]) if "words" in first else "-",
                          mean_std([p["flagged_words"] for p in per])])
    return markdown_rows(header, table, align="llrrrrr")


__all__ = ["consistency_by_type", "consistency_table", "fusion_table", "mean_std", "summarize"]
