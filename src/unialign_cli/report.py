"""``unialign report``: plots and pages for a finished run."""
from __future__ import annotations

from pathlib import Path

import typer


def report_command(
    run_dir: Path = typer.Argument(..., help="A finished run folder (the --output of `unialign run`)."),
    out: Path = typer.Option(None, help="Where to write the PNGs and pages (default <run dir>/report)."),
    queries: int = typer.Option(6, min=1, help="Retrieval examples: how many text queries."),
    k: int = typer.Option(5, min=1, help="Retrieval examples: items shown per query."),
    zero_shot_sets: bool = typer.Option(None, "--zero-shot-sets/--no-zero-shot-sets",
                                        help="Per-class plots of the zero-shot sets (default: those the run evaluated)."),
    device: str = typer.Option(None, help="auto, cpu, cuda, ... (default: the run's)."),
) -> None:
    """Plots (training curves, per-class zero-shot accuracy, retrieval examples) and an HTML + Markdown page."""
    from unialign_train.report import report

    report(run_dir, out, queries, k, zero_shot_sets, device, log=typer.echo)
