"""``unialign fuse``: supervised fusion heads on frozen encoders (``train``) and image-text consistency
detection (``consistency``). Parses options, calls :mod:`unialign_train.fuse`, prints the tables and
writes them (JSON + Markdown) to ``--out``."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .common import ConfigArg, SetOpt, load_run_config, overrides

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fusion heads over frozen encoders, and image-text consistency (manipulated pairs).")

ParamOpt = typer.Option(None, "--param", help="A fusion setting: --param width=128 (see FuseConfig: width, depth, "
                                              "epochs, lr, modality_dropout, merge, ...).")


def fuse_config(params: list[str] | None, **direct: object):
    from unialign.errors import ConfigError
    from pydantic import ValidationError

    from unialign_train.fuse import FuseConfig
    from unialign_train.validate import describe

    try:
        return FuseConfig(**{**overrides(params), **direct})
    except ValidationError as e:
        raise ConfigError(describe(e, "--param")) from None


@app.command("train")
def train_command(
    config: ConfigArg = None,
    target: str = typer.Option("category", help="The record field to predict (emoji: category, subcategory)."),
    kind: str = typer.Option("classification", help="classification or regression (a numeric field)."),
    methods: str = typer.Option("late,concat,manager,bridge,lego", help="Comma-separated method families: late "
                                "(unimodal heads + late fusion), concat, manager, bridge, lego."),
    seeds: int = typer.Option(1, min=1, help="Training seeds (0 .. seeds-1); tables show mean +- std."),
    out: Path = typer.Option(Path("runs/fuse"), help="Folder for fusion-<target>.json and .md."),
    param: Optional[List[str]] = ParamOpt,
    set_: SetOpt = None,
) -> None:
    """Train every fusion method on a target of the records' metadata; score on held-out concepts, with
    every modality and with each one hidden."""
    from unialign.errors import ConfigError
    from unialign.io import write_json, write_text
    from unialign_train.fuse import METHODS, fusion_table, load_fusion_data, run_methods

    if kind not in ("classification", "regression"):
        raise ConfigError(f"--kind: 'classification' or 'regression', got {kind!r}")
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    if not chosen or set(chosen) - set(METHODS):
        raise ConfigError(f"--methods: choose from {', '.join(METHODS)} (got {methods!r})")
    cfg = load_run_config(config, set_)
    fcfg = fuse_config(param, device=cfg.device)
    tokens = bool(set(chosen) & {"manager", "bridge", "lego"})
    data = load_fusion_data(cfg.data.dataset, target, kind, cfg.data, {m: cfg.encoders[m] for m in cfg.align},
                            cfg.extract, tokens=tokens, device=cfg.device, log=typer.echo)
    rows = []
    for seed in range(seeds):
        rows += run_methods(data, chosen, fcfg.model_copy(update={"seed": seed}), log=typer.echo)
    table = fusion_table(rows, kind)
    name = f"fusion-{target}"
    write_json(out / f"{name}.json", {"target": target, "kind": kind, "config": fcfg.model_dump(), "rows": rows,
                                      "parts": {k: int(len(v)) for k, v in data.parts.items()}})
    write_text(out / f"{name}.md", table + "\n")
    typer.echo(table)
    typer.echo(f"written to {out / name}.json and .md")


@app.command("consistency")
def consistency_command(
    model: Path = typer.Option(Path("runs/default/model"), help="An aligned model folder (the zero-shot detector)."),
    config: ConfigArg = None,
    seeds: int = typer.Option(1, min=0, help="HAMMER-lite training seeds (0: the zero-shot detector only)."),
    save_calibration: bool = typer.Option(False, "--save-calibration", help="Write the fitted match calibration "
                                          "into the model folder (what AlignedModel.match and /match use)."),
    out: Path = typer.Option(Path("runs/consistency"), help="Folder for consistency.json and .md."),
    param: Optional[List[str]] = ParamOpt,
    set_: SetOpt = None,
) -> None:
    """Detect manipulated image-text pairs (text swap, attribute swap, image swap) of held-out concepts
    and ground the manipulated words: zero-shot from the aligned space, and a trained HAMMER-lite head."""
    from unialign.io import write_json, write_text
    from unialign.model import AlignedModel
    from unialign_train.fuse import consistency_by_type, consistency_table, load_pairs, run_consistency

    cfg = load_run_config(config, set_)
    fcfg = fuse_config(param, device=cfg.device)
    aligned = AlignedModel.from_pretrained(model, device=cfg.device)
    pairs, cached = load_pairs(aligned, cfg.data.dataset, cfg.data, cfg.encoders, cfg.extract, device=cfg.device,
                               log=typer.echo)
    result = run_consistency(aligned, pairs, cached, list(range(seeds)), fcfg, calibrate=save_calibration, log=typer.echo)
    tables = consistency_table(result["results"]) + "\n\n" + consistency_by_type(result["results"])
    write_json(out / "consistency.json", {"model": str(model), "config": fcfg.model_dump(), **result})
    write_text(out / "consistency.md", tables + "\n")
    typer.echo(tables)
    if save_calibration:
        aligned.save_pretrained(model)
        typer.echo(f"match calibration {aligned.info['match']} saved in {model}")
