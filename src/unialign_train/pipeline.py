"""The main job, stage by stage: data -> features -> align -> evaluate -> saved model.

``run(cfg)`` is what ``unialign run`` does; ``train_model`` and ``evaluate_model`` are its two halves
(``unialign train`` / ``unialign eval``). This module calls the stages and implements none of them.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from unialign.encoders import load_encoder
from unialign.io import write_json, write_text
from unialign.model import AlignedModel
from unialign.results import markdown_table, write_results

from .align import check_weight_names, fit, get_recipe, make_pairs, unpaired_rows
from .choose import choose_layers, with_layers
from .config import RunConfig, to_dict
from .data import Splits, heldout_name, load_dataset, make_splits, unpaired_training
from .evaluate import classification, evaluate_split, validator, zero_shot_sets
from .features import Cached, cache_features
from .select import AUTO, auto_candidates, auto_sets, resolve_layer_names

Log = Callable[[str], None]


def train_model(cfg: RunConfig, log: Log = print) -> tuple[AlignedModel, Cached, Splits]:
    """Data, features, splits and the fitted projections, as an AlignedModel (not yet evaluated)."""
    recipe = get_recipe(cfg.recipe)
    ds = load_dataset(cfg.data.dataset)
    x, y = cfg.align
    encoders = {m: load_encoder(cfg.encoders[m], device=cfg.device) for m in cfg.align}
    layers = {m: cfg.layers_of(m) for m in cfg.align}
    auto = [m for m in cfg.align if layers[m] == [AUTO]]
    for m, enc in encoders.items():  # names such as last-4 become the encoder's own; auto: the candidates
        layers[m] = auto_candidates(enc) if m in auto else resolve_layer_names(enc, layers[m])
        enc.check_layers(layers[m])
    check_weight_names(cfg.layer_weights, encoders)
    cached = cache_features(ds, encoders, layers, cfg.extract, log)
    splits = make_splits(ds, cfg.data)
    chosen = {}
    for m in auto:  # layers: {m: auto}: the best candidate set on validation (unialign_train.choose)
        best, table = choose_layers(cached, splits, cfg.recipe, cfg.train, cfg.align, m, encoders.get("text"),
                                    layers.get("text", ["final"]), cfg.eval.templates, auto_sets(encoders[m]),
                                    cfg.device, log, layer_weights=cfg.layer_weights)
        cached.modalities[m], layers[m], chosen[m] = with_layers(cached[m], best), best, table
        log(f"layers auto: {m} uses {', '.join(best)}")
    pairs = make_pairs(cached, splits.train, x, y)
    log(f"split by concept: {len(splits.concepts['train'])}/{len(splits.concepts['val'])}/{len(splits.concepts['test'])} "
        f"train/val/test concepts; {len(pairs)} training records, {int(pairs.y_counts().sum())} {y} items")
    validate = None
    if recipe.trained and "text" in cfg.align:  # early stopping on zero-shot accuracy among validation concepts
        query = x if y == "text" else y
        validate = validator(cached, encoders["text"], layers["text"], splits.val, query, cfg.eval.templates)
    unpaired = None
    if recipe.unpaired is not None:  # semi-supervised: the training records this run does not pair
        left = unpaired_training(ds, cfg.data, splits)
        unpaired = unpaired_rows(cached, left, x, y)
        log(f"{recipe.name}: {len(left)} training records left unpaired (data.max_train_concepts, data.subset) give "
            f"{len(unpaired[0])} {x} and {len(unpaired[1])} {y} rows without their pairing")
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    fitted = fit(recipe, cfg.train, cached[x].features, cached[y].features, pairs, cfg.align, validate,
                 out / "checkpoint.pt", cfg.device, log, unpaired=unpaired, layer_weights=cfg.layer_weights)
    info = {**fitted.info, "dataset": ds.name, "dataset_fingerprint": ds.fingerprint(), "config": to_dict(cfg)}
    if chosen:
        info["layers_auto"] = chosen
    return AlignedModel(encoders, fitted.projections, layers, fitted.logit_scale, info), cached, splits


def evaluate_model(model: AlignedModel, cfg: RunConfig, cached: Cached, splits: Splits, pretrained: str,
                   log: Log = print) -> list[dict[str, Any]]:
    """The protocol: the held-out split (held-out concepts, in held-out styles), then each zero-shot set.
    Records name the model as CLIP_benchmark would: ``model`` = the run's name, ``pretrained`` = its folder."""
    ks = cfg.eval.retrieval_ks
    records = evaluate_split(model, cached, splits.test, heldout_name(cached.dataset, splits), cfg.align,
                             cfg.eval.templates, ks, cfg.name, pretrained)
    for name, zs, ds, q in zero_shot_sets(cfg.eval.zero_shot_sets, cfg.align, log):
        zc = cache_features(ds, {q: model.encoders[q]}, {q: model.layers[q]}, cfg.extract, log)
        records.append(classification(model, zc, range(len(ds)), q, name, zs.templates, cfg.name, pretrained))
    return records


def evaluate_saved(model_dir: str | Path, cfg: RunConfig, log: Log = print) -> list[dict[str, Any]]:
    """``unialign eval``: a saved model scored on ``cfg``'s protocol (features from the cache)."""
    model = AlignedModel.from_pretrained(model_dir, device=cfg.device)
    ds = load_dataset(cfg.data.dataset)
    cached = cache_features(ds, {m: model.encoders[m] for m in cfg.align}, model.layers, cfg.extract, log)
    return evaluate_model(model, cfg, cached, make_splits(ds, cfg.data), str(model_dir), log)


def run(cfg: RunConfig, log: Log = print) -> dict[str, Any]:
    """The whole job; writes ``<output>/model``, ``<output>/results`` and prints the results table."""
    t0 = time.perf_counter()
    out = Path(cfg.output)
    model, cached, splits = train_model(cfg, log)
    records = evaluate_model(model, cfg, cached, splits, str(out / "model"), log)
    model.save_pretrained(out / "model", results=records)
    write_results(out / "results", records)
    info = model.info
    write_json(out / "run.json", {"config": to_dict(cfg), "info": {k: v for k, v in info.items() if k != "history"},
                                  "seconds": time.perf_counter() - t0})
    if info.get("history"):
        write_text(out / "history.jsonl", "".join(json.dumps(h) + "\n" for h in info["history"]))
    log("\n" + markdown_table(records))
    log(f"\nmodel saved to {out / 'model'}; results in {out / 'results'} ({time.perf_counter() - t0:.0f}s)")
    return {"records": records, "info": info, "model_dir": str(out / "model")}


__all__ = ["evaluate_model", "evaluate_saved", "run", "train_model"]
