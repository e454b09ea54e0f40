"""Training-subset curation on cached features: Freeze-Align's concept-rich selection (rarest concept
first, then a diversity fill) and near-duplicate removal. :mod:`.concepts` and :mod:`.dedup` are pure
array code (no encoder is loaded); :func:`curate_dataset` wires them to a dataset's cached features
(``unialign curate``)."""
from __future__ import annotations

from .concepts import (
    Assignment,
    CurateInputError,
    CurateOptionError,
    CurationResult,
    assign_rarest_first,
    curate,
    fill_diverse,
    report_path,
    score_pool,
)
from .dataset import DatasetCuration, curate_dataset
from .dedup import dedup_pairs, near_duplicates

__all__ = [
    "Assignment",
    "CurateInputError",
    "CurateOptionError",
    "CurationResult",
    "DatasetCuration",
    "assign_rarest_first",
    "curate",
    "curate_dataset",
    "dedup_pairs",
    "fill_diverse",
    "near_duplicates",
    "report_path",
    "score_pool",
]
