"""``unialign export``: a saved model's text tower as a sentence-transformers folder.

The command only parses options; the work (and the heavy sentence-transformers import) is in
:mod:`unialign_train.export`. What is and is not exported is described there and in docs/interop.md.
"""
from __future__ import annotations

from pathlib import Path

import typer

FORMATS = ("sentence-transformers",)


def export_command(
    model: Path = typer.Option(..., help="A saved unialign model folder."),
    format: str = typer.Option("sentence-transformers", "--format", help="Export format: sentence-transformers."),
    out: Path = typer.Option(..., help="Output folder."),
    no_fold: bool = typer.Option(False, "--no-fold", help="Keep a linear text head as unialign's module instead of a plain Dense."),
) -> None:
    """Export the text tower as a SentenceTransformer folder (encode() = unialign's text embeddings)."""
    from unialign.errors import UnialignError
    from unialign.model import AlignedModel
    from unialign_train.export import export_sentence_transformers

    if format not in FORMATS:
        raise UnialignError(f"export: unknown format {format!r}; accepted: {', '.join(FORMATS)}")
    m = AlignedModel.from_pretrained(model, device="cpu")
    path = export_sentence_transformers(m, out, fold_linear=not no_fold)
    typer.echo(f"text tower exported to {path}: SentenceTransformer({str(path)!r}).encode(texts)")
