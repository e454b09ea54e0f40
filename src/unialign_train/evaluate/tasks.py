"""Evaluation on cached features: zero-shot classification and retrieval between the aligned modalities,
as CLIP_benchmark records, and the validation score that stops training early.

Every function takes the modalities by name, so the same code scores image-text, audio-text or
vector-text models. Classification needs a text side (class names become prompts); retrieval runs
between the two aligned modalities of datasets whose records are not just class members (a labelled
set such as Fashion-MNIST has one identical caption per class, so retrieval there says nothing).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator

from unialign.model import AlignedModel
from unialign.results import record
from unialign.zeroshot import TEMPLATES, get_templates, zero_shot_classifier

from ..data.records import Dataset
from ..features.cache import Cached
from ..features.texts import encode_texts
from .metrics import retrieval_chance, retrieval_scores, zero_shot_chance, zero_shot_scores


class ZeroShotSet(BaseModel):
    """An extra zero-shot classification set scored after the held-out split (e.g. Fashion-MNIST)."""

    model_config = ConfigDict(extra="forbid")

    dataset: str
    templates: str
    limit: PositiveInt | None = Field(description="a class-balanced subset of this many records (null: all)")

    @field_validator("templates")
    @classmethod
    def _templates(cls, v: str) -> str:
        get_templates(v)
        return v


class EvalConfig(BaseModel):
    """The ``eval`` section of a run configuration."""

    model_config = ConfigDict(extra="forbid")

    templates: str = Field(description=f"prompt templates of the held-out split: {', '.join(TEMPLATES)}")
    retrieval_ks: list[PositiveInt]
    zero_shot_sets: dict[str, ZeroShotSet] = Field(description="extra zero-shot sets by result name")

    @field_validator("templates")
    @classmethod
    def _templates(cls, v: str) -> str:
        get_templates(v)
        return v


def zero_shot_set(zs: ZeroShotSet) -> Dataset:
    """The records a zero-shot set scores: the whole dataset, or its class-balanced ``limit`` (seeded)."""
    from ..data import balanced_subset, load_dataset

    ds = load_dataset(zs.dataset)
    return balanced_subset(ds, zs.limit, seed=0) if zs.limit else ds


def zero_shot_sets(sets: dict[str, ZeroShotSet], align: Sequence[str], log: Callable[[str], None] = print
                   ) -> list[tuple[str, ZeroShotSet, Dataset, str]]:
    """(name, set, records, query modality) of each zero-shot set a model aligning ``align`` can score:
    one whose records carry the model's non-text modality; the others are skipped with a log line."""
    query = [m for m in align if m != "text"]
    usable = []
    for name, zs in sets.items():
        ds = zero_shot_set(zs)
        if len(query) != 1 or query[0] not in ds.modalities:
            log(f"zero-shot set {name} skipped: it has no {' or '.join(query) or 'non-text'} items")
            continue
        usable.append((name, zs, ds, query[0]))
    return usable


def class_names_and_labels(ds: Dataset, kept: Sequence[int]) -> tuple[list[str], list[int]]:
    """The zero-shot classes of an evaluation split and each record's class index: all classes of a
    labelled set, else the concepts present in the split (in first-appearance order)."""
    labels_of = ds.concept_labels()
    concepts = list(ds.classes) if ds.classes is not None else list(dict.fromkeys(ds.records[i]["concept"] for i in kept))
    cid = {c: j for j, c in enumerate(concepts)}
    return [labels_of.get(c, c) for c in concepts], [cid[ds.records[i]["concept"]] for i in kept]


def zero_shot_predictions(model: AlignedModel, cached: Cached, indices: Sequence[int], modality: str,
                          templates: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, list[str], list[int], np.ndarray]:
    """(embeddings, class weights, class names, labels, record indices kept) of a zero-shot split."""
    feats, kept = cached[modality].record_features(indices)
    names, labels = class_names_and_labels(cached.dataset, kept)
    return model.project(modality, feats), class_weights(model, names, templates), names, labels, kept


def class_weights(model: AlignedModel, names: Sequence[str], templates: str | Sequence[str]) -> torch.Tensor:
    """``model.class_embeddings(names, templates)``, bit for bit, with the prompts' raw text features
    from the prompt cache (:mod:`unialign_train.features.texts`): a protocol scores the same prompts in
    every run, so a run on cached features need not run the text encoder at all."""
    enc, layers = model.text_encoder, model.layers["text"]
    return zero_shot_classifier(lambda p: model.project("text", encode_texts(enc, p, layers), normalize=False),
                                names, get_templates(templates))


