"""Evaluation: zero-shot classification and retrieval on cached features, with CLIP_benchmark's metric
names (:mod:`.metrics`) and records (:mod:`unialign.results`), and the early-stopping validator."""
from .metrics import retrieval_chance, retrieval_scores, zero_shot_chance, zero_shot_hits, zero_shot_scores
from .tasks import (EvalConfig, ZeroShotSet, class_names_and_labels, classification, evaluate_split, retrieval,
                    validator, zero_shot_predictions, zero_shot_set, zero_shot_sets)

__all__ = ["EvalConfig", "ZeroShotSet", "class_names_and_labels", "classification", "evaluate_split", "retrieval",
           "retrieval_chance", "retrieval_scores", "validator", "zero_shot_chance", "zero_shot_hits",
           "zero_shot_predictions", "zero_shot_scores", "zero_shot_set", "zero_shot_sets"]
