"""Result records in CLIP_benchmark's format, and the Markdown table printed beside chance levels.

One record per (model, dataset, task)::

    {"dataset": ..., "model": ..., "pretrained": ..., "task": "zeroshot_classification",
     "metrics": {"acc1": ..., ...}, "language": "en", "chance": {...}, "n_samples": ..., "n_classes": ...}

``chance`` and the counts are unialign's additions; CLIP_benchmark readers ignore them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..io import write_json, write_text

MAIN_METRICS = {
    "zeroshot_classification": ["acc1", "acc5", "mean_per_class_recall"],
    "zeroshot_retrieval": ["image_retrieval_recall@1", "image_retrieval_recall@5", "image_retrieval_recall@10",
                           "text_retrieval_recall@1", "text_retrieval_recall@5", "text_retrieval_recall@10"],
}


def record(dataset: str, model: str, pretrained: str, task: str, metrics: dict[str, float],
           chance: dict[str, float], **extra: Any) -> dict[str, Any]:
    return {"dataset": dataset, "model": model, "pretrained": pretrained, "task": task, "metrics": metrics,
            "language": "en", "chance": chance, **extra}


def markdown_table(records: Sequence[dict[str, Any]] | dict[str, Any]) -> str:
    """Rows: dataset, task, metric, score (%), chance (%), score / chance."""
    if isinstance(records, dict):
        records = records.get("records", [])
    rows = ["| dataset | task | metric | score % | chance % | x chance |", "|---|---|---|---:|---:|---:|"]
    rows += ["| " + " | ".join(r) + " |" for r in result_rows(records)]
    return "\n".join(rows)


def result_rows(records: Sequence[dict[str, Any]]) -> list[list[str]]:
    """The main metrics of each record as text cells: dataset, task, metric, score %, chance %, x chance."""
    rows = []
    for r in records:
        for m in MAIN_METRICS.get(r["task"], list(r["metrics"])):
            if m in r["metrics"]:
                s, c = r["metrics"][m], r.get("chance", {}).get(m)
                rows.append([r["dataset"], r["task"], m, f"{100 * s:.2f}", "-" if c is None else f"{100 * c:.2f}",
                             f"{s / c:.1f}" if c else "-"])
    return rows


def write_results(folder: str | Path, records: Sequence[dict[str, Any]]) -> list[Path]:
    """One CLIP_benchmark JSON per record plus ``results.md``; returns the paths written."""
    folder = Path(folder)
    out = []
    for r in records:
        p = folder / f"{r['dataset']}__{r['task']}.json"
        write_json(p, r)
        out.append(p)
    md = folder / "results.md"
    write_text(md, markdown_table(records) + "\n")
    return out + [md]
