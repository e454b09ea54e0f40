"""Video-text on moving emoji: does the order of frames reach the features? Frame averaging against
order-aware pooling (``trend``) and the temporal shift inside the frozen network (``shift``), 5 seeds.

Data: ``moving-emoji`` (unialign_train.data.moving): 120 emoji objects x 6 motions (left, right, up,
down, growing, shrinking), captions "a <object> <motion>". Each seed holds out another 20% of the
objects (``data.split_seed``); the motions are the same words in training and test.

Features: EfficientNet-Lite0 at 96 px, 8 frames a clip, through ``video:`` encoders; MiniLM captions.
Two stores are extracted (shift off / on) with ``pool=concat`` (every frame's features, in order); the
``mean`` and ``trend`` rows are pooled from them with :func:`unialign.encoders.video.pool_frames`, the
function the encoder's own ``pool=`` calls, so four variants cost two extractions. The video layer
(block10 / block13 / final) is chosen per variant and seed on the validation objects by the motion
accuracy; test objects are scored once. Recipe ``linear`` (LiT-style linear heads, InfoNCE, early
stopping on validation objects): chosen on seed 0's validation objects among cca, lstsq, procrustes,
asif and linear (docs/video.md).

Scores on the held-out objects' clips:
- motion: each clip against the 6 captions of its own object (chance 1/6);
- reverse pair: each clip against its own caption and its time-reversed one (left vs right, ...;
  chance 1/2): what frame averaging cannot do by construction (its features of a clip and of the clip
  played backwards are the same);
- video->text and text->video R@1 among all test clips and captions, and object zero-shot top-1.

    python3 benchmarks/video.py [--seeds 5] [--recipe linear]
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
import torch

from _common import RESULTS, command, markdown, write
from unialign.encoders import load_encoder
from unialign.encoders.video import pool_frames
from unialign.model import AlignedModel
from unialign_train.align import fit, get_recipe, make_pairs
from unialign_train.config import load_config
from unialign_train.data import load_dataset, make_splits
from unialign_train.evaluate import evaluate_split, validator
from unialign_train.evaluate.motion import motion_scores
from unialign_train.features import Cached, Features, ModalityFeatures, cache_features, extract

# name -> (pool, shift on, recipe: None = --recipe). "concat" keeps every frame for a trained temporal head.
VARIANTS = {"frame mean": ("mean", False, None), "trend": ("trend", False, None), "shift + mean": ("mean", True, None),
            "shift + trend": ("trend", True, None), "attention head": ("concat", False, "temporal"),
            "shift + attention head": ("concat", True, "temporal")}
LAYERS = ["final", "block5", "block10", "block13"]  # stored
CANDIDATES = ["block10", "block13", "final"]  # chosen among on validation objects


def spec(size: int, frames: int, pool: str, shift: float) -> str:
    s = f"video:effnet-lite0?image_size={size}&frames={frames}&pool={pool}"
    return s + (f"&shift={shift}" if shift else "&backend=torch")  # one backend for every variant


def extract_stores(ds: Any, size: int, frames: int, shift: float) -> tuple[dict[bool, Any], list[dict[str, Any]]]:
    """The per-frame stores (shift off / on) and the time each took from empty: from its plan (written
    first) to its manifest (written last), so also when an earlier run made it (if not interrupted)."""
    stores, timing = {}, []
    for on in (False, True):
        enc = load_encoder(spec(size, frames, "concat", shift if on else 0.0), device="cpu")
        store = extract(ds, enc, layers=LAYERS, batch_size=16, num_workers=1)
        secs = (store.root / "manifest.json").stat().st_mtime - (store.root / "shards" / "plan.json").stat().st_mtime
        timing.append({"spec": enc.spec, "clips": len(store), "frames": frames * len(store), "seconds": round(secs, 1),
                       "clips_per_s": round(len(store) / secs, 2)})
        stores[on] = store
    return stores, timing


def pooled(store: Any, frames: int, pool: str) -> dict[str, np.ndarray]:
    """Each layer's stored per-frame rows pooled over time with the encoder's own pooling."""
    return {l: pool_frames(torch.from_numpy(np.asarray(store.array(l)[:], dtype=np.float32))
                           .reshape(len(store), frames, -1), pool).numpy() for l in LAYERS}


def fit_layer(ds: Any, base: Cached, rows: dict[str, np.ndarray], layer: str, enc: Any, text: Any, recipe: str,
              splits: Any) -> tuple[AlignedModel, Cached]:
    """The recipe fitted on the training objects' clips (one video layer) and captions, as a model."""
    V = base["video"]
    feats = Features([rows[layer]], [layer], enc.steps)
    cached = Cached(ds, {"video": ModalityFeatures("video", V.store, feats, V.offsets, V.flat),
                         "text": base["text"]})
    pairs = make_pairs(cached, splits.train, "video", "text")
    rec = get_recipe(recipe)
    validate = validator(cached, text, ["final"], splits.val, "video", "plain") if rec.trained else None
    fitted = fit(rec, {}, cached["video"].features, cached["text"].features, pairs, ("video", "text"), validate,
                 None, "cpu", log=lambda s: None)
    return AlignedModel({"video": enc, "text": text}, fitted.projections, {"video": [layer], "text": ["final"]},
                        fitted.logit_scale), cached


