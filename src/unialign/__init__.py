"""unialign: turn frozen unimodal encoders into one multimodal, CLIP-style model.

This package is the lean inference core: a saved :class:`AlignedModel`, the encoders it wraps, its
projections, the zero-shot classifier and search. It needs torch, numpy, safetensors and the encoders'
own packages; training, the pipeline and the feature store live in ``unialign_train``
(``pip install unialign[train]``), the command line in ``unialign_cli`` and the server in
``unialign_serve``. Names are imported lazily so ``import unialign`` stays fast.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_LAZY = {
    "AlignedModel": "unialign.model",
    "load_encoder": "unialign.encoders",
    "create_model_and_transforms": "unialign.openclip",
    "zero_shot_classifier": "unialign.zeroshot",
    "get_templates": "unialign.zeroshot",
    "TEMPLATES": "unialign.zeroshot",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'unialign' has no attribute {name!r}")
