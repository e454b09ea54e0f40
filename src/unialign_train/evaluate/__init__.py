"""Evaluation: zero-shot classification and retrieval on cached features, with CLIP_benchmark's metric
names (:mod:`.metrics`) and records (:mod:`unialign.results`), and the early-stopping validator; the
metrics of fusion heads and of image-text consistency detection."""
from .metrics import (binary_auc, expected_calibration_error, logit_scores, precision_recall_f1, ranking_scores,
                      regression_scores, retrieval_chance, retrieval_scores, zero_shot_chance, zero_shot_hits,
                      zero_shot_scores)
from .tasks import (EvalConfig, ZeroShotSet, class_names_and_labels, classification, evaluate_split, retrieval,
                    validator, zero_shot_predictions, zero_shot_set, zero_shot_sets)

__all__ = ["EvalConfig", "ZeroShotSet", "binary_auc", "class_names_and_labels", "classification", "evaluate_split",
           "expected_calibration_error", "logit_scores", "precision_recall_f1", "ranking_scores", "regression_scores",
           "retrieval", "retrieval_chance", "retrieval_scores", "validator", "zero_shot_chance", "zero_shot_hits",
           "zero_shot_predictions", "zero_shot_scores", "zero_shot_set", "zero_shot_sets"]
