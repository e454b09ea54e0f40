"""``unialign curate``: a concept-rich training subset of a dataset for target concepts (Freeze-Align)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .common import load_run_config


def curate_command(
    concepts: str = typer.Option(..., help="Target concepts: a text file (one class name a line) or a dataset spec "
                                 "with classes, e.g. fashion-mnist."),
    budget: int = typer.Option(..., help="Number of pairs to keep."),
    out: Path = typer.Option(..., help="Subset Parquet to write (its `row` column: dataset record indices); a "
                             "<out>.coverage.json report goes next to it."),
    data: Optional[str] = typer.Option(None, help="Dataset spec to curate from (default: the config's data.dataset)."),
    config: Optional[Path] = typer.Option(None, help="YAML/TOML config (encoders, split protocol); default built-in."),
    top_k: Optional[int] = typer.Option(None, help="Candidates kept per concept (default 2 x budget / concepts)."),
    prototype: str = typer.Option("text", help="text: class-name prompts vs caption features; media: a few example "
                                  "items per class (concepts dataset) vs the other modality's features."),
    templates: str = typer.Option("photo", help="Prompt template set for text prototypes (photo, emoji, plain)."),
    fill: str = typer.Option("farthest", help="Fill the rest of the budget: farthest, kmeans or none."),
    dedup: Optional[float] = typer.Option(None, help="Remove near-duplicate pairs first (cosine threshold on both "
                                          "modalities, e.g. 0.95)."),
    restrict_train: bool = typer.Option(True, "--restrict-train/--all", help="Pool = the protocol's training split "
                                        "(default) or every record (may pick test concepts)."),
    examples: int = typer.Option(8, help="Example items per concept for --prototype media."),
    min_score: Optional[float] = typer.Option(None, help="Ignore candidates below this cosine to their concept."),
    seed: int = typer.Option(0, help="Seed of the diversity fill and of example draws."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a config field: --set encoders.text=st:..."),
) -> None:
    """Concept-rich subset of a dataset's training pairs for target concepts (Freeze-Align curation);
    train on it with `unialign run --set data.subset=<out>`."""
    from unialign.encoders import load_encoder
    from unialign.errors import ConfigError
    from unialign_train.curate import curate_dataset, report_path
    from unialign_train.curate.dataset import check_options
    from unialign_train.data import load_dataset
    from unialign_train.features import cache_features
    from unialign_train.select.layer_names import resolve_layer_names

    check_options(budget, prototype, fill, dedup)  # before any data or feature is loaded
    cfg = load_run_config(config, set_, **({"data.dataset": data} if data else {}))
    if "text" not in cfg.align:
        raise ConfigError(f"curate needs a text side; align is {list(cfg.align)}")
    media = next(m for m in cfg.align if m != "text")
    encoders = {m: load_encoder(cfg.encoders[m], device=cfg.device) for m in cfg.align}
    layers = {m: resolve_layer_names(encoders[m], cfg.layers_of(m)) for m in cfg.align}
    cached = cache_features(load_dataset(cfg.data.dataset), encoders, layers, cfg.extract, typer.echo)
    dc = curate_dataset(cached, concepts, budget, text_encoder=encoders["text"], media=media, media_encoder=encoders[media],
                        layers=layers, protocol=cfg.data if restrict_train else None, out=out, top_k=top_k,
                        prototype=prototype, templates=templates, fill=fill, dedup=dedup, seed=seed, n_examples=examples,
                        min_score=min_score, log=typer.echo)
    typer.echo(dc.summary())
    typer.echo(f"subset written to {dc.path} (coverage: {report_path(dc.path)}); "
               f"train on it with: unialign run --set data.subset={dc.path}")
