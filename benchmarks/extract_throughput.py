"""Is the encoder the limit of extraction? Images/s of the full extraction path (decode in DataLoader
workers, encode, write fp16 shards + checksums + manifest) vs a bare ``encoder.forward(batch)`` loop over
tensors decoded beforehand: same encoder, batch size and images, in the same run, alternating the two
and reporting medians (this machine is shared, so absolute numbers are noisy; the ratio is the claim).

    python3 benchmarks/extract_throughput.py --n 512 --repeats 3
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch

from _common import command, markdown, write
from unialign.encoders import load_encoder
from unialign_train.data import load_dataset
from unialign_train.features import extract


def bare(encoder, tensors: torch.Tensor, batch_size: int) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(tensors), batch_size):
            encoder.forward(tensors[s : s + batch_size], ["final"])
    return len(tensors) / (time.perf_counter() - t0)


def pipeline(encoder, ds, batch_size: int, workers: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        extract(ds, encoder, f"{tmp}/store", batch_size=batch_size, shard_size=4096, num_workers=workers, show_progress=False)
        return len(ds) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--encoder", default="effnet-lite0?image_size=128")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", default="0,1", help="DataLoader worker counts to try")
    args = ap.parse_args()

    ds = load_dataset("emoji")
    ds = ds.subset(range(args.n), name=f"emoji-first{args.n}")
    enc = load_encoder(args.encoder)
    prep = enc.loader()
    tensors = torch.stack([prep(ds.path(i)) for i in range(len(ds))])
    bare(enc, tensors[: args.batch_size], args.batch_size)  # warm-up
    workers = [int(w) for w in args.workers.split(",")]
    runs: dict[str, list[float]] = {"bare": [], **{f"pipeline_w{w}": [] for w in workers}}
    for r in range(args.repeats):
        runs["bare"].append(bare(enc, tensors, args.batch_size))
        for w in workers:
            runs[f"pipeline_w{w}"].append(pipeline(enc, ds, args.batch_size, w))
        print(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} img/s" for k, v in runs.items()), file=sys.stderr)
    med = {k: statistics.median(v) for k, v in runs.items()}
    rows = [[k, f"{med[k]:.1f}", f"{med[k] / med['bare']:.2f}", ", ".join(f"{x:.1f}" for x in runs[k])] for k in runs]
    table = markdown(["path", "median img/s", "ratio to bare forward", "runs (img/s)"], rows)
    cmd = command("extract_throughput.py")
    write("extract_throughput", {"encoder": enc.spec, "n": args.n, "batch_size": args.batch_size, "runs": runs,
                                 "median": med, "ratio": {k: med[k] / med["bare"] for k in med}}, table, cmd.strip())


if __name__ == "__main__":
    main()
