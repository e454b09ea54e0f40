"""``layers: {image: auto}``: the main job chooses which encoder layers to align, on validation.

The job extracts one store with the candidate layers (:func:`~unialign_train.select.auto_candidates`:
the embedding, the deepest intermediate layers and three shallow ones), then fits the run's own recipe
once per candidate set (``last-1`` = the embedding alone, ``last-2``, ... ``last-8``, and ``last-4`` /
``last-8`` with ``shallow-3``: :data:`~unialign_train.select.layer_names.AUTO_SETS`, resolved for the
encoder by :func:`~unialign_train.select.auto_sets`) and keeps the set with the best validation score, the
early-stopping score (mean of zero-shot top-1 and top-5 among the validation concepts).

Validation is built like the test when it can be: with two or more training styles, each fold fits on the
training records outside one training style and scores the validation concepts drawn in that style (a
held-out style as well as held-out concepts, as the test holds out both); the folds' scores are averaged.
With one style or none there is one fold: the training records, scored on the validation records.
Test records never enter. Only the chosen layers are read afterwards; the fit of the final model is the
run's usual one, on all training records.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .align import fit, get_recipe, make_pairs
from .data import Splits
from .evaluate import validator
from .features import Cached, Features, ModalityFeatures

Log = Callable[[str], None]


def with_layers(mf: ModalityFeatures, names: Sequence[str]) -> ModalityFeatures:
    """The same records and rows, reading only the layers ``names`` of the features (no copy)."""
    idx = [mf.features.names.index(n) for n in names]
    return ModalityFeatures(mf.modality, mf.store, Features([mf.features.arrays[i] for i in idx], list(names),
                                                            mf.features.steps),
                            mf.offsets, mf.flat)


def validation_folds(cached: Cached, splits: Splits) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, training records, validation records) per fold (module doc): one fold per training style
    when there are at least two, else the plain train / validation split."""
    ds = cached.dataset
    styles = splits.train_styles or []
    folds = []
    if len(styles) >= 2:
        for s in styles:
            held = set(ds.indices(styles=[s]).tolist())
            train = np.array([i for i in splits.train if int(i) not in held], dtype=np.int64)
            val = np.array([i for i in splits.val if int(i) in held], dtype=np.int64)
            if len(train) and len(val):
                folds.append((f"held-out style {s}", train, val))
    return folds or [("validation concepts", np.asarray(splits.train), np.asarray(splits.val))]


def choose_layers(cached: Cached, splits: Splits, recipe_name: str, overrides: dict[str, Any] | None,
                  align: Sequence[str], modality: str, text_encoder: Any, text_layers: Sequence[str],
                  templates: str | Sequence[str], sets: Mapping[str, Sequence[str]], device: str = "cpu",
                  log: Log = print, layer_weights: Mapping[str, float] | None = None
                  ) -> tuple[list[str], list[dict[str, Any]]]:
    """The best of the candidate layer sets ``sets`` (name -> layers, e.g. ``auto_sets(encoder)``) of
    ``modality``, whose candidate store ``cached`` holds, and the table of every set's validation
    scores, best first. ``align`` names the two modalities; one of
    them must be text (the score is zero-shot classification of the other one). Each set is fitted
    as the run will fit it (``layer_weights`` included), except that a recipe's unpaired data are left
    out: the sets are compared on their paired fits."""
    x, y = align
    if "text" not in align or x == y:
        raise ValueError(f"layers auto scores zero-shot classification, which needs text among {list(align)}")
    query = x if y == "text" else y
    recipe = get_recipe(recipe_name)
    full = cached[modality]
    folds = validation_folds(cached, splits)
    text = _MemoText(text_encoder)  # every fold and layer set scores the same prompts: encode them once
    rows = []
    for spec, names in sets.items():
        names = list(names)
        cached.modalities[modality] = with_layers(full, names)
        try:
            tl = names if modality == "text" else text_layers
            scores = []
            for (_, train, val) in folds:
                validate = validator(cached, text, tl, val, query, templates)  # reads this layer set's features
                pairs = make_pairs(cached, train, x, y)
                torch.manual_seed(0)
                fitted = fit(recipe, overrides, cached[x].features, cached[y].features, pairs, align,
                             validate if recipe.trained else None, None, device, lambda *_: None,
                             layer_weights=layer_weights)
                scores.append(validate(torch.nn.ModuleDict(fitted.projections)))
        finally:
            cached.modalities[modality] = full
        row = {"set": spec, "layers": names, **{k: float(np.mean([s[k] for s in scores])) for k in scores[0]}}
        log(f"layers auto: {modality} {spec} ({', '.join(names)}): validation acc1 {100 * row['val_acc1']:.1f} "
            f"acc5 {100 * row['val_acc5']:.1f} over {len(folds)} fold(s)")
        rows.append(row)
    rows.sort(key=lambda r: -r["score"])
    return list(rows[0]["layers"]), rows


class _MemoText:
    """A text encoder's ``encode`` that encodes each (prompt, layers) once."""

    def __init__(self, encoder: Any):
        self.encoder, self.memo = encoder, {}

    def encode(self, texts: Sequence[str], layers: Sequence[str] = ("final",), **kw: Any) -> torch.Tensor:
        key = tuple(layers)
        todo = list(dict.fromkeys(t for t in texts if (t, key) not in self.memo))
        if todo:
            out = torch.as_tensor(self.encoder.encode(todo, **{**kw, "convert_to_numpy": False}, layers=list(layers)))
            self.memo.update({(t, key): row for t, row in zip(todo, out)})
        return torch.stack([self.memo[(t, key)] for t in texts])


__all__ = ["choose_layers", "validation_folds", "with_layers"]
