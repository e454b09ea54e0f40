"""Options shared by several commands, and turning them into a validated run configuration."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, List, Optional

import typer

ConfigArg = Annotated[Optional[Path], typer.Argument(help="YAML/TOML config merged onto the built-in default "
                                                           "(emoji, EfficientNet-Lite0 + MiniLM); omit for the default.")]
RecipeOpt = Annotated[Optional[str], typer.Option(help="Recipe name (see `unialign recipes`).")]
OutputOpt = Annotated[Optional[str], typer.Option(help="Output folder: <output>/model, <output>/results, logs.")]
SetOpt = Annotated[Optional[List[str]], typer.Option("--set", help="Override a config field: --set train.lr=0.01 "
                                                                   "(values are YAML: lists, numbers, null).")]


def overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``--set train.lr=0.01`` -> {"train.lr": 0.01} (values parsed as YAML scalars, lists or mappings)."""
    import yaml

    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise typer.BadParameter(f"--set expects key=value, got {p!r}")
        k, v = p.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError:
            raise typer.BadParameter(f"--set {k.strip()}: {v!r} is not a valid YAML value") from None
    return out


def load_run_config(config: Optional[Path], sets: list[str] | None, base: dict[str, Any] | None = None, **direct: Any):
    """The run configuration: the default, ``base`` (e.g. the protocol saved with a model), the file,
    ``--set`` overrides, then options given directly (``--recipe``, ``--output``)."""
    from unialign_train.config import load_config

    over = {**(base or {}), **overrides(sets)}
    over.update({k: v for k, v in direct.items() if v is not None})
    return load_config(config, over)