def split(ds: Any, seed: int) -> Any:
    return make_splits(ds, load_config(None, {"data.dataset": "moving-emoji", "data.split_seed": seed}).data)


def run_seed(ds: Any, base: Cached, rows: dict[str, np.ndarray], enc: Any, text: Any, recipe: str, seed: int
             ) -> dict[str, Any]:
    splits = split(ds, seed)
    best: tuple[float, str, Any, Cached] | None = None
    for layer in CANDIDATES:  # chosen on the validation objects
        model, cached = fit_layer(ds, base, rows, layer, enc, text, recipe, splits)
        val = motion_scores(model, cached, splits.val)["motion"]
        if best is None or val > best[0]:
            best = (val, layer, model, cached)
    _, layer, model, cached = best
    out = {"layer": layer, "val_motion": best[0], **motion_scores(model, cached, splits.test)}
    for r in evaluate_split(model, cached, splits.test, "moving-emoji-test", ("video", "text"), "plain", [1], "v", ""):
        for k, v in r["metrics"].items():
            out[k] = v
        out.update({f"chance_{k}": v for k, v in r["chance"].items()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--recipe", default="linear")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--shift", type=float, default=0.125)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variants to run; the others' "
                                                                     "results are kept from results/video.json")
    ap.add_argument("--choose-recipe", default="", help="comma-separated recipes: score each on seed 0's validation "
                                                        "objects only (writes results/video_recipes)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    ds = load_dataset("moving-emoji")
    stores, timing = extract_stores(ds, args.size, args.frames, args.shift)
    text = load_encoder("st:all-MiniLM-L6-v2", device="cpu")
    cfg = load_config(None, {"data.dataset": "moving-emoji"})
    tc = cache_features(ds, {"text": text}, {"text": ["final"]}, cfg.extract, log=lambda s: None, show_progress=False)
    if args.choose_recipe:
        return choose_recipe(ds, stores, tc, text, args)
    results, recipes = kept_results(args, [v for v in args.variants.split(",") if v])
    for name in [v for v in args.variants.split(",") if v]:
        pool, on, recipe = VARIANTS[name]
        recipes[name] = recipe or args.recipe
        enc = load_encoder(spec(args.size, args.frames, pool, args.shift if on else 0.0), device="cpu")
        base = Cached(ds, {"video": ModalityFeatures.build(ds, "video", stores[on], ["final"]), "text": tc["text"]})
        rows = pooled(stores[on], args.frames, pool)
        results[name] = [run_seed(ds, base, rows, enc, text, recipes[name], s) for s in range(args.seeds)]
        r = results[name]
        print(f"{name}: motion {np.mean([x['motion'] for x in r]):.3f}, pair {np.mean([x['reverse_pair'] for x in r]):.3f}",
              flush=True)
    keys = [("motion", "motion (6 captions)"), ("reverse_pair", "reverse pair"),
            ("text_retrieval_recall@1", "video->text R@1"), ("video_retrieval_recall@1", "text->video R@1"),
            ("acc1", "object zero-shot top-1")]
    ms = lambda v: f"{100 * np.mean(v):.1f} +- {100 * np.std(v):.1f}"  # noqa: E731
    rows = [[name, recipes[name], ", ".join(sorted({x["layer"] for x in r})), *[ms([x[k] for x in r]) for k, _ in keys]]
            for name, r in ((n, results[n]) for n in VARIANTS if n in results)]
    first = results["frame mean"][0]
    rows.append(["chance", "", "", f"{100 / 6:.1f}", "50.0", f"{100 * first['chance_text_retrieval_recall@1']:.1f}",
                 f"{100 * first['chance_video_retrieval_recall@1']:.1f}", f"{100 * first['chance_acc1']:.1f}"])
    table = markdown(["video features", "recipe", "layer (val)", *[h for _, h in keys]], rows)
    ttable = markdown(["store (from empty)", "clips", "frames", "seconds", "clips/s"],
                      [[f"`{t['spec']}`", t["clips"], t["frames"], t["seconds"], t["clips_per_s"]] for t in timing])
    data = {"seeds": args.seeds, "recipe": args.recipe, "recipes": recipes, "size": args.size, "frames": args.frames, "shift": args.shift,
            "results": results, "extraction": timing, "total_seconds": round(time.perf_counter() - t_start, 1)}
    write("video", data, f"{table}\n\nExtraction (2 CPU cores, shared):\n\n{ttable}", command("video.py"))


def kept_results(args: Any, run: list[str]) -> tuple[dict[str, list[dict[str, Any]]], dict[str, str]]:
    """Results (and recipes) of the variants not in ``run`` from the last results/video.json, when it was
    made with the same settings; a variant run now replaces its old rows."""
    unknown = [v for v in run if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; accepted: {', '.join(VARIANTS)}")
    path = RESULTS / "video.json"
    if not path.exists() or set(run) == set(VARIANTS):
        return {}, {}
    old = json.loads(path.read_text())
    if [old[k] for k in ("seeds", "size", "frames", "shift")] != [args.seeds, args.size, args.frames, args.shift]:
        raise SystemExit(f"{path} was made with other settings; run every variant")
    keep = [n for n in old["results"] if n not in run]
    return ({n: old["results"][n] for n in keep},
            {n: old.get("recipes", {}).get(n, old["recipe"]) for n in keep})


def choose_recipe(ds: Any, stores: dict[bool, Any], tc: Cached, text: Any, args: Any) -> None:
    """Validation motion accuracy of each recipe (seed 0; no shift; mean and trend; each candidate layer):
    how the benchmark's recipe was chosen, with no test object scored."""
    splits = split(ds, 0)
    recipes = [r for r in args.choose_recipe.split(",") if r]
    out = []
    for pool in ("mean", "trend"):
        enc = load_encoder(spec(args.size, args.frames, pool, 0.0), device="cpu")
        base = Cached(ds, {"video": ModalityFeatures.build(ds, "video", stores[False], ["final"]), "text": tc["text"]})
        rows = pooled(stores[False], args.frames, pool)
        for recipe in recipes:
            vals = {}
            for layer in CANDIDATES:
                model, cached = fit_layer(ds, base, rows, layer, enc, text, recipe, splits)
                vals[layer] = motion_scores(model, cached, splits.val)["motion"]
            out.append({"pool": pool, "recipe": recipe, **vals})
            print(out[-1], flush=True)
    table = markdown(["pool", "recipe", *[f"val motion, {l}" for l in CANDIDATES]],
                     [[r["pool"], r["recipe"], *[f"{100 * r[l]:.1f}" for l in CANDIDATES]] for r in out])
    write("video_recipes", {"results": out, "n_val_objects": len(splits.concepts["val"])}, table, command("video.py"))


if __name__ == "__main__":
    main()