def classification(model: AlignedModel, cached: Cached, indices: Sequence[int], modality: str, name: str,
                   templates: str | Sequence[str], model_name: str, pretrained: str) -> dict[str, Any]:
    """Zero-shot classification of ``modality`` items among the split's classes, as a CB record."""
    emb, weights, names, labels, kept = zero_shot_predictions(model, cached, indices, modality, templates)
    return record(name, model_name, pretrained, "zeroshot_classification", zero_shot_scores(emb, weights, labels),
                  zero_shot_chance(labels, len(names)), n_samples=len(kept), n_classes=len(names), modality=modality)


def retrieval(model: AlignedModel, cached: Cached, indices: Sequence[int], x: str, y: str, name: str,
              ks: Sequence[int], model_name: str, pretrained: str) -> dict[str, Any] | None:
    """Retrieval between each record's first ``x`` item and all its ``y`` items, as a CB record (None
    when the split has no y items)."""
    feats, kept = cached[x].record_features(indices)
    Y = cached[y]
    y_rows = [Y.rows(int(i)) for i in kept]
    y_to_x = np.repeat(np.arange(len(kept)), [len(r) for r in y_rows])
    if not len(y_to_x):
        return None
    emb_x = model.project(x, feats)
    emb_y = model.project(y, Y.features[np.concatenate(y_rows)])
    return record(name, model_name, pretrained, "zeroshot_retrieval", retrieval_scores(emb_x, emb_y, y_to_x, ks, (x, y)),
                  retrieval_chance(len(kept), y_to_x, ks, (x, y)), **{f"n_{x}": len(kept), f"n_{y}": int(len(y_to_x))})


def evaluate_split(model: AlignedModel, cached: Cached, indices: Sequence[int], name: str, modalities: Sequence[str],
                   templates: str | Sequence[str], ks: Sequence[int], model_name: str, pretrained: str
                   ) -> list[dict[str, Any]]:
    """Zero-shot classification of the non-text modality (when the other is text) and retrieval between
    the two, on one split."""
    x, y = modalities
    records = []
    if "text" in modalities and x != y:
        query = x if y == "text" else y
        records.append(classification(model, cached, indices, query, name, templates, model_name, pretrained))
    if cached.dataset.classes is None and x in cached and y in cached:
        rec = retrieval(model, cached, indices, x, y, name, ks, model_name, pretrained)
        if rec is not None:
            records.append(rec)
    return records


def validator(cached: Cached, text_encoder: Any, text_layers: Sequence[str], indices: Sequence[int], modality: str,
              templates: str | Sequence[str]) -> Callable[[torch.nn.ModuleDict], dict[str, float]]:
    """Zero-shot accuracy among the validation concepts for early stopping: ``modality`` items from the
    cache, the prompts' raw features encoded once here, both projected by the towers being trained."""
    feats, kept = cached[modality].record_features(indices)
    names, labels = class_names_and_labels(cached.dataset, kept)
    temps = get_templates(templates)
    prompts = [t.format(c) for c in names for t in temps]
    raw = dict(zip(prompts, text_encoder.encode(prompts, batch_size=256, convert_to_numpy=False, layers=list(text_layers))))
    x = torch.from_numpy(feats)

    @torch.no_grad()
    def validate(towers: torch.nn.ModuleDict) -> dict[str, float]:
        dev = next(iter(towers[modality].state_dict().values())).device  # heads and closed-form maps alike
        img = F.normalize(towers[modality](x.to(dev)).float(), dim=-1).cpu()
        encode = lambda ps: towers["text"](torch.stack([raw[p] for p in ps]).to(dev)).float().cpu()  # noqa: E731
        s = zero_shot_scores(img, zero_shot_classifier(encode, names, temps), labels)
        return {"val_acc1": s["acc1"], "val_acc5": s["acc5"], "score": (s["acc1"] + s["acc5"]) / 2}

    return validate


__all__ = ["EvalConfig", "ZeroShotSet", "class_names_and_labels", "class_weights", "classification", "evaluate_split",
           "retrieval", "validator", "zero_shot_predictions", "zero_shot_set"]
