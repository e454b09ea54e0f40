"""Bring your own embeddings: align vectors you already have with a text encoder, without writing an encoder.

Here the "own" vectors are made by any image encoder (EfficientNet-Lite1 by default, a model unialign's
default job does not use) over the emoji images and written the way a user would hand them over: an
``.npy`` of vectors, an ``ids.txt`` of record ids, and a table of captions keyed by the same ids. Then
one config aligns them with MiniLM and ``unialign run`` trains, evaluates (held-out concepts in the
held-out apple style) and saves a model that embeds new vectors and texts.

    python3 examples/own_vectors.py [--encoder effnet-lite1?image_size=128] [--out runs/own-vectors]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from unialign.encoders import load_encoder
from unialign_train.data import load_dataset


def write_vectors(encoder: str, out: Path) -> Path:
    """The user's side: vectors.npy + ids.txt + pairs.parquet; returns the config that aligns them."""
    ds = load_dataset("emoji")
    enc = load_encoder(encoder)
    vecs = enc.encode([ds.path(i) for i in range(len(ds))], batch_size=64, show_progress_bar=True)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "vectors.npy", vecs.astype(np.float32))
    (out / "ids.txt").write_text("\n".join(r["id"] for r in ds.records) + "\n")
    rows = [{"id": r["id"], "caption": json.dumps(r["text"]), "concept": r["concept"], "label": r["label"],
             "style": r["style"]} for r in ds.records]
    pq.write_table(pa.Table.from_pylist(rows), out / "pairs.parquet")
    config = out / "config.yaml"
    config.write_text(f"""# Align your own vectors (one per record id) with a sentence encoder.
name: own-vectors
output: {out / 'run'}
align: [vector, text]
data:
  dataset: {out / 'pairs.parquet'}
  train_styles: [google, twitter, openmoji]
  test_styles: [apple]
encoders:
  vector: vectors:{out / 'vectors.npy'}?ids={out / 'ids.txt'}
  text: st:all-MiniLM-L6-v2
eval:
  zero_shot_sets: {{}}
""")
    return config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", default="effnet-lite1?image_size=128", help="any encoder that makes the 'own' vectors")
    ap.add_argument("--out", type=Path, default=Path("runs/own-vectors"))
    ap.add_argument("--recipe", default="unialign")
    args = ap.parse_args()
    config = write_vectors(args.encoder, args.out)
    print(f"wrote {args.out}/vectors.npy, ids.txt, pairs.parquet and {config}")
    subprocess.run([sys.executable, "-m", "unialign", "run", str(config), "--recipe", args.recipe], check=True)


if __name__ == "__main__":
    main()
