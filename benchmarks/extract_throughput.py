"""How fast is the encoder pass, per backend? Items/s of

- ``bare torch``: ``encoder.forward(batch)`` in PyTorch eager over inputs prepared beforehand (image
  tensors decoded before timing; caption batches in item order, tokenised inside ``forward``): the
  reference, ratio 1.00;
- ``bare <backend>``: the same loop on ONNX Runtime / OpenVINO (the runtime's own gain);
- ``extract <backend>``: the full extraction path (decode in DataLoader workers, encode, write fp16
  shards + checksums + manifest; captions batched longest first) into a fresh store;

for the image encoder and the text encoder, on the same items and batch size, alternating the paths
in every repeat and reporting medians (this machine is shared: absolute numbers are noisy, ratios
from alternating runs less so). Exported graphs are made (or loaded from the cache) before timing.

    python3 benchmarks/extract_throughput.py --n-images 512 --n-texts 1024 --repeats 5
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import torch

from _common import command, markdown, write
from unialign.encoders import load_encoder
from unialign_train.data import load_dataset
from unialign_train.features import extract


def bare(encoder: Any, batches: list[Any]) -> float:
    """Items/s of ``forward`` over prepared batches."""
    t0 = time.perf_counter()
    n = 0
    with torch.inference_mode():
        for b in batches:
            encoder.forward(b, ["final"])
            n += len(b)
    return n / (time.perf_counter() - t0)


def pipeline(encoder: Any, ds: Any, modality: str, batch_size: int, workers: int | None) -> float:
    """Items/s of the full extraction path into a fresh store."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        store = extract(ds, encoder, f"{tmp}/store", modality=modality, batch_size=batch_size, shard_size=4096,
                        num_workers=workers, show_progress=False)
        return len(store) / (time.perf_counter() - t0)


def backends(wanted: str) -> list[str]:
    have = {"onnx": "onnxruntime", "openvino": "openvino"}
    return [b for b in wanted.split(",") if b == "torch" or importlib.util.find_spec(have[b]) is not None]


def paths_for(spec: str, ds: Any, modality: str, batches: list[Any], names: list[str], batch_size: int,
              workers: int | None, int8: bool) -> dict[str, Callable[[], float]]:
    """Each timed path as a zero-argument callable, the encoders loaded and warmed up (graphs exported)."""
    paths: dict[str, Callable[[], float]] = {}
    variants = [(b, "none") for b in names] + ([("onnx", "int8")] if int8 else [])
    for backend, quantize in variants:
        enc = load_encoder(spec, device="cpu", backend=backend, quantize=quantize)
        enc.forward(batches[0], ["final"])  # export / load the graph, create the session
        tag = backend + (" int8" if quantize != "none" else "")
        paths[f"bare {tag}"] = lambda e=enc: bare(e, batches)
        paths[f"extract {tag}"] = lambda e=enc: pipeline(e, ds, modality, batch_size, workers)
    return paths


def measure(paths: dict[str, Callable[[], float]], repeats: int, label: str) -> dict[str, list[float]]:
    runs: dict[str, list[float]] = {k: [] for k in paths}
    for r in range(repeats):
        for k, run in paths.items():  # alternating: every path once per repeat
            runs[k].append(run())
        print(f"{label} repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}/s" for k, v in runs.items()), file=sys.stderr)
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-encoder", default="effnet-lite0?image_size=128")
    ap.add_argument("--text-encoder", default="st:all-MiniLM-L6-v2")
    ap.add_argument("--n-images", type=int, default=512)
    ap.add_argument("--n-texts", type=int, default=1024, help="about this many distinct captions")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", type=int, default=None, help="decoding workers (default: cores - 1, at most 4)")
    ap.add_argument("--backends", default="torch,onnx,openvino", help="those installed are run")
    ap.add_argument("--no-int8", action="store_true", help="leave out the int8 text encoder")
    args = ap.parse_args()

    names = backends(args.backends)
    emoji = load_dataset("emoji")
    imgs = emoji.subset(range(args.n_images), name=f"emoji-first{args.n_images}")
    img_enc = load_encoder(args.image_encoder, device="cpu", backend="torch")
    prep = img_enc.loader()
    tensors = torch.stack([prep(imgs.path(i)) for i in range(len(imgs))])
    img_batches = [tensors[s : s + args.batch_size] for s in range(0, len(tensors), args.batch_size)]

    # records from the start of the dataset until about n_texts distinct captions: item order, as stored
    seen: set[str] = set()
    stop = 0
    while stop < len(emoji) and len(seen) < args.n_texts:
        seen.update(emoji.records[stop]["text"])
        stop += 1
    txts = emoji.subset(range(stop), name=f"emoji-first{stop}-captions")
    captions = txts.unique_items("text")
    txt_batches = [captions[s : s + args.batch_size] for s in range(0, len(captions), args.batch_size)]

    results: dict[str, Any] = {}
    rows = []
    for label, spec, ds, modality, batches, int8 in (
            ("image", args.image_encoder, imgs, "image", img_batches, False),
            ("text", args.text_encoder, txts, "text", txt_batches, not args.no_int8)):
        paths = paths_for(spec, ds, modality, batches, names, args.batch_size, args.workers, int8)
        runs = measure(paths, args.repeats, label)
        med = {k: statistics.median(v) for k, v in runs.items()}
        ref = med["bare torch"]
        results[label] = {"encoder": spec, "items": len(ds.unique_items(modality)), "runs": runs, "median": med,
                          "ratio": {k: med[k] / ref for k in med}}
        rows += [[f"{label}: {spec}", k, f"{med[k]:.1f}", f"{med[k] / ref:.2f}", ", ".join(f"{x:.1f}" for x in runs[k])]
                 for k in runs]
    table = markdown(["encoder", "path", "median items/s", "ratio to bare torch forward", "runs (items/s)"], rows)
    write("extract_throughput", {"batch_size": args.batch_size, "repeats": args.repeats, "backends": names,
                                 "workers": args.workers, **results}, table, command("extract_throughput.py").strip())


if __name__ == "__main__":
    main()
