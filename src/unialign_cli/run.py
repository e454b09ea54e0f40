"""``unialign run`` / ``train`` / ``eval`` / ``recipes``: the main job and its two halves."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .common import ConfigArg, OutputOpt, RecipeOpt, SetOpt, load_run_config


def run_command(config: ConfigArg = None, recipe: RecipeOpt = None, output: OutputOpt = None, set_: SetOpt = None) -> None:
    """Build data, extract features (cached), train, evaluate on held-out concepts, save the model."""
    from unialign_train.pipeline import run

    run(load_run_config(config, set_, recipe=recipe, output=output), log=typer.echo)


def train_command(config: ConfigArg = None, recipe: RecipeOpt = None, output: OutputOpt = None, set_: SetOpt = None) -> None:
    """Train (or fit) the projections on the training concepts and save the model, without evaluating."""
    from unialign_train.align.distributed import is_main
    from unialign_train.pipeline import train_model

    cfg = load_run_config(config, set_, recipe=recipe, output=output)
    model, *_ = train_model(cfg, log=typer.echo)
    if is_main():  # under torchrun every rank trains; only rank 0 writes the model
        typer.echo(f"model saved to {model.save_pretrained(Path(cfg.output) / 'model')}")


def eval_command(
    model: Path = typer.Option(..., help="A saved model folder."),
    config: Optional[Path] = typer.Argument(None, help="Config for data/splits/evaluation; default: the one saved with the model."),
    output: Optional[Path] = typer.Option(None, help="Where to write CLIP_benchmark JSON + results.md (default <model>/../results)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a config field."),
) -> None:
    """Evaluate a saved model on the protocol it was made with (held-out concepts, zero-shot sets)."""
    from unialign.io import read_json
    from unialign.results import markdown_table, write_results
    from unialign_train.pipeline import evaluate_saved

    saved: dict = {}
    if config is None and (model / "config.json").exists():  # the protocol the model was made with
        run_cfg = (read_json(model / "config.json").get("info") or {}).get("config") or {}
        saved = {k: run_cfg[k] for k in ("name", "output", "align", "data", "eval", "extract") if k in run_cfg}
    records = evaluate_saved(model, load_run_config(config, set_, saved), typer.echo)
    write_results(output or model.parent / "results", records)
    typer.echo(markdown_table(records))


def recipes_command() -> None:
    """List the named recipes."""
    from unialign_train.align.recipes import RECIPES

    for r in RECIPES.values():
        typer.echo(f"{r.name:14s} {'trained' if r.trained else 'closed-form':11s} {r.description}")
