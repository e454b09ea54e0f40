"""Choosing encoders and layers before training: similarity metrics and the ranked report.

- :mod:`.metrics`: mutual kNN, linear / RBF / unbiased CKA, CKNNA, SVCCA and the permutation-null calibration;
- :mod:`.selection`: ``select(...)`` scores every (encoder, layer) x (encoder, layer) combination of two
  modalities on a sample of pairs, writes heatmaps and a JSON report, and names the ``unialign run``
  command for the best. SAIL's alignment probe (a short training) is a metric registered by the align
  stage (:mod:`unialign_train.align.probe`).

Heavy pieces (encoders, matplotlib) are imported inside the functions that need them.
"""
from .metrics import METRICS, calibrate, cknna, linear_cka, mutual_knn, rbf_cka, register_metric, rice_k, score_all, svcca, unbiased_cka
from .layer_names import AUTO, auto_candidates, auto_sets, resolve_layer_names
from .selection import Selection, score_grid, select, select_metrics

__all__ = ["AUTO", "METRICS", "Selection", "auto_candidates", "auto_sets", "resolve_layer_names", "calibrate", "cknna", "linear_cka", "mutual_knn", "rbf_cka", "register_metric",
           "rice_k", "score_all", "score_grid", "select", "select_metrics", "svcca", "unbiased_cka"]
