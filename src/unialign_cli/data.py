"""``unialign data`` / ``extract``: build or check a dataset; run one encoder into a feature store."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def data_command(
    name: str = typer.Argument(..., help="emoji, fashion-mnist, fashion-mnist:train, fluent-emoji-anim, moving-emoji, "
                                         "gm-notes, spoken, or a table / folder to check."),
    force: bool = typer.Option(False, help="Rebuild even if already built."),
) -> None:
    """Build (or check) a dataset and print a summary."""
    from unialign_train.data import build_emoji, build_fashion_mnist, load_dataset

    if name == "emoji":
        ds = build_emoji(force=force)
    elif name.startswith("fashion-mnist"):
        ds = build_fashion_mnist(name.split(":")[1] if ":" in name else "test", force=force)
    elif name in ("fluent-emoji-anim", "moving-emoji", "gm-notes", "spoken"):
        ds = load_dataset(name, force=force)
    else:
        ds = load_dataset(name)
    counts = ", ".join(f"{len(ds.unique_items(m))} {m}" for m in ds.modalities)
    typer.echo(f"{ds.name}: {len(ds)} records, {len(ds.concepts())} concepts, unique items: {counts}; "
               f"styles {sorted(set(ds.column('style')))}, root {ds.root}")


def extract_command(
    encoder: str = typer.Option(..., help="Encoder spec: effnet-lite0, st:all-MiniLM-L6-v2, hf:<id-or-path>, vectors:<file>, "
                                                 "video:<image spec>, ..."),
    data: str = typer.Option(..., help="Dataset: emoji, fashion-mnist, a .csv/.jsonl/.parquet table, or an image folder."),
    out: Optional[Path] = typer.Option(None, help="Store folder (default: under $UNIALIGN_HOME/features)."),
    layers: str = typer.Option("final", help="Comma-separated layers to store besides 'final' (e.g. block10,block14)."),
    modality: Optional[str] = typer.Option(None, help="Which items of the records to encode (default: the encoder's modality)."),
    batch_size: int = typer.Option(64, min=1),
    shard_size: int = typer.Option(4096, min=1),
    dtype: str = typer.Option("float16", help="float16 or float32."),
    workers: Optional[int] = typer.Option(None, min=0, help="Decoding workers (default: cores - 1, at most 4)."),
    strict: bool = typer.Option(False, help="Stop at the first unreadable item instead of skipping and listing it."),
    overwrite: bool = typer.Option(False, help="Replace a store of other inputs in --out."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, ..."),
    executor: str = typer.Option("local", help="local (this process) or ray (Ray Data actor pool; same store)."),
    concurrency: Optional[int] = typer.Option(None, min=1, help="Ray actors (default: one per GPU, else per CPU)."),
) -> None:
    """Run one frozen encoder over a dataset's items into a resumable, sharded feature store."""
    from unialign.encoders import load_encoder
    from unialign_train.data import load_dataset
    from unialign_train.features import extract

    ds = load_dataset(data)
    enc = load_encoder(encoder, device=device)
    store = extract(ds, enc, out, layers=[l for l in layers.split(",") if l], batch_size=batch_size, shard_size=shard_size,
                    dtype=dtype, num_workers=workers, strict=strict, overwrite=overwrite, executor=executor,
                    concurrency=concurrency, modality=modality)
    typer.echo(f"{store.root}: {len(store)} rows x {store.dim} ({store.modality}), layers {store.layers}, "
               f"{len(store.skipped)} skipped")
