"""Text features of strings that belong to no dataset (zero-shot prompts), kept on disk like a store.

Every run of a protocol scores the same class prompts (1528 for the emoji test split, 90 for
Fashion-MNIST), and encoding them was the only use of the text encoder in a run whose record features
are cached. :func:`encode_texts` keeps each call's output whole, float32 as computed, so a cached run
gets back exactly what :meth:`Encoder.encode` would return, bit for bit, without running (or, for a
lazily loaded encoder, even loading) the text model. The key is what the output depends on: the
encoder's config (spec, weights version, backend), the layers, the batch size (batches are padded to
their longest text, so batch composition is part of the computation) and the texts themselves.

Files: ``$UNIALIGN_HOME/features/texts/<encoder>-<sha256>.npy``, written atomically; a file that does
not load as the expected float32 matrix is recomputed (with a warning naming it) and replaced.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from unialign import paths
from unialign.encoders.base import Encoder
from unialign.io import atomic_path


def texts_path(encoder: Encoder, texts: Sequence[str], layers: Sequence[str], batch_size: int) -> Path:
    """The cache file of one ``encode`` call: a new name whenever any of its inputs changes."""
    key = {"encoder": encoder.config(), "layers": list(layers), "batch_size": int(batch_size), "texts": list(texts)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:20]
    return paths.features_dir() / "texts" / f"{paths.slug(encoder.spec)}-{digest}.npy"


def encode_texts(encoder: Encoder, texts: Sequence[str], layers: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """``encoder.encode(texts, batch_size, layers=layers)`` as a float32 CPU tensor, from the cache when
    this exact call was made before, else computed and cached."""
    texts, layers = [str(t) for t in texts], list(layers)
    path = texts_path(encoder, texts, layers, batch_size)
    want = (len(texts), encoder.width(layers))
    if path.exists():
        try:
            arr = np.load(path, allow_pickle=False)
            if arr.dtype == np.float32 and arr.shape == want:
                return torch.from_numpy(arr)
            problem = f"holds a {arr.dtype} array of shape {arr.shape}, not float32 {want}"
        except (OSError, ValueError, EOFError) as e:
            problem = f"cannot be read ({e})"
        warnings.warn(f"cached text features {path} {problem}: encoding the texts again", stacklevel=2)
    emb = torch.as_tensor(encoder.encode(texts, batch_size=batch_size, convert_to_numpy=False, layers=layers)).float().cpu()
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, emb.numpy(), allow_pickle=False)
    return emb


__all__ = ["encode_texts", "texts_path"]
