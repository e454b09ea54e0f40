"""The main job, stage by stage: data -> features -> align -> evaluate -> saved model.

``run(cfg)`` is what ``unialign run`` does. Each step is a function of its own so the CLI's
``train`` and ``eval`` commands, the benchmarks and users' scripts can call the same pieces.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .align.data import Features, Pairs
from .align.recipes import Recipe, get_recipe, train_config
from .align.train import TrainResult, train
from .config import RunConfig, to_dict
from .data import PairDataset, build_fashion_mnist, load_dataset, split_concepts
from .encoders import load_encoder
from .encoders.base import Encoder
from .errors import ConfigError, DataError
from .evaluate import tasks
from .evaluate.metrics import zero_shot_scores, class_embeddings
from .evaluate.report import markdown_table, write_results
from .evaluate.templates import get_templates
from .features.extract import extract
from .features.store import FeatureStore
from .io import write_json, write_text
from .model import AlignedModel, ClosedFormProjection

EMOJI_TRAIN_STYLES = ["google", "twitter", "openmoji"]
EMOJI_TEST_STYLES = ["apple"]
Log = Callable[[str], None]


@dataclass
class Cached:
    """A dataset with its cached features for one encoder pair (text side optional)."""

    dataset: PairDataset
    image_store: FeatureStore
    image: Features
    image_row: np.ndarray  # dataset index -> image feature row (-1: skipped)
    text_store: FeatureStore | None = None
    text: Features | None = None
    text_row: dict[str, int] | None = None  # caption -> text feature row

    def image_feats(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Features of the given dataset items that have them, and which items those were."""
        rows = self.image_row[indices]
        keep = rows >= 0
        return self.image[rows[keep]], indices[keep]


def cache_features(dataset: PairDataset, image_encoder: Encoder, text_encoder: Encoder | None, cfg: RunConfig,
                   log: Log = print) -> Cached:
    """Extract (or reuse) the image store and, if a text encoder is given, the caption store."""
    e = cfg.encoders
    kw = dict(batch_size=e.batch_size, dtype=e.dtype, strict=e.strict)
    t0 = time.perf_counter()
    istore = extract(dataset, image_encoder, layers=e.image_layers, num_workers=e.num_workers, **kw)
    image_row = np.full(len(dataset), -1, dtype=np.int64)
    image_row[istore.index] = np.arange(len(istore))
    if istore.skipped:
        log(f"{dataset.name}: {len(istore.skipped)} image(s) skipped (listed in {istore.root}/manifest.json)")
    cached = Cached(dataset, istore, Features([istore.array(l) for l in e.image_layers], e.image_layers), image_row)
    if text_encoder is not None:
        tstore = extract(dataset, text_encoder, layers=e.text_layers, **kw)
        cached.text_store = tstore
        cached.text = Features([tstore.array(l) for l in e.text_layers], e.text_layers)
        cached.text_row = {t: i for i, t in enumerate(tstore.texts())}
    log(f"features for {dataset.name} ready in {time.perf_counter() - t0:.1f}s "
        f"({len(istore)} images{f', {len(cached.text_row)} captions' if cached.text_row else ''})")
    return cached


def make_pairs(cached: Cached, indices: np.ndarray) -> Pairs:
    """Training pairs of the given dataset items; ``groups`` = concept, so same-concept pairs are not
    contrasted as negatives."""
    ds, rows = cached.dataset, cached.image_row
    concept_id = {c: i for i, c in enumerate(ds.concepts())}
    keep = [int(i) for i in indices if rows[i] >= 0]
    text_rows = [[cached.text_row[c] for c in ds.captions(i) if c in cached.text_row] for i in keep]
    return Pairs.from_lists(rows[keep].tolist(), text_rows, [concept_id[ds.records[i]["concept"]] for i in keep])


@dataclass
class Splits:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    concepts: dict[str, list[str]]


