"""``unialign benchmark``: a finished run scored by CLIP_benchmark's own command line."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def benchmark_command(
    run_dir: Path = typer.Argument(..., help="A finished run folder (the --output of `unialign run`)."),
    out: Optional[Path] = typer.Option(None, help="Where CLIP_benchmark writes its JSON files (default <run dir>/clip_benchmark)."),
    dataset: Optional[List[str]] = typer.Option(None, help="CLIP_benchmark dataset id(s) instead of the run's own sets "
                                                          "(e.g. cifar10, wds/...); repeatable."),
    dataset_root: Optional[Path] = typer.Option(None, help="--dataset_root for --dataset ids."),
    batch_size: int = typer.Option(64, min=1, help="CLIP_benchmark's --batch_size."),
) -> None:
    """Run the real `clip_benchmark eval` (model type `unialign`) on the run's held-out split and zero-shot
    sets, written in CLIP_benchmark's format, and compare with the run's own results of the same name."""
    from unialign.results import markdown_rows
    from unialign_train.benchmark import benchmark, compare

    files = benchmark(run_dir, out, dataset, dataset_root, batch_size, log=typer.echo)
    typer.echo(f"{len(files)} CLIP_benchmark result file(s): " + ", ".join(str(p) for p in files))
    rows = compare(files, run_dir / "results")
    if rows:
        typer.echo(markdown_rows(["file", "metric", "CLIP_benchmark", "unialign", "|difference|"], rows))
