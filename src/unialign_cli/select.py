"""``unialign select``: rank (encoder, layer) x (encoder, layer) combinations of two modalities before training.

Thin: parses options, calls :func:`unialign_train.select.select`, prints the ranked table (rich), where
the heatmaps and JSON report went, and the ``unialign run`` command for the best combination.
"""
from pathlib import Path
from typing import Optional

import typer


def select_command(
    images: str = typer.Option(..., "--images", help="Comma-separated encoder specs of the first modality, e.g. "
                               "'effnet-lite0?image_size=128,effnet-lite1?image_size=128' (or audio / vector encoders)."),
    texts: str = typer.Option(..., "--texts", help="Comma-separated encoder specs of the second modality, e.g. "
                              "'st:all-MiniLM-L6-v2,st:/path/to/all-mpnet-base-v2'."),
    data: str = typer.Option("emoji", "--data", help="Dataset: emoji, a .csv/.jsonl/.parquet table, an image folder, ..."),
    layers: str = typer.Option("auto", "--layers", help="auto (final + 4 evenly spaced layers), all, or names "
                               "such as block11,block15,layer3,final (each encoder keeps the names it has)."),
    image_layers: Optional[str] = typer.Option(None, "--image-layers", help="Override --layers for the first encoders."),
    text_layers: Optional[str] = typer.Option(None, "--text-layers", help="Override --layers for the second encoders."),
    sample: int = typer.Option(2000, "--sample", min=8, help="Number of paired items scored (seeded sample)."),
    metrics: str = typer.Option("mutual_knn", "--metrics", help="Comma-separated, the first one ranks: mutual_knn, "
                                "linear_cka, rbf_cka, unbiased_cka, cknna, svcca, probe (SAIL linear probe)."),
    calibrate: bool = typer.Option(False, "--calibrate", help="Rank by score minus its permutation null "
                                   "(shuffled pairs): fair across encoders of different width/depth."),
    n_perm: int = typer.Option(5, "--n-perm", min=1, help="Shuffles per score with --calibrate."),
    k: str = typer.Option("rice", "--k", help="Neighbours for mutual_knn/cknna: 'rice' (ceil(2 n^(1/3))) or an integer."),
    caption: str = typer.Option("first", "--caption", help="Text paired with each image: its first caption, or "
                                "'mean' of all its captions' features."),
    split: str = typer.Option("train", "--split", help="Sample from the protocol's training split (train) or all records (all)."),
    probe_steps: int = typer.Option(300, "--probe-steps", min=1, help="Training steps of the 'probe' metric."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sample, the permutation null and the probe."),
    out: Path = typer.Option(Path("runs/select"), "--out", help="Folder for selection.json and the heatmap PNGs."),
    top: int = typer.Option(20, "--top", min=0, help="Rows of the table to print (0: all)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Extraction batch size."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, ..."),
) -> None:
    """Score every (image encoder, layer) x (text encoder, layer) on a sample of pairs and name the best."""
    import sys

    from rich.console import Console

    import unialign_train.align.probe  # noqa: F401  (registers the "probe" metric)
    from unialign.errors import ConfigError
    from unialign_train.config import load_config
    from unialign_train.select.selection import ranked_table, select

    if k != "rice":
        try:
            k_val: object = int(k)
        except ValueError:
            raise ConfigError(f"--k: expected 'rice' or a positive integer, got {k!r}") from None
    else:
        k_val = k
    protocol = load_config(overrides={"data.dataset": data}).data
    sel = select(images, texts, data, layers=layers, first_layers=image_layers, second_layers=text_layers, sample=sample,
                 metrics=metrics, calibrate=calibrate, n_perm=n_perm, k=k_val, caption=caption, split=split, seed=seed,
                 protocol=protocol, probe_options={"steps": probe_steps}, out=out, device=device, batch_size=batch_size,
                 log=typer.echo)

    console = Console() if sys.stdout.isatty() else Console(width=200)  # piped: do not squeeze to 80 columns
    console.print(ranked_table(sel, top))
    b = sel.best
    typer.echo(f"heatmaps: {', '.join(sel.heatmaps)}")
    typer.echo(f"report: {sel.report}")
    mx, my = sel.modalities
    typer.echo(f"best: {b[mx]} [{b[f'{mx}_layer']}] x {b[my]} [{b[f'{my}_layer']}] "
               f"({sel.primary} = {b['scores'][sel.primary]:.4f}; selection took {sel.timings['total']:.1f}s)")
    typer.echo(f"train it with: {sel.command}")
