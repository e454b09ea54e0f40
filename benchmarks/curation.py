"""Does concept-rich curation (Freeze-Align, REFERENCE.md section 1) pick better training pairs than
random sampling at the same budget?

Pool: the emoji *training* pairs of the default protocol (training concepts, styles google + twitter +
openmoji: ``make_splits(...).train``; validation and test concepts are never candidates).
Targets: the 10 Fashion-MNIST class names (text prototypes, ``photo`` prompt ensemble).
Budgets 250 / 500 / 1000 pairs. Curated subsets come from ``unialign.curate.curate_dataset`` (the
library function behind ``unialign curate``, farthest-point fill) and are read back through
``data.subset`` + ``make_splits`` exactly as ``unialign run`` would; random subsets are drawn
uniformly from the same pool. Each subset trains the recipe given by ``--recipe`` (default ``linear``:
linear heads, InfoNCE, early stopping on the validation concepts; seeds matter for trained recipes) with 5 training seeds (random: seed s also draws
the subset). Reported: zero-shot top-1 on the Fashion-MNIST test set (10k real photos, 10 classes) and
on the held-out emoji protocol (382 test concepts in the unseen apple style), mean +- std over seeds.

Cached features are loaded once, the text encoder once (all prompt features are encoded once up
front), so a run costs training only. ``python3 benchmarks/curation.py`` (~10 min on 2 busy cores);
``--quick`` = one budget, two seeds. Writes benchmarks/results/curation.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from unialign.encoders import load_encoder
from unialign_train.align import fit, get_recipe, make_pairs
from unialign_train.config import load_config
from unialign_train.curate import curate_dataset
from unialign_train.data import load_dataset, make_splits
from unialign_train.evaluate import validator, zero_shot_set
from unialign_train.features import cache_features

HERE = Path(__file__).resolve().parent


def quiet(_: str) -> None:
    pass


def say(msg: str) -> None:
    print(msg, flush=True)


def stats(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "runs": a.tolist()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", default="250,500,1000")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--fill", default="farthest", choices=["farthest", "kmeans", "none"])
    ap.add_argument("--full", type=int, default=0, help="training seeds of a whole-pool reference (default 0: skip)")
    ap.add_argument("--quick", action="store_true", help="budget 500 only, 2 seeds, no whole-pool reference")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--recipe", default="linear", help="recipe trained on each subset")
    args = ap.parse_args()
    budgets = [500] if args.quick else [int(b) for b in args.budgets.split(",")]
    seeds = list(range(2 if args.quick else args.seeds))
    n_full = 0 if args.quick else args.full
    t_start = time.perf_counter()

    cfg = load_config(overrides={"device": "cpu", "recipe": args.recipe})
    recipe = get_recipe(cfg.recipe)
    ds = load_dataset(cfg.data.dataset)
    ie = load_encoder(cfg.encoders["image"], device="cpu")
    te = load_encoder(cfg.encoders["text"], device="cpu")  # loaded once: validation, test, curation prompts
    layers = {m: cfg.layers_of(m) for m in ("image", "text")}
    cached = cache_features(ds, {"image": ie, "text": te}, layers, cfg.extract, quiet)
    splits = make_splits(ds, cfg.data)
    zs = cfg.eval.zero_shot_sets["fashion-mnist"]
    fm = zero_shot_set(zs)
    fcached = cache_features(fm, {"image": ie}, layers, cfg.extract, quiet)
    # the shipped zero-shot scorer (prompts encoded once, reused by every run): early stopping and both tasks
    validate = validator(cached, te, layers["text"], splits.val, "image", cfg.eval.templates)
    tasks = {"fashion-mnist": validator(fcached, te, layers["text"], np.arange(len(fm)), "image", zs.templates),
             "emoji-test-apple": validator(cached, te, layers["text"], splits.test, "image", cfg.eval.templates)}
    n_test_classes = len({ds.records[i]["concept"] for i in splits.test})
    fm_names = [fm.concept_labels().get(c, c) for c in fm.classes]
    say(f"setup {time.perf_counter() - t_start:.0f}s: pool {len(splits.train)} emoji training pairs "
        f"({len(splits.concepts['train'])} concepts), targets {fm_names}")

    def train_eval(rows: np.ndarray, seed: int) -> dict[str, float]:
        pairs = make_pairs(cached, np.sort(rows), "image", "text")
        t0 = time.perf_counter()
        fitted = fit(recipe, {**cfg.train, **({"seed": seed} if recipe.trained else {})}, cached["image"].features,
                     cached["text"].features, pairs, ("image", "text"), validate if recipe.trained else None, None,
                     "cpu", quiet)
        towers = torch.nn.ModuleDict(fitted.projections)
        out = {name: task(towers)["val_acc1"] for name, task in tasks.items()}
        out.update(steps=fitted.info.get("steps"), seconds=time.perf_counter() - t0)
        return out

    results: dict[str, dict] = {}
    curation_info: dict[str, dict] = {}
    chance = {"fashion-mnist": 1 / 10, "emoji-test-apple": 1 / n_test_classes}

    def payload(full: dict | None = None) -> dict:
        return {
            "benchmark": "curation", "command": "python3 benchmarks/curation.py" + (" --quick" if args.quick else ""),
            "pool": {"dataset": "emoji", "split": "train (training concepts x google+twitter+openmoji)",
                     "n_pairs": int(len(splits.train)), "n_concepts": len(splits.concepts["train"])},
            "targets": fm_names, "prototype": "text (photo templates)", "fill": args.fill, "budgets": budgets,
            "seeds": seeds, "recipe": cfg.recipe, "encoders": dict(cfg.encoders), "chance": chance,
            "results": results, "whole_pool": full, "curation": curation_info, "seconds": time.perf_counter() - t_start,
            "complete": all(str(b) in results for b in budgets),
            "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        }

    def save(p: dict) -> None:  # after every budget, so an interrupted run keeps what it measured
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "curation.json").write_text(json.dumps(p, indent=1) + "\n")
        (args.out / "curation.md").write_text(markdown(p))
    tmp = Path(tempfile.mkdtemp(prefix="unialign-curation-"))
    for budget in budgets:
        t0 = time.perf_counter()
        dc = curate_dataset(cached, fm_names, budget, text_encoder=te, media="image", media_encoder=ie, layers=layers,
                            protocol=cfg.data, templates="photo", fill=args.fill, out=tmp / f"subset-{budget}.parquet",
                            log=quiet)
        # read the subset back the way `unialign run --set data.subset=...` does
        sub_cfg = load_config(overrides={"device": "cpu", "data.subset": str(dc.path)})
        rows = make_splits(ds, sub_cfg.data).train
        assert sorted(dc.rows.tolist()) == rows.tolist() and len(rows) == budget
        assert set(rows.tolist()) <= set(splits.train.tolist())
        r = dc.result
        picks = {}
        for c, name in enumerate(fm_names):
            sel = r.rows[r.concept == c]
            picks[name] = list(dict.fromkeys(ds.records[i]["label"] for i in sel))[:8]
        curation_info[str(budget)] = {"seconds": time.perf_counter() - t0, "pairs_per_concept": r.coverage()["pairs_per_concept"],
                                      "n_concept": int(len(r.rows) - r.n_fill), "n_fill": r.n_fill, "example_labels": picks,
                                      "distinct_concepts": len({ds.records[i]["concept"] for i in rows})}
        say(f"budget {budget}: curated in {curation_info[str(budget)]['seconds']:.1f}s "
            f"({curation_info[str(budget)]['n_concept']} by concept, {r.n_fill} fill)")
        pool = dc.pool
        runs: dict[str, list[dict]] = {"curated": [], "random": []}
        for s in seeds:
            runs["curated"].append(train_eval(rows, s))
            rnd = np.random.default_rng(s).choice(pool, size=budget, replace=False)
            runs["random"].append(train_eval(rnd, s))
            say(f"  seed {s}: curated FM {runs['curated'][-1]['fashion-mnist']:.3f} emoji {runs['curated'][-1]['emoji-test-apple']:.3f} | "
                f"random FM {runs['random'][-1]['fashion-mnist']:.3f} emoji {runs['random'][-1]['emoji-test-apple']:.3f} "
                f"({time.perf_counter() - t_start:.0f}s)")
        results[str(budget)] = {
            kind: {**{t: stats([x[t] for x in rs]) for t in tasks}, "steps": stats([x["steps"] for x in rs]),
                   "train_seconds": stats([x["seconds"] for x in rs])}
            for kind, rs in runs.items()
        }
        save(payload())
    full = None
    if n_full:
        fr = [train_eval(splits.train, s) for s in range(n_full)]
        full = {**{t: stats([x[t] for x in fr]) for t in tasks}, "n_pairs": int(len(splits.train))}
        say(f"whole pool ({len(splits.train)} pairs): FM {full['fashion-mnist']['mean']:.3f} emoji {full['emoji-test-apple']['mean']:.3f}")

    save(payload(full))
    say(markdown(payload(full)))


def markdown(p: dict) -> str:
    f = lambda s: f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"  # noqa: E731
    lines = [f"# Concept-rich curation vs random subsets (`{p['command']}`)", "",
             f"Pool: {p['pool']['n_pairs']} emoji training pairs ({p['pool']['n_concepts']} training concepts, "
             f"google + twitter + openmoji). Targets: the {len(p['targets'])} Fashion-MNIST class names. "
             f"Recipe `{p['recipe']}`, seeds {p['seeds']}. Zero-shot top-1 (%), mean ± std over seeds; "
             f"chance: Fashion-MNIST {100 * p['chance']['fashion-mnist']:.1f}, emoji test "
             f"{100 * p['chance']['emoji-test-apple']:.2f}.", "",
             "| budget | subset | Fashion-MNIST acc1 | Δ vs random | emoji test (apple) acc1 | Δ vs random | distinct concepts |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for b, r in p["results"].items():
        for kind in ("random", "curated"):
            d_fm = 100 * (r[kind]["fashion-mnist"]["mean"] - r["random"]["fashion-mnist"]["mean"])
            d_em = 100 * (r[kind]["emoji-test-apple"]["mean"] - r["random"]["emoji-test-apple"]["mean"])
            dist = p["curation"][b]["distinct_concepts"] if kind == "curated" else "—"
            lines.append(f"| {b} | {kind} | {f(r[kind]['fashion-mnist'])} | {'' if kind == 'random' else f'{d_fm:+.1f}'} | "
                         f"{f(r[kind]['emoji-test-apple'])} | {'' if kind == 'random' else f'{d_em:+.1f}'} | {dist} |")
    if p.get("whole_pool"):
        w = p["whole_pool"]
        lines.append(f"| {w['n_pairs']} | whole pool ({len(w['fashion-mnist']['runs'])} seeds) | {f(w['fashion-mnist'])} | | "
                     f"{f(w['emoji-test-apple'])} | | |")
    b = max(p["curation"], key=int)
    lines += ["", f"What the curation picked per class (budget {b}, first distinct emoji labels):", ""]
    for name, labels in p["curation"][b]["example_labels"].items():
        lines.append(f"- **{name}** ({p['curation'][b]['pairs_per_concept'][name]} pairs): {', '.join(labels)}")
    lines += ["", f"Total time {p['seconds']:.0f}s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
