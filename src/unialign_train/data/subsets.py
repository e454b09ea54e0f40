"""Training subsets: a Parquet file whose ``row`` column lists dataset record indices.

``unialign curate`` writes them (with the concept, score and source of each row); ``data.subset`` in a
run configuration reads them back, and training keeps only those records of its training split.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from unialign.errors import DataError


def load_subset(path: str | Path) -> np.ndarray:
    """The record indices of a subset file (its ``row`` column)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: subset file does not exist")
    try:
        table = pq.read_table(path, columns=["row"])
    except Exception as e:  # pyarrow raises several types for a missing column / not-parquet file
        raise DataError(f"{path}: not a curated subset file ({type(e).__name__}: {e})") from None
    return table.column("row").to_numpy().astype(np.int64)


__all__ = ["load_subset"]
