"""Which recipe wins? Every recipe of ``unialign_train.align.recipes`` on identical cached features.

Protocol (the default of ``unialign run``): EfficientNet-Lite0 (128 px) + all-MiniLM-L6-v2 on the emoji
data, concepts split 70/10/20 with split_seed 0 (fixed), training on google + twitter + openmoji, early
stopping (trained recipes) on the validation concepts in those styles, test on the unseen test concepts
in the unseen apple style; plus zero-shot Fashion-MNIST (test split). Two regimes: the full training
set and a low-data one (``data.max_train_concepts=200``: 200 training concepts drawn at random with the
split seed, the same for every recipe and training seed). Trained recipes run with 5 training seeds;
closed-form ones are deterministic (one fit, std 0).

Features are read once from the feature cache (``cache_features``, a no-op after ``unialign run``);
the text encoder is loaded once and every prompt it encodes is memoised, so each run costs only its fit
and a few matrix products. Each run goes through the pipeline's own stage functions (splits, pairs,
validator, fit, evaluation).

    python3 benchmarks/recipes.py                       # everything, writes benchmarks/results/recipes.{json,md}
    python3 benchmarks/recipes.py --recipes unialign,asif --seeds 2 --regimes full
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from _common import command
from unialign.encoders import load_encoder
from unialign.encoders.base import Encoder
from unialign.model import AlignedModel
from unialign_train.align import fit, get_recipe, make_pairs, unpaired_rows
from unialign_train.config import RunConfig, load_config
from unialign_train.data import Splits, load_dataset, make_splits, unpaired_training
from unialign_train.evaluate import classification, evaluate_split, validator, zero_shot_set
from unialign_train.features import Cached, Features, cache_features

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TRAINED = ["unialign", "linear", "mlp", "sail", "structure", "freeze-align", "layermix", "fusemix", "sharelock",
           "sharelock-mirror", "anchor-head", "fused"]
CLOSED = ["asif", "relative", "procrustes", "lstsq", "cca", "csa", "unialign-unpaired", "unialign-unpaired@transductive"]
TRANSDUCTIVE = "@transductive"  # row suffix: the recipe's unpaired data are the test images and test concepts' captions
REGIMES = {"full": None, "low": 200}
# The recipe table's features, pinned here rather than read from default.yaml: every row of every run
# compares recipes on the same features even when the default job's image size or layers change
# (the default job itself, with its own size, layers and layer weights, is scored by quality_default.py).
# Several layers (--image-layers) are concatenated as they come, as when their rows were measured.
PROTOCOL = {"encoders.image": "effnet-lite0?image_size=128", "layers.image": ["final"], "layer_weights": None}
quiet = lambda *_: None  # noqa: E731


class MemoTextEncoder(Encoder):
    """A text encoder that encodes each distinct string once per process (prompts recur in every run)."""

    modality = "text"

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder
        self.spec, self.dim, self.version, self.layer_dims = encoder.spec, encoder.dim, encoder.version, encoder.layer_dims
        self.memo: dict[tuple[str, tuple[str, ...]], torch.Tensor] = {}

    def forward(self, batch: Any, layers: Sequence[str] = ("final",)) -> dict[str, torch.Tensor]:
        return self.encoder.forward(batch, layers)

    def encode(self, texts: Sequence[str], batch_size: int = 256, show_progress_bar: bool | None = None,
               convert_to_numpy: bool = True, layers: Sequence[str] = ("final",), **_: Any) -> Any:
        key = tuple(layers)
        todo = list(dict.fromkeys(t for t in texts if (t, key) not in self.memo))
        if todo:
            out = self.encoder.encode(todo, batch_size=256, show_progress_bar=False, convert_to_numpy=False,
                                      layers=list(layers))
            for t, row in zip(todo, torch.as_tensor(out).float()):
                self.memo[(t, key)] = row
        x = torch.stack([self.memo[(t, key)] for t in texts]) if texts else torch.zeros(0, 0)
        return x.numpy() if convert_to_numpy else x


class Bench:
    """Cached features, encoders and the Fashion-MNIST store, loaded once; ``run`` fits and evaluates."""

    def __init__(self, base: dict[str, Any] | None = None, fashion: bool = True, log: Any = print):
        self.base = {**PROTOCOL, **(base or {})}
        cfg = load_config(overrides=self.base)
        self.cfg = cfg
        self.ds = load_dataset(cfg.data.dataset)
        self.image_encoder = load_encoder(cfg.encoders["image"], device="cpu")
        self.text_encoder = MemoTextEncoder(load_encoder(cfg.encoders["text"], device="cpu"))
        self.layers = {m: cfg.layers_of(m) for m in ("image", "text")}
        encoders = {"image": self.image_encoder, "text": self.text_encoder.encoder}
        self.cached = _in_memory(cache_features(self.ds, encoders, self.layers, cfg.extract, log))
        self.fm = None
        if fashion:
            fm = zero_shot_set(cfg.eval.zero_shot_sets["fashion-mnist"])
            self.fm = (fm, _in_memory(cache_features(fm, {"image": self.image_encoder}, self.layers, cfg.extract, log)))
        self.image_layers = self.layers["image"]  # several: the features every recipe sees concatenated

    def config(self, recipe: str, seed: int = 0, max_train_concepts: int | None = None,
               overrides: dict[str, Any] | None = None) -> RunConfig:
        ov = {**self.base, "recipe": recipe, "device": "cpu", "data.max_train_concepts": max_train_concepts,
              "output": "/tmp/unialign-bench"}
        if get_recipe(recipe).trained:
            ov["train.seed"] = seed
        for k, v in (overrides or {}).items():
            ov[k if "." in k or k in RunConfig.model_fields else f"train.{k}"] = v
        return load_config(overrides=ov)

    def unpaired_data(self, cfg: RunConfig, splits: Splits, transductive: bool) -> tuple[np.ndarray, np.ndarray]:
        """Image and text rows without their pairing: the training concepts a low-data run leaves out
        (none on the full training set), or, ``transductive``, the test images and test concepts' captions."""
        recs = splits.test if transductive else unpaired_training(self.ds, cfg.data, splits)
        return unpaired_rows(self.cached, recs, "image", "text")

    def fit(self, cfg: RunConfig, seed: int = 0, transductive: bool = False
            ) -> tuple[AlignedModel, Splits, dict[str, Any], Any]:
        """The pipeline's own steps for one config: splits, training pairs, validator, fit; as a model."""
        rec = get_recipe(cfg.recipe)
        splits = make_splits(self.ds, cfg.data)
        pairs = make_pairs(self.cached, splits.train, "image", "text")
        validate = (validator(self.cached, self.text_encoder, self.layers["text"], splits.val, "image", cfg.eval.templates)
                    if rec.trained else None)
        unpaired = self.unpaired_data(cfg, splits, transductive) if rec.unpaired is not None else None
        torch.manual_seed(seed)
        fitted = fit(rec, cfg.train, self.cached["image"].features, self.cached["text"].features, pairs,
                     ("image", "text"), validate, None, "cpu", quiet, unpaired=unpaired,
                     layer_weights=cfg.layer_weights)
        model = AlignedModel({"image": self.image_encoder, "text": self.text_encoder}, fitted.projections, self.layers,
                             fitted.logit_scale, fitted.info)
        return model, splits, fitted.info, pairs

    def run(self, recipe: str, seed: int = 0, max_train_concepts: int | None = None,
            overrides: dict[str, Any] | None = None, templates: str | list[str] | None = None) -> dict[str, Any]:
        """Fit one recipe (the pipeline's own steps) and score it on the test split and Fashion-MNIST.
        ``recipe@transductive``: the recipe's unpaired data are the test images and captions."""
        name, transductive = recipe.removesuffix(TRANSDUCTIVE), recipe.endswith(TRANSDUCTIVE)
        cfg = self.config(name, seed, max_train_concepts, overrides)
        model, splits, info, pairs = self.fit(cfg, seed, transductive)
        out = {"recipe": recipe, "seed": seed, "max_train_concepts": max_train_concepts,
               "train_seconds": info["train_seconds"], "steps": info.get("steps"), "best_step": info.get("best_step"),
               "n_pairs": len(pairs), **{k: info[k] for k in ("fuse", "pseudo_pairs", "n_unpaired") if k in info}}
        recs = evaluate_split(model, self.cached, splits.test, "emoji-test-apple", ("image", "text"),
                              templates or cfg.eval.templates, [1, 5, 10], recipe, "")
        out.update(_flatten(recs))
        if self.fm is not None:
            fm, fc = self.fm
            r = classification(model, fc, np.arange(len(fm)), "image", "fashion-mnist",
                               cfg.eval.zero_shot_sets["fashion-mnist"].templates, recipe, "")
            out["fmnist_acc1"] = r["metrics"]["acc1"]
        return out


