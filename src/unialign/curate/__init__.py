"""Training-subset curation on cached features: Freeze-Align's concept-rich selection (rarest concept
first, then a diversity fill) and near-duplicate removal. Pure array code: no encoder is loaded here;
callers pass pool features and concept prototype embeddings. ``curate_dataset`` (command.py) wires
it to a dataset's cached features and the configured encoders (``unialign curate``)."""
from __future__ import annotations

from .concepts import (
    Assignment,
    CurateInputError,
    CurateOptionError,
    CurationResult,
    assign_rarest_first,
    curate,
    fill_diverse,
    load_subset,
    report_path,
    score_pool,
)
from .dedup import dedup_pairs, near_duplicates
from .command import DatasetCuration, curate_dataset

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
    "load_subset",
    "near_duplicates",
    "report_path",
    "score_pool",
]
