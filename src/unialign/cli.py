"""The ``unialign`` command: a thin layer over the Python API. It parses options, calls the API and
prints; all logic lives in the library.

Exit codes: 0 success, 1 error (one line saying what is wrong), 2 usage error, 130 interrupted.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any, List, Optional

import typer
import yaml

from .errors import UnialignError


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Align frozen unimodal encoders into one CLIP-style multimodal model on cached features.")


def _overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``--set train.lr=0.01`` -> {"train.lr": 0.01} (values parsed as YAML scalars/lists)."""
    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise typer.BadParameter(f"--set expects key=value, got {p!r}")
        k, v = p.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def _config(config: Optional[Path], sets: list[str] | None, **direct: Any):
    from .config import load_config

    over = _overrides(sets)
    over.update({k: v for k, v in direct.items() if v is not None})
    return load_config(config, over)


# options shared by the commands that take a run configuration
ConfigArg = Annotated[Optional[Path], typer.Argument(help="YAML/TOML config; omit for the built-in default (emoji, EfficientNet-Lite0 + MiniLM).")]
RecipeOpt = Annotated[Optional[str], typer.Option(help="Recipe name (see `unialign recipes`).")]
OutputOpt = Annotated[Optional[str], typer.Option(help="Output folder: <output>/model, <output>/results, logs.")]
SetOpt = Annotated[Optional[List[str]], typer.Option("--set", help="Override a config field: --set train.lr=0.01")]


@app.command()
def run(config: ConfigArg = None, recipe: RecipeOpt = None, output: OutputOpt = None, set_: SetOpt = None) -> None:
    """Build data, extract features (cached), train, evaluate on held-out concepts, save the model."""
    from .pipeline import run as run_job

    cfg = _config(config, set_, recipe=recipe, output=output)
    run_job(cfg)


@app.command()
def train(config: ConfigArg = None, recipe: RecipeOpt = None, output: OutputOpt = None, set_: SetOpt = None) -> None:
    """Train (or fit) the projection on the training concepts and save the model, without evaluating."""
    from .pipeline import train_model

    cfg = _config(config, set_, recipe=recipe, output=output)
    from .align.distributed import is_main

    model, *_ = train_model(cfg)
    if is_main():  # under torchrun every rank trains; only rank 0 writes the model
        path = model.save(Path(cfg.output) / "model")
        typer.echo(f"model saved to {path}")


@app.command("eval")
def evaluate(
    model: Path = typer.Option(..., help="A saved model folder."),
    config: Optional[Path] = typer.Argument(None, help="Config for data/splits/evaluation; default: the protocol saved with the model."),
    output: Optional[Path] = typer.Option(None, help="Where to write CLIP_benchmark JSON + results.md (default <model>/../results)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a config field."),
) -> None:
    """Evaluate a saved model: zero-shot classification and retrieval on held-out concepts, Fashion-MNIST."""
    from .data import load_dataset
    from .evaluate.report import markdown_table, write_results
    from .model import AlignedModel
    from .pipeline import cache_features, evaluate_model, make_splits

    from .config import load_config
    from .io import read_json

    saved: dict[str, Any] = {}
    if config is None and (model / "config.json").exists():  # the data/eval protocol the model was made with
        info = read_json(model / "config.json").get("info") or {}
        for section in ("data", "eval"):
            saved.update({f"{section}.{k}": v for k, v in (info.get(f"{section}_config") or {}).items()})
    cfg = load_config(config, {**saved, **_overrides(set_)})
    m = AlignedModel.load(model, device=cfg.device)
    cfg.encoders.image_layers, cfg.encoders.text_layers = m.image_layers, m.text_layers
    ds = load_dataset(cfg.data.dataset)
    cached = cache_features(ds, m.image_encoder, m.text_encoder, cfg, typer.echo)
    records = evaluate_model(m, cfg, cached, make_splits(ds, cfg), typer.echo)
    write_results(output or model.parent / "results", records)
    typer.echo(markdown_table(records))