def _in_memory(cached: Cached) -> Cached:
    """Read the memory-mapped fp16 shards once into float32 arrays: every run then gathers from RAM."""
    for m in cached.modalities.values():
        m.features = Features([np.asarray(a[np.arange(len(a))], dtype=np.float32) for a in m.features.arrays],
                              m.features.names)
    return cached


def _flatten(records: list[dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in records:
        m = r["metrics"]
        if r["task"] == "zeroshot_classification":
            out.update(acc1=m["acc1"], acc5=m["acc5"], n_classes=r.get("n_classes", r.get("extra", {}).get("n_classes")))
        else:
            out.update(i2t_r10=m["text_retrieval_recall@10"], t2i_r10=m["image_retrieval_recall@10"])
            out["r10"] = (out["i2t_r10"] + out["t2i_r10"]) / 2
    return out


METRICS = ["acc1", "acc5", "r10", "fmnist_acc1", "train_seconds"]


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    keys = list(dict.fromkeys((r["regime"], r["recipe"]) for r in runs))
    for regime, recipe in keys:
        rs = [r for r in runs if r["regime"] == regime and r["recipe"] == recipe]
        row: dict[str, Any] = {"regime": regime, "recipe": recipe, "n_runs": len(rs)}
        for m in METRICS:
            v = np.array([r[m] for r in rs], dtype=float)
            row[m] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], chance: dict[str, float]) -> str:
    lines = []
    for regime in dict.fromkeys(r["regime"] for r in rows):
        lines += [f"**{regime} training set** ({'all 1335' if regime == 'full' else REGIMES[regime]} training concepts x 3 styles)", "",
                  "| recipe | runs | acc1 % | acc5 % | R@10 % (mean of I->T, T->I) | Fashion-MNIST acc1 % | train s |",
                  "|---|---|---|---|---|---|---|"]
        for r in sorted((r for r in rows if r["regime"] == regime), key=lambda r: -r["acc1"]["mean"]):
            f = lambda m, s=100: f"{s * r[m]['mean']:.1f} ± {s * r[m]['std']:.1f}"  # noqa: E731
            lines.append(f"| {r['recipe']} | {r['n_runs']} | {f('acc1')} | {f('acc5')} | {f('r10')} | {f('fmnist_acc1')} | "
                         f"{r['train_seconds']['mean']:.1f} |")
        lines += ["", f"Chance: acc1 {100 * chance['acc1']:.2f}%, acc5 {100 * chance['acc5']:.2f}%, "
                      f"Fashion-MNIST acc1 10%.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", default=",".join(TRAINED + CLOSED))
    ap.add_argument("--seeds", type=int, default=5, help="training seeds per trained recipe")
    ap.add_argument("--low-seeds", type=int, default=None, help="seeds in the low-data regime (default: --seeds)")
    ap.add_argument("--regimes", default="full,low")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--image-layers", default="final",
                    help="image layers every recipe sees (concatenated; layermix mixes them), e.g. final,block12,block14,block15")
    ap.add_argument("--out", default=str(RESULTS / "recipes"), help="output path without suffix")
    ap.add_argument("--runs-log", default="", help="JSON-lines file: each finished run is appended; runs already "
                                                   "in it are not redone (an interrupted benchmark resumes)")
    ap.add_argument("--merge", default="", help="comma-separated result JSONs of runs made in parallel: write their "
                                                "runs as one table to --out instead of running anything")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge.split(","), Path(args.out), command("recipes.py", argv))
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    bench = Bench({"layers.image": args.image_layers.split(",")})
    notes, runs = [], []
    recipes = [r for r in args.recipes.split(",") if r]
    if "layermix" in recipes and len(bench.image_layers) < 2:
        recipes.remove("layermix")
        notes.append("layermix skipped: it mixes several image layers and this run uses one "
                     "(run with `--image-layers final,block12,block14,block15` to include it).")
        print(notes[-1])
    done = {}
    if args.runs_log and Path(args.runs_log).exists():
        for line in Path(args.runs_log).read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[(r["regime"], r["recipe"], r["seed"])] = r
    for regime in args.regimes.split(","):
        for recipe in recipes:
            n = args.low_seeds if regime == "low" and args.low_seeds is not None else args.seeds
            seeds = range(n) if get_recipe(recipe.removesuffix(TRANSDUCTIVE)).trained else [0]
            for seed in seeds:
                if (regime, recipe, seed) in done:
                    runs.append(done[(regime, recipe, seed)])
                    continue
                r = bench.run(recipe, seed, REGIMES[regime])
                r["regime"] = regime
                runs.append(r)
                if args.runs_log:
                    with open(args.runs_log, "a") as f:
                        f.write(json.dumps(r) + "\n")
                print(f"{regime:4s} {recipe:12s} seed {seed}: acc1 {100 * r['acc1']:.1f} acc5 {100 * r['acc5']:.1f} "
                      f"R@10 {100 * r['r10']:.1f} fmnist {100 * r['fmnist_acc1']:.1f} ({r['train_seconds']:.1f}s, "
                      f"{r['steps']} steps)", flush=True)
    rows = summarise(runs)
    n_classes = runs[0]["n_classes"]
    chance = {"acc1": 1 / n_classes, "acc5": 5 / n_classes}
    table = markdown(rows, chance)
    print("\n" + table)
    cmd = command("recipes.py", argv)
    splits = make_splits(bench.ds, bench.cfg.data)
    payload = {"command": cmd, "protocol": {"image": bench.cfg.encoders["image"], "text": bench.cfg.encoders["text"],
                                            "image_layers": bench.image_layers, "split_seed": 0,
                                            "train_styles": splits.train_styles, "test_styles": splits.test_styles,
                                            "n_test_classes": n_classes,
                                            "regimes": {k: REGIMES[k] for k in args.regimes.split(",")}},
               "machine": {"platform": platform.platform(), "threads": args.threads, "torch": torch.__version__},
               "notes": notes, "seconds": time.perf_counter() - t0, "summary": rows, "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    out.with_suffix(".md").write_text(f"Made by `{cmd}` in {payload['seconds'] / 60:.1f} min ({args.threads} threads).\n\n"
                                      + table + ("\n" + "\n".join(notes) + "\n" if notes else ""))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')} ({payload['seconds'] / 60:.1f} min)")
    return 0