def make_splits(ds: PairDataset, cfg: RunConfig) -> Splits:
    """Concept split (train/val/test concepts disjoint); training and validation in the training
    styles, test in the held-out styles (all styles for datasets without them)."""
    d = cfg.data
    concepts = split_concepts(ds.concepts(), d.split, d.split_seed)
    if d.max_train_concepts is not None:  # a seeded random draw: the sorted prefix would be all flags
        rng = np.random.default_rng([d.split_seed, 1])
        n = min(d.max_train_concepts, len(concepts["train"]))
        concepts["train"] = sorted(rng.choice(concepts["train"], size=n, replace=False).tolist())
    train_styles, test_styles = split_styles(ds, cfg)
    sp = Splits(ds.indices(styles=train_styles, concepts=concepts["train"]),
                ds.indices(styles=train_styles, concepts=concepts["val"]),
                ds.indices(styles=test_styles, concepts=concepts["test"]), concepts)
    if d.subset:
        from .curate import load_subset

        sp.train = np.intersect1d(sp.train, load_subset(d.subset))
    for name in ("train", "val", "test"):
        if len(getattr(sp, name)) == 0:
            raise DataError(f"the {name} split of {ds.name} is empty (styles {train_styles if name != 'test' else test_styles}); "
                            "check data.split, data.train_styles and data.test_styles")
    return sp


def split_styles(ds: PairDataset, cfg: RunConfig) -> tuple[list[str] | None, list[str] | None]:
    d = cfg.data
    is_emoji = ds.name == "emoji"
    train_s = d.train_styles if d.train_styles is not None else (EMOJI_TRAIN_STYLES if is_emoji else None)
    test_s = d.test_styles if d.test_styles is not None else (EMOJI_TEST_STYLES if is_emoji else None)
    present = set(ds.column("style"))
    for key, styles in (("data.train_styles", train_s), ("data.test_styles", test_s)):
        missing = sorted(set(styles or []) - present)
        if missing:
            raise ConfigError(f"{key}: style(s) {missing} not in dataset {ds.name}; it has {sorted(present)}")
    return (train_s or None), (test_s or None)


