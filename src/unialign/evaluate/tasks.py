"""Evaluation tasks on cached features: zero-shot classification and retrieval.

They take callables rather than a model object so this stage needs nothing from later stages:
``project_image(features) -> normalised embeddings`` and ``embed_prompts(list[str]) -> normalised
embeddings`` (the text encoder + text head, run live on the prompts).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from .metrics import class_embeddings, retrieval_chance, retrieval_scores, zero_shot_chance, zero_shot_scores
from .report import record

Projector = Callable[[np.ndarray], torch.Tensor]


def zero_shot(project_image: Projector, embed_prompts: Callable[[list[str]], torch.Tensor], image_feats: np.ndarray,
              labels: Sequence[int], class_names: Sequence[str], templates: Sequence[str]) -> tuple[dict[str, float], dict[str, float]]:
    """Scores and chance levels of zero-shot classification among ``class_names``."""
    weights = zero_shot_weights(embed_prompts, class_names, templates)
    return zero_shot_scores(project_image(image_feats), weights, labels), zero_shot_chance(labels, len(class_names))


def zero_shot_weights(embed_prompts: Callable[[list[str]], torch.Tensor], class_names: Sequence[str],
                      templates: Sequence[str]) -> torch.Tensor:
    """One embedding per class: every template filled with the class name, embedded, averaged (CLIP)."""
    prompts = [t.format(c) for c in class_names for t in templates]
    return class_embeddings(embed_prompts(prompts).view(len(class_names), len(templates), -1))


def retrieval(project_image: Projector, project_text: Projector, image_feats: np.ndarray, text_feats: np.ndarray,
              text_to_image: Sequence[int], ks: Sequence[int] = (1, 5, 10)) -> tuple[dict[str, float], dict[str, float]]:
    return (retrieval_scores(project_image(image_feats), project_text(text_feats), text_to_image, ks),
            retrieval_chance(len(image_feats), text_to_image, ks))


def classification_record(name: str, model: str, pretrained: str, scores: dict[str, float], chance: dict[str, float],
                          n: int, n_classes: int) -> dict[str, Any]:
    return record(name, model, pretrained, "zeroshot_classification", scores, chance, n_samples=n, n_classes=n_classes)


def retrieval_record(name: str, model: str, pretrained: str, scores: dict[str, float], chance: dict[str, float],
                     n_images: int, n_texts: int) -> dict[str, Any]:
    return record(name, model, pretrained, "zeroshot_retrieval", scores, chance, n_images=n_images, n_texts=n_texts)
