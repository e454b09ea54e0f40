"""Result records in CLIP_benchmark's format, and the Markdown table printed beside chance levels.

One record per (model, dataset, task)::

    {"dataset": ..., "model": ..., "pretrained": ..., "task": "zeroshot_classification",
     "metrics": {"acc1": ..., ...}, "language": "en", "chance": {...}, "n_samples": ..., "n_classes": ...}

``chance`` and the counts are unialign's additions; CLIP_benchmark readers ignore them.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

from .io import write_json, write_text

MAIN_METRICS = {"zeroshot_classification": ["acc1", "acc5", "mean_per_class_recall"]}


def record(dataset: str, model: str, pretrained: str, task: str, metrics: dict[str, float],
           chance: dict[str, float], **extra: Any) -> dict[str, Any]:
    return {"dataset": dataset, "model": model, "pretrained": pretrained, "task": task, "metrics": metrics,
            "language": "en", "chance": chance, **extra}


def markdown_table(records: Sequence[dict[str, Any]]) -> str:
    """Rows: dataset, task, metric, score (%), chance (%), score / chance."""
    return markdown_rows(["dataset", "task", "metric", "score %", "chance %", "x chance"], result_rows(records),
                         align="lllrrr")


def markdown_rows(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> str:
    """A Markdown table; ``align`` has one letter per column, ``r`` for right-aligned (numbers)."""
    rule = ["---:" if align[i:i + 1] == "r" else "---" for i in range(len(header))]
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def result_rows(records: Sequence[dict[str, Any]]) -> list[list[str]]:
    """The main metrics of each record as text cells: dataset, task, metric, score %, chance %, x chance."""
    rows = []
    for r in records:
        for m in MAIN_METRICS.get(r["task"], sorted(r["metrics"], key=_retrieval_order)):
            if m in r["metrics"]:
                s, c = r["metrics"][m], r.get("chance", {}).get(m)
                rows.append([r["dataset"], r["task"], m, f"{100 * s:.2f}", "-" if c is None else f"{100 * c:.2f}",
                             f"{s / c:.1f}" if c else "-"])
    return rows


def result_name(r: dict[str, Any]) -> str:
    """CLIP_benchmark's default output name, ``{dataset}_{pretrained}_{model}_{language}_{task}.json``,
    each part made file-name safe; a ``pretrained`` path counts by its last component, as CB counts a
    checkpoint file (:func:`cb_output_template` gives CB the same name for a model folder)."""
    parts = [r["dataset"], _pretrained_slug(str(r["pretrained"])), r["model"], r.get("language", "en"), r["task"]]
    return "_".join(_safe(p) for p in parts) + ".json"


def cb_output_template(pretrained: str) -> str:
    """CB's ``--output`` template for a model folder: CB itself shortens only checkpoint *files* to their
    name and would put a folder's slashes into the file name."""
    return "{dataset}_" + _safe(_pretrained_slug(pretrained)) + "_{model}_{language}_{task}.json"


def _pretrained_slug(pretrained: str) -> str:
    return Path(pretrained).name or pretrained


def _safe(part: Any) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", str(part)).strip("-")


def _retrieval_order(metric: str) -> tuple[str, int]:
    """``image_retrieval_recall@10`` after ``@5`` (not after ``@1`` as plain sorting would put it)."""
    name, _, k = metric.partition("@")
    return name, int(k) if k.isdigit() else 0


def write_results(folder: str | Path, records: Sequence[dict[str, Any]]) -> list[Path]:
    """One CLIP_benchmark JSON per record (CB's file names, so ``clip_benchmark build`` reads the folder)
    plus ``results.md``; returns the paths written."""
    folder = Path(folder)
    out = []
    for r in records:
        p = folder / result_name(r)
        write_json(p, r)
        out.append(p)
    md = folder / "results.md"
    write_text(md, markdown_table(records) + "\n")
    return out + [md]
