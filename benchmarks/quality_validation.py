"""How the quality default (issue 15) was chosen: style-held-out validation, then the test once.

Every candidate (image size, image layers, recipe and its parameters, hubness correction) is scored as
``benchmarks/tune_unialign.py`` scores: for each training style s of google/twitter/openmoji, fit on the
training concepts in the other two styles, classify zero-shot among the validation concepts drawn in s,
average the three rotations. Neither test concepts nor the apple style enter a score. Fashion-MNIST is
not a validation set here (it is reported, never used to choose); its *train* split is, with ``--fm-val N``: a
class-balanced subset of N training images scored zero-shot after a fit on every training style, a second
validation domain of another image type (grayscale product photos), beside the emoji criterion.

Image features come from one store per image size holding every candidate layer
(``layers: auto``'s candidates: on EfficientNet-Lite0 ``final``, ``stem, block2, block5``, ``block9 .. block15``;
or the layers ``--store-layers`` names); a candidate's layers are read from
that store, so trying a layer set extracts nothing new.

    python3 benchmarks/quality_validation.py --stage layers       # size x layer set, current default recipe
    python3 benchmarks/quality_validation.py --stage recipes --size 224 --layers last-4
    python3 benchmarks/quality_validation.py --stage hubness --size 224 --layers last-4
    python3 benchmarks/quality_validation.py --stage recipes --size 224 --layers last-8 --fm-val 10000 \
        --candidates 'unialign;unialign:prototypes=true'

Writes ``benchmarks/results/quality_validation_<stage>.{json,md}``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from _common import command, markdown, write
from recipes import Bench, _in_memory, quiet
from tune_unialign import STYLES
from unialign_train.choose import with_layers
from unialign_train.config import load_config
from unialign_train.evaluate import ZeroShotSet, classification, zero_shot_predictions, zero_shot_set
from unialign_train.evaluate.hubness import corrected_scores
from unialign_train.evaluate.metrics import ranking_scores
from unialign_train.features import cache_features
from unialign_train.select import auto_candidates, resolve_layer_names

SIZES = [128, 160, 192, 224]


class LayerBench(Bench):
    """A :class:`Bench` whose image features are a subset of the candidate-layer store of one size."""

    def __init__(self, size: int, fashion: bool = False, text: str | None = None, text_layers: str = "final",
                 low: int | None = None, image: str = "effnet-lite0", fm_val: int = 0, store: str | None = None):
        self.size = size
        self.max_train_concepts = low  # the low-data regime: a seeded draw of this many training concepts
        enc = f"{image}?image_size={size}"
        # the default job's layer weights (the recipe table's PROTOCOL pins raw concatenation)
        base = {"encoders.image": enc, "layers.image": self._candidates(enc, store),
                "layer_weights": load_config().layer_weights}
        if text:
            base["encoders.text"] = text
        if text_layers != "final":
            from unialign.encoders import load_encoder
            base["layers.text"] = resolve_layer_names(load_encoder(text or self._default_text(), device="cpu"),
                                                      text_layers)
        super().__init__(base, fashion=fashion, log=quiet)
        self.full = {"image": self.cached["image"]}
        if self.fm is not None:
            self.full["fm"] = self.fm[1]["image"]
        self.fm_val = None  # a second validation domain: Fashion-MNIST *train* images (module doc)
        if fm_val:
            zs = ZeroShotSet(dataset="fashion-mnist:train", limit=fm_val,
                             templates=self.cfg.eval.zero_shot_sets["fashion-mnist"].templates)
            ds = zero_shot_set(zs)
            self.fm_val = (ds, zs, _in_memory(cache_features(ds, {"image": self.image_encoder}, self.layers,
                                                              self.cfg.extract, quiet)))
            self.full["fm_val"] = self.fm_val[2]["image"]

    @staticmethod
    def _default_text() -> str:
        return load_config().encoders["text"]

    def _candidates(self, spec: str, store: str | None) -> list[str]:
        """The store's layers: ``auto``'s candidates, or the layer names ``store`` gives (e.g. ``last-18``)."""
        from unialign.encoders import load_encoder
        encoder = load_encoder(spec, device="cpu")
        return resolve_layer_names(encoder, store) if store else auto_candidates(encoder)

    def use_layers(self, names: list[str]) -> None:
        """Read ``names`` (a subset of the candidate layers) from the in-memory candidate store."""
        for key, cached in (("image", self.cached), ("fm", self.fm and self.fm[1]),
                            ("fm_val", self.fm_val and self.fm_val[2])):
            if cached:
                cached.modalities["image"] = with_layers(self.full[key], names)
        self.layers = {**self.layers, "image": list(names)}
        self.image_layers = list(names)


def heldout(bench: Bench, recipe: str, held: str, overrides: dict[str, Any] | None,
            hub: list[tuple[str, float, int]]) -> dict[tuple[str, float, int], dict[str, float]]:
    """Scores of one rotation (fit without style ``held``, validation concepts in ``held``) for each
    hubness setting ``(method, alpha, k)``; ``("none", 0, 0)`` is the plain cosine."""
    others = [s for s in STYLES if s != held]
    cfg = bench.config(recipe, 0, bench.max_train_concepts,
                       {"data.train_styles": others, "data.test_styles": [held], **(overrides or {})})
    model, splits, _, _ = bench.fit(cfg, 0)
    val = bench.ds.indices(styles=[held], concepts=splits.concepts["val"])
    emb, weights, _, labels, _ = zero_shot_predictions(model, bench.cached, val, "image", cfg.eval.templates)
    bank = None
    if any(m != "none" for m, _, _ in hub):  # the reference bank: training images and captions only
        bank_img = model.project("image", bench.cached["image"].record_features(splits.train)[0])
        bank_txt = model.class_embeddings(sorted({bench.ds.records[int(i)]["concept"] for i in splits.train}),
                                          cfg.eval.templates)
        bank = (bank_img, bank_txt)
    out = {}
    for h in hub:
        s = emb @ weights.T if h[0] == "none" else corrected_scores(emb, weights, bank[0], bank[1], *h)
        out[h] = ranking_scores(torch.topk(s, 5, dim=1).indices, labels)
    return out


def fm_val_acc1(bench: LayerBench, recipe: str, overrides: dict[str, Any] | None) -> float | None:
    """Top-1 on the Fashion-MNIST *train* subset of a fit on every training style and concept (the
    default job's fit); None without ``--fm-val``."""
    if bench.fm_val is None:
        return None
    ds, zs, cached = bench.fm_val
    cfg = bench.config(recipe, 0, bench.max_train_concepts, overrides)
    model = bench.fit(cfg, 0)[0]
    return classification(model, cached, np.arange(len(ds)), "image", "fashion-mnist-train", zs.templates,
                          recipe, "")["metrics"]["acc1"]


def candidate(bench: Bench, name: str, recipe: str, overrides: dict[str, Any] | None = None,
              hub: list[tuple[str, float, int]] | None = None) -> list[dict[str, Any]]:
    hub = hub or [("none", 0.0, 0)]
    per = {held: heldout(bench, recipe, held, overrides, hub) for held in STYLES}
    fm = fm_val_acc1(bench, recipe, overrides)
    rows = []
    for h in hub:
        row = {"candidate": name + ("" if h[0] == "none" else f" + {h[0]} alpha={h[1]} k={h[2]}"), "recipe": recipe,
               "overrides": overrides or {}, "hubness": list(h), "size": getattr(bench, "size", None),
               "layers": bench.layers["image"], "per_style": {s: per[s][h]["acc1"] for s in STYLES}}
        for m in ("acc1", "acc5"):
            row[m] = float(np.mean([per[s][h][m] for s in STYLES]))
        row["score"] = (row["acc1"] + row["acc5"]) / 2
        if fm is not None and h[0] == "none":
            row["fm_val_acc1"], row["joint"] = fm, (row["score"] + fm) / 2
        print(f"{row['candidate']:70s} acc1 {100 * row['acc1']:5.1f} acc5 {100 * row['acc5']:5.1f} per style "
              + " / ".join(f"{100 * per[s][h]['acc1']:.1f}" for s in STYLES)
              + (f" FM-train {100 * fm:.1f}" if "fm_val_acc1" in row else ""), flush=True)
        rows.append(row)
    return rows


LAYER_SETS = ["final", "last-2", "last-3", "last-4", "last-5", "last-6", "final,block12,block14,block15"]


def layer_weight_options(text: str) -> list[tuple[str, dict[str, Any]]]:
    """``--layer-weights`` "default;none;final=1;final=3,block15=2": (label, config overrides) each."""
    out = []
    for spec in (s.strip() for s in text.split(";") if s.strip()):
        if spec == "default":
            out.append(("", {}))
        elif spec == "none":
            out.append((" raw layers", {"layer_weights": None}))
        else:
            w = {k: float(v) for k, v in (kv.split("=") for kv in spec.split(","))}
            out.append((f" weights {spec}", {"layer_weights": w}))
    return out


def stage_layers(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        bench = LayerBench(size, text=args.text, text_layers=args.text_layers, low=args.low, image=args.image,
                           fm_val=args.fm_val, store=args.store_layers)
        for spec in args.layer_sets.split(";"):
            names = resolve_layer_names(bench.image_encoder, spec)
            bench.use_layers(names)
            for label, ov in layer_weight_options(args.layer_weights):
                rows += candidate(bench, f"{size}px {spec}{label} {args.recipe}", args.recipe, ov)
    return rows


def stage_recipes(args: argparse.Namespace) -> list[dict[str, Any]]:
    bench = LayerBench(args.size, text=args.text, text_layers=args.text_layers, low=args.low, image=args.image,
                       fm_val=args.fm_val, store=args.store_layers)
    bench.use_layers(resolve_layer_names(bench.image_encoder, args.layers))
    rows = []
    for spec in args.candidates.split(";"):
        recipe, _, params = spec.partition(":")
        ov = {k: _value(v) for k, v in (kv.split("=") for kv in params.split(",") if kv)}
        rows += candidate(bench, f"{args.size}px {args.layers} {spec}", recipe, ov)
    return rows


def stage_hubness(args: argparse.Namespace) -> list[dict[str, Any]]:
    bench = LayerBench(args.size, text=args.text, text_layers=args.text_layers, low=args.low, image=args.image,
                       fm_val=args.fm_val, store=args.store_layers)
    bench.use_layers(resolve_layer_names(bench.image_encoder, args.layers))
    hub = [("none", 0.0, 0)] + [(m, float(a), int(k)) for m, a, k in (h.split(":") for h in args.hub.split(",") if h)]
    rows = []
    for spec in args.candidates.split(";"):
        recipe, _, params = spec.partition(":")
        ov = {k: _value(v) for k, v in (kv.split("=") for kv in params.split(",") if kv)}
        rows += candidate(bench, f"{args.size}px {args.layers} {spec}", recipe, ov, hub)
    return rows


def _value(v: str) -> Any:
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(v.lower(), v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", choices=["layers", "recipes", "hubness"], required=True)
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--layer-sets", default=";".join(LAYER_SETS))
    ap.add_argument("--recipe", default="unialign")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--layers", default="final")
    ap.add_argument("--candidates", default="unialign;asif;csa")
    ap.add_argument("--hub", default="nnn:0.1:10,nnn:0.25:10,nnn:0.25:100,nnn:0.5:100,nnn:1:100,csls:1:10,csls:1:100",
                    help="hubness settings method:alpha:k (stage hubness); the bank is the fold's training data")
    ap.add_argument("--image", default="effnet-lite0", help="image encoder, without its size (effnet-lite0|1|2)")
    ap.add_argument("--text", default=None, help="text encoder spec (default: the default job's)")
    ap.add_argument("--text-layers", default="final", help="text layer set, e.g. last-2 (default: final)")
    ap.add_argument("--layer-weights", default="default",
                    help="stage layers: ';'-separated layer_weights to try: default (the config's), none (raw "
                         "concatenation) or name=weight,... (balanced, weighted)")
    ap.add_argument("--low", type=int, default=None, help="fit on a seeded draw of this many training concepts "
                                                                "(the low-data regime: 200)")
    ap.add_argument("--fm-val", type=int, default=0, help="also score a class-balanced subset of this many "
                    "Fashion-MNIST *train* images (a second validation domain; 0: off)")
    ap.add_argument("--store-layers", default=None, help="layers the image store holds, e.g. last-18 (default: "
                    "auto's candidates: last-8, final included, and shallow-3); every candidate layer set must be "
                    "among them")
    ap.add_argument("--name", default=None, help="result name suffix (default: the stage)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows = {"layers": stage_layers, "recipes": stage_recipes, "hubness": stage_hubness}[args.stage](args)
    fm = args.fm_val > 0
    table = markdown(["candidate (style-held-out validation, mean of 3 rotations)", "acc1 %", "acc5 %",
                      "acc1 per held-out style (" + " / ".join(STYLES) + ")"]
                     + (["Fashion-MNIST train acc1 %", "joint %"] if fm else []),
                     [[r["candidate"], f"{100 * r['acc1']:.1f}", f"{100 * r['acc5']:.1f}",
                       " / ".join(f"{100 * r['per_style'][s]:.1f}" for s in STYLES)]
                      + ([f"{100 * r['fm_val_acc1']:.1f}", f"{100 * r['joint']:.2f}"] if fm and "joint" in r else
                         ["", ""] if fm else []) for r in rows])
    write(f"quality_validation_{args.name or args.stage}", {"protocol": "style-held-out validation (fit on 2 training "
          "styles, score validation concepts in the third; mean of 3 rotations)", "rows": rows,
          "seconds": time.perf_counter() - t0}, table, command("quality_validation.py", argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
