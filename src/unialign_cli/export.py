"""``unialign export``: a saved model as a sentence-transformers folder (images and strings in one ``encode``).

The command only parses options; the work (and the heavy sentence-transformers import) is in
:mod:`unialign_train.export`. What is and is not exported is described there and in docs/interop.md.
"""
from __future__ import annotations

import json
from pathlib import Path

import typer

FORMATS = ("sentence-transformers",)


def export_command(
    model: Path = typer.Option(..., help="A saved unialign model folder."),
    format: str = typer.Option("sentence-transformers", "--format", help="Export format: sentence-transformers."),
    out: Path = typer.Option(..., help="Output folder (new or empty)."),
    modalities: str = typer.Option("", "--modalities", help="Sides to export, e.g. 'text' (default: all of them)."),
    no_fold: bool = typer.Option(False, "--no-fold", help="Keep linear heads and maps as unialign's module instead of a plain Dense."),
) -> None:
    """Export the model as a SentenceTransformer folder: encode() takes PIL images and strings."""
    from unialign.errors import UnialignError
    from unialign.model import AlignedModel
    from unialign_train.export import export_sentence_transformers

    if format not in FORMATS:
        raise UnialignError(f"export: unknown format {format!r}; accepted: {', '.join(FORMATS)}")
    m = AlignedModel.from_pretrained(model, device="cpu")
    mods = [s.strip() for s in modalities.split(",") if s.strip()] or None
    path = export_sentence_transformers(m, out, modalities=mods, fold_linear=not no_fold)
    remote = json.loads((path / "unialign_export.json").read_text())["trust_remote_code"]
    flag = ", trust_remote_code=True" if remote else ""
    typer.echo(f"exported to {path}: SentenceTransformer({str(path)!r}{flag}).encode([...]); see {path / 'README.md'}")
