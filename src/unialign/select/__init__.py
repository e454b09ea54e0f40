"""Choosing encoders and layers before training: similarity metrics, SAIL-style probing, the ranked report.

- :mod:`.metrics`: mutual kNN, linear / RBF / unbiased CKA, CKNNA, SVCCA and the permutation-null calibration;
- :mod:`.probe`: a short linear-head training read out as held-out retrieval (SAIL's alignment probe);
- :mod:`.selection`: ``select(...)`` scores every (image encoder, layer) x (text encoder, layer) combination on
  a sample of pairs, writes heatmaps and a JSON report, and names the ``unialign run`` command for the best.

Heavy pieces (encoders, matplotlib) are imported inside the functions that need them.
"""
from .metrics import METRICS, calibrate, cknna, linear_cka, mutual_knn, rbf_cka, rice_k, score_all, svcca, unbiased_cka
from .probe import ProbeResult, alignment_probe, probe
from .selection import SELECT_METRICS, Selection, score_grid, select

__all__ = [
    "METRICS",
    "ProbeResult",
    "SELECT_METRICS",
    "Selection",
    "alignment_probe",
    "calibrate",
    "cknna",
    "linear_cka",
    "mutual_knn",
    "probe",
    "rbf_cka",
    "rice_k",
    "score_all",
    "select",
    "score_grid",
    "svcca",
    "unbiased_cka",
]
