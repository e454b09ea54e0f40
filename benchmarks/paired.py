"""Is recipe A's top-1 really better than recipe B's? A paired test on the same test images.

Two recipes scored on the same 382 test images differ by a few images; an unpaired mean +- std cannot
say whether that is noise. This script fits both (seed 0, the default protocol of
``benchmarks/recipes.py``), records which test images each classifies correctly, and reports
top-1 and top-5: the exact McNemar test on the discordant images and a paired bootstrap 95% interval of the difference.

    python3 benchmarks/paired.py --a unialign --b asif
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np
from scipy.stats import binomtest

from _common import command, markdown, write
from recipes import Bench, quiet
from unialign_train.evaluate import zero_shot_hits, zero_shot_predictions


def correct(bench: Bench, recipe: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Per test image: 1 if the recipe's zero-shot top-1 (top-5) classes hold the right one."""
    cfg = bench.config(recipe, seed)
    model, splits, _, _ = bench.fit(cfg, seed)
    emb, weights, _, labels, _ = zero_shot_predictions(model, bench.cached, splits.test, "image", cfg.eval.templates)
    hit1, hit5 = zero_shot_hits(emb, weights, labels)
    return {"acc1": hit1.numpy().astype(np.int64), "acc5": hit5.numpy().astype(np.int64)}


def compare(a: np.ndarray, b: np.ndarray, n_boot: int = 10000, seed: int = 0) -> dict[str, Any]:
    only_a, only_b = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    idx = np.random.default_rng(seed).integers(0, len(a), (n_boot, len(a)))
    diffs = (a[idx] - b[idx]).mean(1)
    return {"n": len(a), "a": float(a.mean()), "b": float(b.mean()), "only_a": only_a, "only_b": only_b,
            "mcnemar_p": float(p), "diff": float(a.mean() - b.mean()),
            "ci95": [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", default="unialign")
    ap.add_argument("--b", default="asif")
    args = ap.parse_args(argv)
    bench = Bench(fashion=False, log=quiet)
    ca, cb = correct(bench, args.a), correct(bench, args.b)
    res = {m: compare(ca[m], cb[m]) for m in ("acc1", "acc5")}
    table = markdown(["metric", "A", "B", "test images", "A %", "B %", "A - B (95% paired bootstrap)",
                      "only A right", "only B right", "McNemar exact p"],
                     [[m, args.a, args.b, r["n"], f"{100 * r['a']:.1f}", f"{100 * r['b']:.1f}",
                       f"{100 * r['diff']:+.1f} [{100 * r['ci95'][0]:+.1f}, {100 * r['ci95'][1]:+.1f}]",
                       r["only_a"], r["only_b"], f"{r['mcnemar_p']:.3g}"] for m, r in res.items()])
    write(f"paired_{args.a}_vs_{args.b}", res, table, command("paired.py", argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
