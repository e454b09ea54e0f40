"""``unialign index`` and ``unialign serve``: thin command-line layers over :mod:`.index` and :mod:`.app`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def index_command(
    model: Path = typer.Option(..., help="A saved model folder (from `unialign run` / `unialign train`)."),
    images: str = typer.Option(..., help="What to index: an image folder (flat or one subfolder per class), "
                                         "a .csv/.jsonl/.parquet table, or a dataset name such as emoji."),
    out: Path = typer.Option(..., help="Index folder to write (image.index, metadata/, img_emb/, index.json: "
                                      "clip-retrieval's layout, so its tools read it too)."),
    kind: str = typer.Option("auto", help="flat (exact), hnsw, ivf, or auto: flat below --threshold vectors, hnsw above."),
    threshold: int = typer.Option(100_000, min=1, help="Size from which kind=auto switches from exact to HNSW."),
    styles: Optional[str] = typer.Option(None, help="Comma-separated styles to keep (e.g. apple for emoji)."),
    limit: Optional[int] = typer.Option(None, min=1, help="Index only the first N items."),
    store: Optional[Path] = typer.Option(None, help="Feature store folder (default: under $UNIALIGN_HOME/features)."),
    batch_size: int = typer.Option(64, min=1),
    workers: Optional[int] = typer.Option(None, min=0, help="Image decoding workers (default: cores - 1, at most 4)."),
    embeddings: bool = typer.Option(True, help="Also write the vectors as img_emb/img_emb_0.npy (for clip-retrieval "
                                               "index, autofaiss, embedding-reader); they are inside image.index too."),
    overwrite: bool = typer.Option(False, help="Write into --out even if it holds something other than an index."),
) -> None:
    """Embed an image collection with a model's image side into a searchable FAISS index (resumable)."""
    from unialign.search import INDEX_KINDS as KINDS
    from unialign_serve.index import build_index

    if kind not in KINDS:
        raise typer.BadParameter(f"--kind must be one of {list(KINDS)}, got {kind!r}")
    idx = build_index(model, images, out, kind=kind, threshold=threshold, store=store,
                      styles=[s.strip() for s in styles.split(",") if s.strip()] if styles else None, limit=limit,
                      batch_size=batch_size, num_workers=workers, embeddings=embeddings, overwrite=overwrite,
                      log=typer.echo)
    c = idx.info["counts"]
    typer.echo(f"index ready: {out} ({c['indexed']} images, {c['skipped']} skipped, {idx.info['index']['kind']}); "
               f"serve it with: unialign serve --model {model} --index {out}")


def serve_command(
    model: Path = typer.Option(..., help="A saved model folder."),
    index: Optional[Path] = typer.Option(None, help="An index folder built by `unialign index` (enables search)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; the default serves this machine only."),
    port: int = typer.Option(8000, min=0, max=65535),
    device: str = typer.Option("auto", help="auto, cpu, cuda, ..."),
    max_upload_mb: float = typer.Option(8.0, min=0.01, help="Largest request body / uploaded file, in MiB."),
    max_pixels: int = typer.Option(4096 * 4096, min=1, help="Largest uploaded image, in pixels (width x height)."),
    max_batch: int = typer.Option(64, min=1, help="Most texts or images in one embed request."),
    max_k: int = typer.Option(100, min=1, help="Most results of one search."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
) -> None:
    """Serve the model (and index) over HTTP: embed, classify, search, and a web page at /."""
    import uvicorn

    from unialign_serve.app import Limits, create_app

    limits = Limits(max_upload_bytes=int(max_upload_mb * 2**20), max_image_pixels=max_pixels, max_batch=max_batch,
                    max_k=max_k)
    app = create_app(model, index, limits, device=None if device == "auto" else device)
    typer.echo(f"serving {model}{f' with index {index}' if index else ''} on http://{host}:{port}/ (API docs at /docs)")
    uvicorn.run(app, host=host, port=port, log_level=log_level)
