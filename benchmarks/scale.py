"""Scale benchmarks: extraction executors, training on stores larger than RAM, evaluation at large N.

    python3 benchmarks/scale.py extract [--n 1000] [--repeats 2]        # local vs Ray executor
    python3 benchmarks/scale.py train --root /tmp --sizes 100k,1m,10m   # synthetic stores, pairs/s, peak RSS
    python3 benchmarks/scale.py eval --sizes 100k,1m                    # zero-shot / retrieval time

``extract`` writes benchmarks/results/extract_ray.{json,md}; ``train`` and ``eval`` write (and merge
into) benchmarks/results/scale.{json,md}. Each training size runs in its own subprocess, so its peak
RSS (``ru_maxrss``) is its own.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import command, machine

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
IMG_DIM, TXT_DIM = 1280, 384
SIZES = {"10k": 10_000, "100k": 100_000, "1m": 1_000_000, "10m": 10_000_000}


# -- extraction -------------------------------------------------------------------------------------
def bench_extract(args: argparse.Namespace) -> None:
    import ray
    import torch

    from unialign.encoders import load_encoder
    from unialign_train.data import Dataset, load_dataset
    from unialign_train.features import extract

    full = load_dataset("emoji")
    ds = Dataset(f"emoji-first{args.n}", full.records[: args.n], full.root)
    spec = "effnet-lite0?image_size=128"
    enc = load_encoder(spec, device="cpu")
    work = Path(tempfile.mkdtemp(prefix="unialign-extract-", dir=args.root))
    t = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray_init_s = time.perf_counter() - t
    kw = dict(shard_size=args.shard_size, batch_size=args.batch_size, show_progress=False)
    runs = []
    for rep in range(args.repeats):
        for executor in ("local", "ray"):
            out = work / f"{executor}{rep}"
            t = time.perf_counter()
            store = extract(ds, enc, out, executor=executor, **kw)
            s = time.perf_counter() - t
            runs.append({"executor": executor, "repeat": rep, "seconds": s, "images_per_s": len(ds) / s, "rows": len(store)})
            print(f"{executor:5s} repeat {rep}: {s:.2f} s, {len(ds) / s:.1f} images/s", flush=True)

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    identical = files(work / "local0") == files(work / "ray0")
    ray.shutdown()
    shutil.rmtree(work)
    best = {e: max(r["images_per_s"] for r in runs if r["executor"] == e) for e in ("local", "ray")}
    mean = {e: float(np.mean([r["images_per_s"] for r in runs if r["executor"] == e])) for e in ("local", "ray")}
    res = {"encoder": spec, "dataset": ds.name, "images": len(ds), "shard_size": args.shard_size, "batch_size": args.batch_size,
           "ray_num_cpus": args.cpus, "torch_threads_local": torch.get_num_threads(), "ray_init_seconds": ray_init_s,
           "runs": runs, "best_images_per_s": best, "mean_images_per_s": mean,
           "ratio_ray_over_local_best": best["ray"] / best["local"], "ratio_ray_over_local_mean": mean["ray"] / mean["local"],
           "goal_ratio": 0.8, "stores_byte_identical": identical, "machine": machine(),
           "command": f"python3 benchmarks/scale.py extract --n {args.n} --repeats {args.repeats} --cpus {args.cpus} "
                      f"--shard-size {args.shard_size} --batch-size {args.batch_size}"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "extract_ray.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [
        "# Extraction: Ray executor vs local executor", "",
        f"`{res['command']}`", "",
        f"{spec} over the first {len(ds)} emoji images, shards of {args.shard_size}, batches of {args.batch_size}; "
        f"Ray started locally with `ray.init(num_cpus={args.cpus})` ({ray_init_s:.1f} s, not counted: it is done once per session/cluster); "
        "each Ray timing includes building the dataset, starting the actors and unpickling the encoder in each. "
        f"Local: one process, {torch.get_num_threads()} torch threads, DataLoader decoding workers. "
        "Ray: actors that each reserve as many CPUs as the driver has torch threads, decoding inside the actor.", "",
        "| executor | repeat | seconds | images/s |", "|---|---|---|---|",
        *[f"| {r['executor']} | {r['repeat']} | {r['seconds']:.2f} | {r['images_per_s']:.1f} |" for r in runs], "",
        f"Best: local {best['local']:.1f} images/s, Ray {best['ray']:.1f} images/s, ratio **{res['ratio_ray_over_local_best']:.2f}** "
        f"(mean ratio {res['ratio_ray_over_local_mean']:.2f}; goal >= 0.8).", "",
        f"Stores byte-identical (every file, manifest included): **{identical}**.", "",
        "The machine has 2 cores shared with other jobs, so timings are noisy; runs alternate local/Ray to spread the noise.",
    ]
    (RESULTS / "extract_ray.md").write_text("\n".join(lines) + "\n")
    print(json.dumps({k: res[k] for k in ("best_images_per_s", "ratio_ray_over_local_best", "stores_byte_identical")}))


# -- synthetic stores and training ------------------------------------------------------------------
SHARD = 65536


def store_dir(root: str, n: int) -> Path:
    return Path(root) / f"unialign-scale-{n}"


def make_store(root: str, n: int) -> Path:
    """Synthetic store: (n, 1280) image and (n, 384) text fp16 shards of 65536 rows (clip-retrieval
    layout). Shards are row-permuted copies of a few random blocks: content does not matter for speed."""
    out = store_dir(root, n)
    done = out / "done.json"
    if done.exists():
        return out
    rng = np.random.default_rng(0)
    blocks = {dim: [rng.standard_normal((SHARD, dim), dtype=np.float32).astype(np.float16) for _ in range(2)]
              for dim in (IMG_DIM, TXT_DIM)}
    for sub, dim in (("img_emb", IMG_DIM), ("text_emb", TXT_DIM)):
        (out / sub).mkdir(parents=True, exist_ok=True)
        for s in range(-(-n // SHARD)):
            rows = min(SHARD, n - s * SHARD)
            block = blocks[dim][s % 2]
            np.save(out / sub / f"{sub}_{s:05d}.npy", np.roll(block, s, axis=0)[:rows])
    done.write_text(json.dumps({"n": n}))
    return out


def train_one(args: argparse.Namespace) -> None:
    """One training run over a synthetic store (run in a subprocess: its ru_maxrss is its own)."""
    import torch

    from unialign_train.align import Pairs, TrainConfig, train
    from unialign_train.features import Features
    from unialign_train.features.store import ShardedArray

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    root = store_dir(args.root, args.n)
    img = ShardedArray(sorted((root / "img_emb").glob("*.npy")), IMG_DIM, np.float16)
    txt = ShardedArray(sorted((root / "text_emb").glob("*.npy")), TXT_DIM, np.float16)
    ar = np.arange(args.n, dtype=np.int64)
    off = np.arange(args.n + 1, dtype=np.int64)
    pairs = Pairs(x_flat=ar, x_offsets=off, y_flat=ar, y_offsets=off, groups=ar)
    cfg = TrainConfig(head="linear", dim=256, batch_size=args.batch, max_steps=args.steps, warmup_steps=10, eval_every=0,
                      sampling=args.sampling, device="cpu")
    res = train(Features([img]), Features([txt]), pairs, cfg, log=None)
    total = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"n": args.n, "sampling": args.sampling, "batch": args.batch, "steps": res.steps,
                      "train_seconds": res.seconds, "pairs_per_s": res.steps * args.batch / res.seconds,
                      "setup_seconds": total - res.seconds, "peak_rss_bytes": rss}))


def bench_train(args: argparse.Namespace) -> list[dict]:
    out = []
    free = shutil.disk_usage(args.root).free
    for name in args.sizes.split(","):
        n = SIZES[name]
        need = n * (IMG_DIM + TXT_DIM) * 2
        if not store_dir(args.root, n).joinpath("done.json").exists() and need > free - (5 << 30):
            print(f"{name}: needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free on {args.root}: skipped", flush=True)
            out.append({"size": name, "n": n, "skipped": f"disk: needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"})
            continue
        t = time.perf_counter()
        subprocess.run([sys.executable, __file__, "_make", "--root", args.root, "--n", str(n)], check=True)
        make_s = time.perf_counter() - t
        for sampling in args.sampling.split(","):
            cmd = [sys.executable, __file__, "_train", "--root", args.root, "--n", str(n), "--steps", str(args.steps),
                   "--batch", str(args.batch), "--sampling", sampling, "--threads", str(args.threads)]
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            r.update(size=name, store_bytes=need, store_write_seconds=make_s)
            print(json.dumps(r), flush=True)
            out.append(r)
        if args.cleanup:
            shutil.rmtree(store_dir(args.root, n))
    return out


def bench_eval(args: argparse.Namespace) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from unialign.search import build_index, topk
    from unialign_train.evaluate import zero_shot_scores

    torch.set_num_threads(args.threads)
    out = []
    for name in args.sizes.split(","):
        n = SIZES[name]
        g = torch.Generator().manual_seed(0)
        emb = F.normalize(torch.randn(n, 256, generator=g), dim=-1)
        classes = F.normalize(torch.randn(1000, 256, generator=g), dim=-1)
        labels = torch.randint(0, 1000, (n,), generator=g)
        t = time.perf_counter()
        zero_shot_scores(emb, classes, labels)
        zs = time.perf_counter() - t
        q = min(n, args.queries)  # retrieval: q text queries against all n images, scaled to n queries
        keys = F.normalize(emb + 0.5 * torch.randn(n, 256, generator=g), dim=-1)
        t = time.perf_counter()
        exact = topk(emb[:q], keys, 10)[1]
        ex_s = time.perf_counter() - t
        t = time.perf_counter()
        index, _ = build_index(keys, "ivf", nlist=int(np.sqrt(n)), nprobe=16)
        ivf = topk(emb[:q], None, 10, index=index)[1]
        ivf_s = time.perf_counter() - t
        recall = float((ivf[:, :1] == exact[:, :1]).float().mean())
        r = {"size": name, "n": n, "zero_shot_1000_classes_seconds": zs, "retrieval_queries_timed": q,
             "retrieval_exact_seconds_measured": ex_s, "retrieval_exact_seconds_full_estimate": 2 * ex_s * n / q,
             "retrieval_faiss_ivf_seconds_incl_build": ivf_s, "faiss_ivf_top1_agreement_with_exact": recall}
        print(json.dumps(r), flush=True)
        out.append(r)
    return out


def write_scale(part: str, rows: list[dict], command: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    jpath = RESULTS / "scale.json"
    data = json.loads(jpath.read_text()) if jpath.exists() else {}
    data[part] = {"rows": rows, "command": command, "machine": machine()}
    jpath.write_text(json.dumps(data, indent=2) + "\n")
    lines = ["# Scale benchmarks", ""]
    if "train" in data:
        d = data["train"]
        lines += ["## Training on synthetic stores (1280-d image + 384-d text, fp16, memory-mapped)", "", f"`{d['command']}`", "",
                  "| size | sampling | batch | steps | pairs/s | peak RSS (GiB) | store (GiB) |", "|---|---|---|---|---|---|---|"]
        for r in d["rows"]:
            if "skipped" in r:
                lines.append(f"| {r['size']} | - | - | - | skipped: {r['skipped']} | - | - |")
            else:
                lines.append(f"| {r['size']} | {r['sampling']} | {r['batch']} | {r['steps']} | {r['pairs_per_s']:.0f} | "
                             f"{r['peak_rss_bytes'] / 2**30:.2f} | {r['store_bytes'] / 2**30:.1f} |")
        lines.append("")
    if "eval" in data:
        d = data["eval"]
        lines += ["## Evaluation at large N (256-d embeddings)", "", f"`{d['command']}`", "",
                  "| size | zero-shot, 1000 classes (s) | exact retrieval, timed queries | measured (s) | est. full both directions (s) | FAISS IVF incl. build (s) | IVF top-1 = exact |",
                  "|---|---|---|---|---|---|---|"]
        for r in d["rows"]:
            lines.append(f"| {r['size']} | {r['zero_shot_1000_classes_seconds']:.1f} | {r['retrieval_queries_timed']} | "
                         f"{r['retrieval_exact_seconds_measured']:.1f} | {r['retrieval_exact_seconds_full_estimate']:.0f} | "
                         f"{r['retrieval_faiss_ivf_seconds_incl_build']:.1f} | {r['faiss_ivf_top1_agreement_with_exact']:.3f} |")
        lines.append("")
    lines.append("Machine: 2 CPU cores shared with other jobs (load average often > 10), no GPU: absolute numbers are noisy.")
    (RESULTS / "scale.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cmd", choices=["extract", "train", "eval", "_make", "_train"])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--shard-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--root", default="/tmp")
    p.add_argument("--sizes", default="100k,1m,10m")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--sampling", default="chunked")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--queries", type=int, default=10000)
    p.add_argument("--cleanup", action="store_true", help="delete each synthetic store after its runs")
    a = p.parse_args()
    cmd = command("scale.py")
    if a.cmd == "extract":
        bench_extract(a)
    elif a.cmd == "_make":
        make_store(a.root, a.n)
    elif a.cmd == "_train":
        train_one(a)
    elif a.cmd == "train":
        write_scale("train", bench_train(a), cmd)
    else:
        write_scale("eval", bench_eval(a), cmd)


if __name__ == "__main__":
    main()
