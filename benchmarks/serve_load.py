"""Bounded load run against `unialign serve` on 127.0.0.1 (it stops by itself).

Starts the server as a subprocess on a free local port (or targets --url), sends a fixed number of
requests (default 2000) from a fixed number of concurrent clients (default 8), a seeded mix of
GET /search (text queries drawn from the index's labels) and POST /classify (an indexed image against
5 candidate labels including its own), and writes latency percentiles, requests/s and error counts to
benchmarks/results/serve_load.{json,md}. Optionally takes screenshots of the web page with Playwright
in Debian's headless Chromium (--screenshots docs/img).

    python3 benchmarks/serve_load.py --model runs/try1/model --index runs/try1/index \
        --requests 2000 --concurrency 8 --screenshots docs/img
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from unialign_serve.index import read_metadata

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, index: str, port: int, threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "unialign", "serve", "--model", model, "--index", index, "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "warning", "--device", "cpu"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            r = httpx.get(url + "/health", timeout=2)
            if r.status_code == 200:
                return r.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server at {url} not ready after {timeout:.0f}s")


def plan(n: int, meta: dict, search_share: float, seed: int) -> list[dict]:
    """The request list, fixed by the seed."""
    rng = random.Random(seed)
    labels = sorted({l for l in meta["label"] if l})
    rows = list(range(len(meta["row"])))
    out = []
    for _ in range(n):
        if rng.random() < search_share:
            out.append({"kind": "search", "q": rng.choice(labels), "k": 12})
        else:
            r = rng.choice(rows)
            own = meta["label"][r]
            cands = [own] + rng.sample([l for l in labels if l != own], 4)
            rng.shuffle(cands)
            out.append({"kind": "classify", "path": meta["path"][r], "labels": cands, "truth": own})
    return out


async def run_load(url: str, reqs: list[dict], concurrency: int) -> tuple[list[dict], float]:
    images: dict[str, bytes] = {}
    queue: asyncio.Queue = asyncio.Queue()
    for i, r in enumerate(reqs):
        queue.put_nowait((i, r))
    results: list[dict] = [{} for _ in reqs]

    async def worker(client: httpx.AsyncClient) -> None:
        while True:
            try:
                i, r = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            t0 = time.perf_counter()
            ok, status, detail = False, None, ""
            try:
                if r["kind"] == "search":
                    resp = await client.get(url + "/search", params={"q": r["q"], "k": r["k"]})
                    status = resp.status_code
                    ok = status == 200 and len(resp.json()["results"]) == r["k"]
                else:
                    data = images.get(r["path"]) or images.setdefault(r["path"], Path(r["path"]).read_bytes())
                    resp = await client.post(url + "/classify", data={"labels": ",".join(r["labels"])},
                                             files={"file": (Path(r["path"]).name, data, "image/png")})
                    status = resp.status_code
                    ok = status == 200
                    if ok:
                        detail = resp.json()["labels"][0]["label"]
                if not ok and not detail:
                    detail = resp.text[:200]
            except Exception as e:  # a failed request is counted, never fatal
                detail = f"{type(e).__name__}: {e}"
            results[i] = {"kind": r["kind"], "ok": ok, "status": status, "ms": (time.perf_counter() - t0) * 1000,
                          "top": detail if ok else None, "error": None if ok else detail}

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return results, time.perf_counter() - t0


def summarise(results: list[dict], reqs: list[dict], wall: float) -> dict:
    def stats(rows: list[dict]) -> dict:
        ms = np.array([r["ms"] for r in rows]) if rows else np.zeros(1)
        return {"requests": len(rows), "errors": sum(not r["ok"] for r in rows),
                "p50_ms": round(float(np.percentile(ms, 50)), 1), "p90_ms": round(float(np.percentile(ms, 90)), 1),
                "p99_ms": round(float(np.percentile(ms, 99)), 1), "max_ms": round(float(ms.max()), 1)}

    out = {"all": {**stats(results), "requests_per_s": round(len(results) / wall, 1), "wall_s": round(wall, 1)}}
    for kind in ("search", "classify"):
        out[kind] = stats([r for r in results if r["kind"] == kind])
    cls = [(r, q) for r, q in zip(results, reqs) if q["kind"] == "classify" and r["ok"]]
    out["classify"]["top1_own_label"] = round(sum(r["top"] == q["truth"] for r, q in cls) / max(1, len(cls)), 3)
    errs = [r["error"] for r in results if not r["ok"]]
    out["first_errors"] = errs[:5]
    return out


def markdown(res: dict) -> str:
    a, cfg = res["summary"]["all"], res["config"]
    lines = [
        "# serve load run",
        "",
        f"`{res['command']}`",
        "",
        f"{cfg['requests']} requests, {cfg['concurrency']} concurrent clients, {int(cfg['search_share'] * 100)}% "
        f"GET /search (k=12) / {100 - int(cfg['search_share'] * 100)}% POST /classify (5 labels), server on 127.0.0.1 "
        f"with {cfg['threads']} torch thread(s), index of {res['index_size']} images; {res['machine']}.",
        "",
        "| requests | errors | requests/s | p50 ms | p90 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in ("all", "search", "classify"):
        s = res["summary"][k]
        rps = a["requests_per_s"] if k == "all" else ""
        lines.append(f"| {k}: {s['requests']} | {s['errors']} | {rps} | {s['p50_ms']} | {s['p90_ms']} | {s['p99_ms']} | {s['max_ms']} |")
    lines += ["", f"Classification: the image's own label ranked first in {res['summary']['classify']['top1_own_label']:.1%} "
                  "of /classify requests (5 candidates; images seen in training or held out).", ""]
    return "\n".join(lines)


def screenshots(url: str, folder: Path, query: str, image: str, labels: str) -> list[str]:
    from playwright.sync_api import sync_playwright

    folder.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1100, "height": 820}, device_scale_factor=1)
        page.set_default_timeout(60_000)
        page.goto(url + "/")
        page.wait_for_selector("body[data-ready='1']")
        page.fill("#query", query)
        page.select_option("#k", "12")
        page.click("#search-button")
        page.wait_for_function("() => document.querySelectorAll('#results .tile').length > 0")
        page.wait_for_function("() => [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")
        page.locator("#search-card").screenshot(path=str(folder / "serve_search.png"))
        page.set_input_files("#file", image)
        page.fill("#labels", labels)
        page.click("#classify-button")
        page.wait_for_function("() => document.querySelectorAll('#ranking li').length > 0")
        page.wait_for_timeout(300)
        page.locator("#classify-card").screenshot(path=str(folder / "serve_classify.png"))
        browser.close()
    return [str(folder / "serve_search.png"), str(folder / "serve_classify.png")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/try1/model")
    ap.add_argument("--index", default="runs/try1/index")
    ap.add_argument("--url", default=None, help="Target a server already running on 127.0.0.1 instead of starting one.")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--search-share", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=1, help="Torch threads of the started server.")
    ap.add_argument("--warmup", type=int, default=20, help="Requests sent first and not counted.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--screenshots", default=None, help="Folder for serve_search.png / serve_classify.png.")
    args = ap.parse_args()

    proc = None
    if args.url:
        if not args.url.startswith(("http://127.0.0.1", "http://localhost")):
            raise SystemExit("--url must point at 127.0.0.1 (this benchmark only loads a local server)")
        url = args.url.rstrip("/")
    else:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(args.model, args.index, port, args.threads)
    try:
        t0 = time.time()
        health = wait_ready(url, proc)
        print(f"server ready in {time.time() - t0:.1f}s: {health['model']['image_encoder']} + "
              f"{health['model']['text_encoder']}, {health['index']['size']} images", flush=True)
        idx_dir = Path(health["index"]["dir"])
        table = read_metadata(idx_dir)
        meta = {"row": table.column("row").to_pylist(), "path": table.column("image_path").to_pylist(),
                "label": table.column("label").to_pylist()}
        warm = plan(args.warmup, meta, args.search_share, args.seed + 1)
        asyncio.run(run_load(url, warm, args.concurrency))
        reqs = plan(args.requests, meta, args.search_share, args.seed)
        results, wall = asyncio.run(run_load(url, reqs, args.concurrency))
        summary = summarise(results, reqs, wall)
        shots = []
        if args.screenshots:
            i = meta["label"].index("cat face") if "cat face" in meta["label"] else 0
            cat = next((p for p, l in zip(meta["path"], meta["label"]) if l == "cat face" and "/google-" in p), meta["path"][i])
            shots = screenshots(url, Path(args.screenshots), "a red heart", cat,
                                "cat face, dog face, rocket, red heart, pizza, ghost")
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()

    cmd = "python3 benchmarks/serve_load.py " + " ".join(sys.argv[1:])
    res = {
        "command": cmd.strip(),
        "config": {k: getattr(args, k) for k in ("model", "index", "requests", "concurrency", "search_share", "threads",
                                                 "warmup", "seed")},
        "index_size": health["index"]["size"],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores visible (shared), CPU inference, Python {platform.python_version()}",
        "summary": summary,
        "screenshots": shots,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_load.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "serve_load.md").write_text(markdown(res))
    print(markdown(res))
    if summary["all"]["errors"]:
        raise SystemExit(f"{summary['all']['errors']} request(s) failed; first: {summary['first_errors']}")


if __name__ == "__main__":
    main()