def prompt_features(encoder: Encoder, layers: Sequence[str], class_names: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """Raw text-encoder features of every (class, template) prompt, class-major."""
    prompts = [t.format(c) for c in class_names for t in templates]
    return encoder.encode(prompts, batch_size=256, convert_to_numpy=True, layers=list(layers))


def fit_projection(cached: Cached, pairs: Pairs, recipe: Recipe, cfg: RunConfig,
                   validate: Callable[[Any], dict[str, float]] | None, checkpoint: Path | None,
                   log: Log = print) -> tuple[Any, float, dict[str, Any]]:
    """Train heads, or fit a closed-form map, on the training pairs. Returns (projection, logit scale, info)."""
    if recipe.trained:
        tcfg = train_config(recipe, cfg.train, device=cfg.device)
        res: TrainResult = train(cached.image, cached.text, pairs, tcfg, validate, checkpoint, log)
        info = {"recipe": recipe.name, "train_config": to_dict(tcfg), "history": res.history, "best_step": res.best_step,
                "steps": res.steps, "train_seconds": res.seconds, "parameters": res.parameters, "n_pairs": len(pairs)}
        return res.model, float(res.loss.scale().item()), info
    from .align.closed_form import make_closed_form

    params = {**recipe.params, **cfg.train.get("params", {})}
    t0 = time.perf_counter()
    aligner = make_closed_form(recipe.closed_form, **params)
    n_caps = pairs.n_captions()
    img_rows = np.repeat(pairs.image_rows, n_caps)  # one anchor per (image, caption) pair
    aligner.fit(cached.image[img_rows], cached.text[pairs.text_flat], groups=np.repeat(pairs.groups, n_caps))
    info = {"recipe": recipe.name, "params": params, "train_seconds": time.perf_counter() - t0, "n_pairs": len(img_rows)}
    removed = getattr(aligner, "removed_rank", 0)
    if removed:
        info["nuisance_directions_removed"] = removed
    log(f"fitted {recipe.closed_form} on {len(img_rows)} pairs in {info['train_seconds']:.2f}s"
        + (f" ({removed} within-concept image directions removed)" if removed else ""))
    return ClosedFormProjection(aligner), 100.0, info


def validator(cached: Cached, text_encoder: Encoder, indices: np.ndarray, cfg: RunConfig) -> Callable[[Any], dict[str, float]]:
    """Zero-shot accuracy among the validation concepts, from cached image features and prompt features
    encoded once; used for early stopping and nothing else."""
    ds = cached.dataset
    feats, kept = cached.image_feats(indices)
    concepts = list(dict.fromkeys(ds.records[i]["concept"] for i in kept))
    cid = {c: j for j, c in enumerate(concepts)}
    labels = torch.tensor([cid[ds.records[i]["concept"]] for i in kept])
    labels_of = ds.concept_labels()
    names = [labels_of[c] for c in concepts]
    temps = get_templates(cfg.eval.templates)
    pfeats = torch.from_numpy(prompt_features(text_encoder, cfg.encoders.text_layers, names, temps))
    x = torch.from_numpy(feats)

    @torch.no_grad()
    def validate(heads: Any) -> dict[str, float]:
        dev = next(heads.parameters()).device
        img = torch.nn.functional.normalize(heads.project_image(x.to(dev)).float(), dim=-1).cpu()
        txt = torch.nn.functional.normalize(heads.project_text(pfeats.to(dev)).float(), dim=-1).cpu()
        s = zero_shot_scores(img, class_embeddings(txt.view(len(names), len(temps), -1)), labels)
        return {"val_acc1": s["acc1"], "val_acc5": s["acc5"], "score": (s["acc1"] + s["acc5"]) / 2}

    return validate


def class_names_and_labels(ds: PairDataset, kept: Sequence[int]) -> tuple[list[str], list[int]]:
    """The zero-shot classes of an evaluation split and each item's class index: all classes of a
    labelled set, else the concepts present in the split (in first-appearance order)."""
    labels_of = ds.concept_labels()
    concepts = list(ds.classes) if ds.classes is not None else list(dict.fromkeys(ds.records[i]["concept"] for i in kept))
    cid = {c: j for j, c in enumerate(concepts)}
    return [labels_of.get(c, c) for c in concepts], [cid[ds.records[i]["concept"]] for i in kept]


def evaluate_split(model: AlignedModel, cached: Cached, indices: np.ndarray, name: str, templates: Sequence[str],
                   ks: Sequence[int], model_name: str, pretrained: str) -> list[dict[str, Any]]:
    """Zero-shot classification among the split's concepts, and retrieval with all their captions."""
    ds = cached.dataset
    feats, kept = cached.image_feats(indices)
    project_img = model.project_image_features
    embed = lambda prompts: model.encode_text(prompts, batch_size=256, convert_to_numpy=False)  # noqa: E731
    records = []
    names, labels = class_names_and_labels(ds, kept)
    scores, chance = tasks.zero_shot(project_img, embed, feats, labels, names, templates)
    records.append(tasks.classification_record(name, model_name, pretrained, scores, chance, len(kept), len(names)))
    if cached.text_row is not None and ds.classes is None:
        t_rows, t2i = [], []
        for j, i in enumerate(kept):
            for c in ds.captions(i):
                if c in cached.text_row:
                    t_rows.append(cached.text_row[c])
                    t2i.append(j)
        if t_rows:
            scores, chance = tasks.retrieval(project_img, model.project_text_features, feats,
                                             cached.text[np.asarray(t_rows)], t2i, ks)
            records.append(tasks.retrieval_record(name, model_name, pretrained, scores, chance, len(kept), len(t_rows)))
    return records


def train_model(cfg: RunConfig, log: Log = print) -> tuple[AlignedModel, Cached, Splits, dict[str, Any]]:
    """Data, features, splits and the fitted projection, as an AlignedModel (not yet evaluated)."""
    recipe = get_recipe(cfg.recipe)
    ds = load_dataset(cfg.data.dataset)
    img_enc = load_encoder(cfg.encoders.image, device=cfg.device)
    txt_enc = load_encoder(cfg.encoders.text, device=cfg.device)
    for enc, layers in ((img_enc, cfg.encoders.image_layers), (txt_enc, cfg.encoders.text_layers)):
        enc.check_layers(layers)
    cached = cache_features(ds, img_enc, txt_enc, cfg, log)
    splits = make_splits(ds, cfg)
    pairs = make_pairs(cached, splits.train)
    log(f"split by concept: {len(splits.concepts['train'])}/{len(splits.concepts['val'])}/{len(splits.concepts['test'])} "
        f"train/val/test concepts; {len(pairs)} training images, {int(pairs.n_captions().sum())} captions")
    validate = validator(cached, txt_enc, splits.val, cfg) if recipe.trained else None
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    projection, scale, info = fit_projection(cached, pairs, recipe, cfg, validate, out / "checkpoint.pt", log)
    info.update(dataset=ds.name, dataset_fingerprint=ds.fingerprint(), split_seed=cfg.data.split_seed,
                data_config=to_dict(cfg.data), eval_config=to_dict(cfg.eval))  # so `unialign eval` re-uses the protocol
    model = AlignedModel(img_enc, txt_enc, projection, cfg.encoders.image_layers, cfg.encoders.text_layers, scale, info)
    return model, cached, splits, info


def evaluate_model(model: AlignedModel, cfg: RunConfig, cached: Cached, splits: Splits, log: Log = print) -> list[dict[str, Any]]:
    """The default protocol: held-out concepts (in held-out styles), plus Fashion-MNIST zero-shot."""
    name = cfg.name
    ks = cfg.eval.retrieval_ks
    records = evaluate_split(model, cached, splits.test, test_tag(cached.dataset, cfg), get_templates(cfg.eval.templates),
                             ks, name, cfg.output)
    if cfg.eval.fashion_mnist:
        fm = fashion_mnist_eval_set(cfg)
        fcached = cache_features(fm, model.image_encoder, None, cfg, log)
        records += evaluate_split(model, fcached, np.arange(len(fm)), "fashion-mnist", get_templates(cfg.eval.fashion_templates),
                                  ks, name, cfg.output)
    return records


def test_tag(ds: PairDataset, cfg: RunConfig) -> str:
    """The dataset name of the test records, e.g. ``emoji-test-apple``."""
    test_styles = split_styles(ds, cfg)[1]
    return f"{ds.name}-test" + (f"-{'+'.join(test_styles)}" if test_styles else "")


def fashion_mnist_eval_set(cfg: RunConfig) -> PairDataset:
    """The Fashion-MNIST test images the protocol scores: all 10k, or the balanced ``eval.fashion_mnist_limit``."""
    fm = build_fashion_mnist("test")
    return balanced_subset(fm, cfg.eval.fashion_mnist_limit, seed=0) if cfg.eval.fashion_mnist_limit else fm


def balanced_subset(ds: PairDataset, n: int, seed: int = 0) -> PairDataset:
    """About ``n`` records, the same number per concept, chosen with a seeded generator."""
    rng = np.random.default_rng(seed)
    concepts = ds.concepts()
    per = max(1, n // len(concepts))
    pick = [rng.permutation(ds.indices(concepts=[c]))[:per] for c in concepts]
    sub = ds.subset(np.sort(np.concatenate(pick)))
    sub.name = f"{ds.name}-{len(sub)}"
    return sub


def run(cfg: RunConfig, log: Log = print) -> dict[str, Any]:
    """The whole job; writes ``<output>/model``, ``<output>/results`` and prints the results table."""
    t0 = time.perf_counter()
    out = Path(cfg.output)
    model, cached, splits, info = train_model(cfg, log)
    records = evaluate_model(model, cfg, cached, splits, log)
    model.save(out / "model", results={"records": records})
    write_results(out / "results", records)
    write_json(out / "run.json", {"config": to_dict(cfg), "info": {k: v for k, v in info.items() if k != "history"},
                                  "seconds": time.perf_counter() - t0})
    if info.get("history"):
        write_text(out / "history.jsonl", "".join(json.dumps(h) + "\n" for h in info["history"]))
    table = markdown_table(records)
    log("\n" + table)
    log(f"\nmodel saved to {out / 'model'}; results in {out / 'results'} ({time.perf_counter() - t0:.0f}s)")
    return {"records": records, "info": info, "model_dir": str(out / "model")}
