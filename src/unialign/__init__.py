"""unialign: align frozen unimodal encoders into one CLIP-style multimodal model.

The public API mirrors the pipeline: data -> encoders -> features -> align -> evaluate -> model.
Heavy modules are imported lazily so ``import unialign`` stays fast.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "AlignedModel": "unialign.model",
    "load_encoder": "unialign.encoders",
    "load_dataset": "unialign.data",
    "PairDataset": "unialign.data.base",
    "extract": "unialign.features.extract",
    "FeatureStore": "unialign.features.store",
    "train": "unialign.align.train",
    "TrainConfig": "unialign.align.train",
    "RECIPES": "unialign.align.recipes",
    "load_config": "unialign.config",
    "run": "unialign.pipeline",
    "create_model_and_transforms": "unialign.interop",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'unialign' has no attribute {name!r}")
