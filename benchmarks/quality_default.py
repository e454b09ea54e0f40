"""The quality default (issue 15) on the test split, touched once after the choice on validation.

Scores the new default, the earlier defaults and ASIF on the public protocol (382 unseen concepts in
the unseen apple style; Fashion-MNIST zero-shot) on the full and the low-data (200 training concepts)
training sets; a paired test (exact McNemar on the discordant test images, paired bootstrap 95%
interval; ``benchmarks/paired.py``; top-1, top-5 and Fashion-MNIST top-1) of the new default against each
earlier default and against ASIF;
and the ablation: each ingredient of the new default removed one at a time.

    python3 benchmarks/quality_default.py

Writes ``benchmarks/results/quality_default.{json,md}``. Configurations are named in ``CONFIGS``.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np
import torch

from _common import command, markdown, write
from paired import compare
from quality_validation import LayerBench
from unialign_train.evaluate import zero_shot_hits, zero_shot_predictions
from unialign_train.select import resolve_layer_names

# name -> (image size, image layers, recipe, overrides of the run config: the recipe's settings by name,
# other sections dotted; "encoders.text" picks the bench's text encoder)
LAYERS = "last-8,shallow-3"  # the new default's image layers; every store holds them (and so every configuration's)
NEW = (224, LAYERS, "unialign-wide", {})
CONFIGS: dict[str, tuple[int, str, str, dict[str, Any]]] = {
    "new default (224 px, last-8 + shallow-3 balanced, final x2, unialign-wide)": NEW,
    "previous default (224 px, last-8 balanced, final x2, unialign-wide)": (224, "last-8", "unialign-wide", {}),
    "second-round default (224 px, last-8 balanced, final x2, unialign)": (224, "last-8", "unialign", {}),
    "first-round default (224 px, last-4 raw layers, unialign)": (224, "last-4", "unialign", {"layer_weights": None}),
    "first default (128 px, final layer, unialign)": (128, "final", "unialign", {}),
    "ASIF (128 px, final layer; k=800, p=8, centred)": (128, "final", "asif", {}),
}
# each ingredient of the new default removed one at a time, and options it does not use
ABLATIONS: dict[str, tuple[int, str, str, dict[str, Any]]] = {
    "- 224 px (128 px)": (128, LAYERS, "unialign-wide", {}),
    "- shallow layers (last-8)": (224, "last-8", "unialign-wide", {}),
    "- deep layers (final and shallow-3)": (224, "final,shallow-3", "unialign-wide", {}),
    "- extra layers (final only)": (224, "final", "unialign-wide", {}),
    "- layer balancing (raw concatenation)": (224, LAYERS, "unialign-wide", {"layer_weights": None}),
    "- final x2 (balanced, equal weights)": (224, LAYERS, "unialign-wide", {"layer_weights": {}}),
    "- nuisance rank 64 (unialign's 32)": (224, LAYERS, "unialign", {}),
    "- nuisance removal (rank 0)": (224, LAYERS, "unialign-wide", {"nuisance_rank": 0}),
    "- sparsify and sharpen (k=all, p=1)": (224, LAYERS, "unialign-wide", {"k": None, "p": 1.0}),
    "- centring": (224, LAYERS, "unialign-wide", {"center": False}),
    "+ concept prototypes (option)": (224, LAYERS, "unialign-wide", {"prototypes": True}),
    "option: all-mpnet-base-v2 text encoder": (224, LAYERS, "unialign-wide",
                                               {"encoders.text": "st:all-mpnet-base-v2"}),
    "CSA on the same features": (224, LAYERS, "csa", {}),
}
PAIRED = ("acc1", "acc5", "fmnist_acc1")  # paired per test image: 382 emoji, 10,000 Fashion-MNIST
GOALS = {"acc1": 0.22, "acc5": 0.50, "low_acc1": 0.10, "fmnist_acc1": 0.50}


def hits(bench: LayerBench, recipe: str, overrides: dict[str, Any]) -> dict[str, np.ndarray]:
    """Per-image top-1 / top-5 hits on the emoji test split and top-1 on Fashion-MNIST, for the paired tests.
    ``Bench.run`` returns only the aggregates, so the (deterministic, closed-form) fit is made again here."""
    cfg = bench.config(recipe, 0, None, overrides)
    model, splits, _, _ = bench.fit(cfg, 0)
    emb, weights, _, labels, kept = zero_shot_predictions(model, bench.cached, splits.test, "image", cfg.eval.templates)
    h1, h5 = zero_shot_hits(emb, weights, labels)
    out = {"acc1": h1.numpy().astype(np.int64), "acc5": h5.numpy().astype(np.int64), "records": kept}
    fm, fc = bench.fm
    emb, weights, _, labels, _ = zero_shot_predictions(model, fc, np.arange(len(fm)), "image",
                                                       cfg.eval.zero_shot_sets["fashion-mnist"].templates)
    out["fmnist_acc1"] = zero_shot_hits(emb, weights, labels)[0].numpy().astype(np.int64)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["main", "ablation"], default="main",
                    help="main: the configurations of CONFIGS (full, low data, paired tests); ablation: full data only")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    benches: dict[tuple[int, str | None], LayerBench] = {}
    configs = CONFIGS if args.part == "main" else ABLATIONS
    rows, correct = [], {}
    for name, (size, layers, recipe, ov) in configs.items():
        ov = dict(ov)
        text = ov.pop("encoders.text", None)
        if (size, text) not in benches:
            benches[size, text] = LayerBench(size, fashion=True, text=text, store=LAYERS)
        b = benches[size, text]
        b.use_layers(resolve_layer_names(b.image_encoder, layers))
        full = b.run(recipe, 0, None, ov)
        row = {"config": name, "size": size, "layers": b.layers["image"], "recipe": recipe, "overrides": ov,
               **{k: full[k] for k in ("acc1", "acc5", "r10", "fmnist_acc1", "train_seconds")}}
        if args.part == "main":
            low = b.run(recipe, 0, 200, ov)
            row.update(low_acc1=low["acc1"], low_acc5=low["acc5"], low_fmnist_acc1=low["fmnist_acc1"])
        if name in CONFIGS:
            correct[name] = hits(b, recipe, ov)
        print(f"{name:60s} acc1 {100 * row['acc1']:.2f} acc5 {100 * row['acc5']:.2f} fmnist {100 * row['fmnist_acc1']:.2f} "
              f"low acc1 {100 * row.get('low_acc1', float('nan')):.2f}", flush=True)
        rows.append(row)
    new = list(CONFIGS)[0]
    paired = {}
    for other in list(CONFIGS)[1:] if args.part == "main" else []:
        assert np.array_equal(correct[new]["records"], correct[other]["records"])  # the same test images, same order
        paired[other] = {m: compare(correct[new][m], correct[other][m]) for m in PAIRED}
    table = render(rows, paired, new) if args.part == "main" else render_ablation(rows)
    write("quality_default" if args.part == "main" else "quality_ablation", {"rows": rows, "paired": paired, "goals": GOALS, "seconds": time.perf_counter() - t0},
          table, command("quality_default.py", argv))
    return 0


def pct(v: float) -> str:
    return f"{100 * v:.2f}"


def config_table(rows: list[dict[str, Any]], first: str, metrics: list[tuple[str, str]]) -> list[str]:
    """Markdown lines: one row per configuration (size, layers, recipe and its overrides) and ``metrics``
    (key, header) in percent."""
    return markdown([first, "size", "image layers", "recipe", *[h for _, h in metrics]],
                    [[r["config"], r["size"], ",".join(r["layers"]), f"{r['recipe']} {r['overrides'] or ''}",
                      *[pct(r[k]) for k, _ in metrics]] for r in rows]).split("\n")


MAIN_METRICS = [("acc1", "acc1 %"), ("acc5", "acc5 %"), ("r10", "R@10 %"), ("fmnist_acc1", "Fashion-MNIST acc1 %"),
                ("low_acc1", "low-data acc1 %"), ("low_fmnist_acc1", "low-data Fashion-MNIST %")]


def render(rows: list[dict[str, Any]], paired: dict[str, Any], new: str) -> str:
    out = config_table(rows, "configuration", MAIN_METRICS)
    first = rows[0]
    out += ["", "| goal (new default) | target | measured | met |", "|---|---|---|---|"]
    for k, target in GOALS.items():
        out.append(f"| {k} | {pct(target)} | {pct(first[k])} | {'yes' if first[k] >= target else 'no'} |")
    out += ["", f"Paired tests, new default ({new}) against each baseline, on the same test images "
            "(382 emoji; 10,000 Fashion-MNIST):", "",
            "| against | metric | new % | baseline % | new - baseline (95% paired bootstrap) | only new right | "
            "only baseline right | McNemar exact p |", "|---|---|---|---|---|---|---|---|"]
    for other, res in paired.items():
        for m, r in res.items():
            out.append(f"| {other} | {m} | {pct(r['a'])} | {pct(r['b'])} | {100 * r['diff']:+.2f} "
                       f"[{100 * r['ci95'][0]:+.2f}, {100 * r['ci95'][1]:+.2f}] | {r['only_a']} | {r['only_b']} | "
                       f"{r['mcnemar_p']:.3g} |")
    return "\n".join(out)


def render_ablation(rows: list[dict[str, Any]]) -> str:
    return "\n".join(config_table(rows, "new default (224 px, last-8 + shallow-3 balanced, final x2, "
                                         "unialign-wide) ...", MAIN_METRICS[:4]))

if __name__ == "__main__":
    sys.exit(main())