@app.command()
def extract(
    encoder: str = typer.Option(..., help="Encoder spec: effnet-lite0, st:all-MiniLM-L6-v2, hf:<id-or-path>, ..."),
    data: str = typer.Option(..., help="Dataset: emoji, fashion-mnist, a .csv/.jsonl/.parquet table, or an image folder."),
    out: Optional[Path] = typer.Option(None, help="Store folder (default: under $UNIALIGN_HOME/features)."),
    layers: str = typer.Option("final", help="Comma-separated layers to store besides 'final' (e.g. block10,block14)."),
    batch_size: int = typer.Option(64, min=1),
    shard_size: int = typer.Option(4096, min=1),
    dtype: str = typer.Option("float16", help="float16 or float32."),
    workers: Optional[int] = typer.Option(None, min=0, help="DataLoader decoding workers (default: cores - 1, at most 4)."),
    strict: bool = typer.Option(False, help="Stop at the first unreadable item instead of skipping and listing it."),
    overwrite: bool = typer.Option(False, help="Replace a store of other inputs in --out."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, ..."),
    executor: str = typer.Option("local", help="local (this process) or ray (Ray Data actor pool; same store)."),
    concurrency: Optional[int] = typer.Option(None, min=1, help="Ray actors (default: one per GPU, else per CPU)."),
) -> None:
    """Run one frozen encoder over a dataset into a resumable, sharded feature store."""
    from .data import load_dataset
    from .encoders import load_encoder
    from .features.extract import extract as run_extract

    ds = load_dataset(data)
    enc = load_encoder(encoder, device=device)
    store = run_extract(ds, enc, out, layers=[l for l in layers.split(",") if l], batch_size=batch_size,
                        shard_size=shard_size, dtype=dtype, num_workers=workers, strict=strict, overwrite=overwrite,
                        executor=executor, concurrency=concurrency)
    typer.echo(f"{store.root}: {len(store)} rows x {store.dim} ({store.modality}), layers {store.layers}, "
               f"{len(store.skipped)} skipped")


@app.command()
def data(
    name: str = typer.Argument(..., help="emoji, fashion-mnist, fashion-mnist:train, or a table / image folder to check."),
    force: bool = typer.Option(False, help="Rebuild even if already built."),
) -> None:
    """Build (or check) a dataset and print a summary."""
    from .data import build_emoji, build_fashion_mnist, load_dataset

    if name == "emoji":
        ds = build_emoji(force=force)
    elif name.startswith("fashion-mnist"):
        ds = build_fashion_mnist(name.split(":")[1] if ":" in name else "test", force=force)
    else:
        ds = load_dataset(name)
    styles = sorted(set(ds.column("style")))
    typer.echo(f"{ds.name}: {len(ds)} records, {len(ds.concepts())} concepts, {len(ds.texts())} unique captions, "
               f"styles {styles}, root {ds.root}")


@app.command()
def recipes() -> None:
    """List the named recipes."""
    from .align.recipes import RECIPES

    for r in RECIPES.values():
        typer.echo(f"{r.name:14s} {'trained' if r.trained else 'closed-form':11s} {r.description}")


# -- commands of the later stages, each defined next to the code it drives --------------------------
# (one line per command: app.command("name")(function))
from .export import export_command  # noqa: E402
from .report import report_command  # noqa: E402

app.command("export")(export_command)
app.command("report")(report_command)
from .serve.commands import index_command, serve_command  # noqa: E402

app.command("index")(index_command)
app.command("serve")(serve_command)

from .curate.command import curate_command  # noqa: E402
app.command("curate")(curate_command)

from .select.command import select_command  # noqa: E402
app.command("select")(select_command)


def main() -> None:
    """Entry point: turn library errors into one line and exit code 1."""
    if not sys.stderr.isatty():  # logs and CI: a progress line every 10 s, not every batch
        os.environ.setdefault("TQDM_MININTERVAL", "10")
    try:
        app(standalone_mode=False)
    except (UnialignError, ValueError, OSError, ArithmeticError) as e:  # + unreadable paths, diverged training
        typer.secho(f"error: {' '.join(str(e).split())}", err=True, fg="red")  # always one line
        sys.exit(1)
    except KeyboardInterrupt:
        typer.secho("interrupted; run the same command again to resume where it stopped", err=True)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # usage errors arrive as click exceptions (typer vendors its own click)
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            sys.exit(e.exit_code)
        if type(e).__name__ == "Abort":
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
