"""AlignedModel: save/load round trips (trained heads and closed-form maps), classify, encoder checks."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from tiny import TinyImageEncoder, TinyTextEncoder, make_image_dataset, register_tiny
from unialign.align.closed_form import make_closed_form
from unialign.align.heads import HeadPair
from unialign.errors import UnialignError
from unialign.model import AlignedModel, ClosedFormProjection

register_tiny()


def _heads_model() -> AlignedModel:
    torch.manual_seed(0)
    heads = HeadPair.build("mlp", 12, 16, 8, image_options={"hidden": 16}, text_options={"hidden": 16})
    heads.image.standardize.fit(torch.randn(50, 12) * 3 + 1)
    return AlignedModel(TinyImageEncoder(), TinyTextEncoder(), heads, logit_scale=20.0, info={"note": "test"})


def test_save_load_round_trip_gives_identical_embeddings(tmp_path):
    ds = make_image_dataset(tmp_path / "imgs", n=6)
    m = _heads_model()
    paths = [ds.image_path(i) for i in range(6)]
    texts = ["thing 1", "a caption", "another one"]
    img, txt = m.encode_image(paths), m.encode_text(texts)
    assert img.shape == (6, 8) and np.allclose(np.linalg.norm(img, axis=1), 1, atol=1e-5)
    m.save(tmp_path / "model", results={"records": []})
    for f in ("config.json", "projection.safetensors", "README.md", "results.json"):
        assert (tmp_path / "model" / f).exists()
    cfg = json.loads((tmp_path / "model/config.json").read_text())
    assert cfg["image_encoder"]["spec"] == "tiny-image" and cfg["projection"]["kind"] == "heads"
    back = AlignedModel.load(tmp_path / "model")
    assert np.array_equal(back.encode_image(paths), img)
    assert np.array_equal(back.encode_text(texts), txt)
    assert back.logit_scale == 20.0 and back.info == {"note": "test"}


def test_closed_form_model_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    al = make_closed_form("procrustes").fit(rng.normal(size=(40, 12)), rng.normal(size=(40, 16)))
    m = AlignedModel(TinyImageEncoder(), TinyTextEncoder(), ClosedFormProjection(al))
    m.save(tmp_path / "cf")
    back = AlignedModel.load(tmp_path / "cf")
    texts = ["hello there", "general kenobi"]
    assert np.allclose(back.encode_text(texts), m.encode_text(texts), atol=1e-6)


def test_classify_ranks_every_label(tmp_path):
    ds = make_image_dataset(tmp_path / "imgs", n=2)
    out = _heads_model().classify([ds.image_path(0)], ["cat", "dog", "car"], templates=["a photo of a {}."])
    labels = [l for l, _ in out[0]]
    probs = [p for _, p in out[0]]
    assert sorted(labels) == ["car", "cat", "dog"] and probs == sorted(probs, reverse=True)
    assert sum(probs) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(UnialignError):
        _heads_model().classify([ds.image_path(0)], [])


def test_load_errors_and_version_warning(tmp_path):
    with pytest.raises(UnialignError, match="not a saved unialign model"):
        AlignedModel.load(tmp_path / "missing")
    m = _heads_model()
    m.save(tmp_path / "m")
    cfg = json.loads((tmp_path / "m/config.json").read_text())
    cfg["image_encoder"]["version"] = "other"
    (tmp_path / "m/config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="version"):
        AlignedModel.load(tmp_path / "m")