def merge(files: list[str], out: Path, cmd: str) -> int:
    """One table from several result files (parallel runs of disjoint recipe sets, same protocol). A
    ``.jsonl`` file is a ``--runs-log`` of a run that did not finish: its finished runs count."""
    parts = [_load_part(f) for f in files]
    runs = [r for p in parts for r in p["runs"]]
    rows = summarise(runs)
    n_classes = runs[0]["n_classes"]
    table = markdown(rows, {"acc1": 1 / n_classes, "acc5": 5 / n_classes})
    payload = {"command": cmd, "merged": [{"file": f, "command": p["command"], "seconds": p["seconds"]}
                                          for f, p in zip(files, parts)],
               "protocol": next((p["protocol"] for p in parts if p.get("protocol")), None),
               "machine": next((p["machine"] for p in parts if p.get("machine")), None),
               "notes": [n for p in parts for n in p["notes"]], "summary": rows, "runs": runs}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    made = "; ".join(f"`{p['command']}`" + (f" ({p['seconds'] / 60:.1f} min)" if p["seconds"] else "") for p in parts)
    out.with_suffix(".md").write_text(f"Made by {made}, in parallel, merged by `{cmd}`.\n\n" + table + "\n")
    print(table)
    return 0


def _load_part(f: str) -> dict[str, Any]:
    if f.endswith(".jsonl"):
        runs = [json.loads(line) for line in Path(f).read_text().splitlines() if line.strip()]
        return {"command": f"finished runs of {Path(f).name} (run interrupted)", "seconds": None, "notes": [], "runs": runs}
    return json.loads(Path(f).read_text())


if __name__ == "__main__":
    sys.exit(main())
