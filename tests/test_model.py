"""AlignedModel: an nn.Module with sentence-transformers' encode() and open_clip's encode_image/encode_text;
save/load round trips for trained heads and closed-form maps; classify; load errors."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from tiny import TinyImageEncoder, TinyTextEncoder, make_image_dataset, register_tiny
from unialign.errors import DataError, UnialignError
from unialign.model import AlignedModel
from unialign.projections import Tower
from unialign_train.align.closed_form import make_closed_form

register_tiny()


def _heads_model() -> AlignedModel:
    torch.manual_seed(0)
    img = Tower("mlp", 12, 8, {"hidden": 16})
    txt = Tower("mlp", 16, 8, {"hidden": 16})
    img.standardize.fit(torch.randn(50, 12) * 3 + 1)
    return AlignedModel({"image": TinyImageEncoder(), "text": TinyTextEncoder()}, {"image": img, "text": txt},
                        logit_scale=20.0, info={"note": "test"})


def test_is_a_module_with_open_clip_attributes():
    m = _heads_model()
    assert isinstance(m, torch.nn.Module) and m.modalities == ["image", "text"]
    assert sum(p.numel() for p in m.parameters()) > 0 and m.encoders["image"] is m.image_encoder
    assert m.logit_scale.item() == pytest.approx(math.log(20.0))  # the log, as open_clip
    assert not m.training and not m.projections["image"].training  # built for inference
    m.train()
    assert m.projections["image"].training and not m.image_encoder.training  # frozen encoders stay in eval
    m.encode(["a"])
    assert not m.projections["image"].training  # encode() runs in eval mode, as sentence-transformers'
    assert m.train().eval() is m and not m.projections["image"].training


@pytest.mark.numerics
def test_encode_keywords_do_what_they_say(tmp_path):
    ds = make_image_dataset(tmp_path / "imgs", n=3)
    m = _heads_model().eval()
    texts = ["thing 1", "a caption"]
    raw = m.encode(texts)
    assert isinstance(raw, np.ndarray) and raw.shape == (2, 8)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)  # normalize_embeddings=False: the head's output
    unit = m.encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), rtol=1e-6, atol=1e-7)
    one = m.encode("thing 1")
    assert one.shape == (8,)  # a single input: 1-D; the same embedding up to the batch's matmul rounding
    np.testing.assert_allclose(one, raw[0], rtol=1e-5, atol=1e-6)
    t = m.encode(texts, convert_to_tensor=True, convert_to_numpy=True)
    assert isinstance(t, torch.Tensor) and torch.equal(t, torch.from_numpy(raw))
    assert isinstance(m.encode(texts, convert_to_numpy=False), torch.Tensor)
    assert m.encode(texts, convert_to_tensor=True, device="cpu").device.type == "cpu"
    img = m.encode([ds.path(0), Image.open(ds.path(1))], modality="image")
    assert img.shape == (2, 8)
    assert m.encode(Image.open(ds.path(0))).shape == (8,)  # a PIL image is recognised as an image
    with pytest.raises(DataError, match="PIL image"):  # not text, so the model's other side: not an image either
        m.encode([np.zeros(3)])
    with pytest.raises(UnialignError, match="no audio side"):
        m.encode(["x.wav"], modality="audio")


def test_open_clip_front_end_matches_encode(tmp_path):
    ds = make_image_dataset(tmp_path / "imgs", n=2)
    m = _heads_model().eval()
    pixels = torch.stack([m.image_encoder.loader()(ds.path(i)) for i in range(2)])
    img = m.encode_image(pixels)
    assert torch.equal(img, m.encode([ds.path(0), ds.path(1)], modality="image", convert_to_tensor=True))
    img_n, txt_n, scale = m(pixels, ["thing 1"])
    torch.testing.assert_close(img_n, torch.nn.functional.normalize(img, dim=-1))
    assert txt_n.shape == (1, 8) and scale.item() == pytest.approx(20.0, rel=1e-6)
    torch.testing.assert_close(m.encode_text(["thing 1"], normalize=True), txt_n)


def test_save_load_round_trip_gives_identical_embeddings(tmp_path):
    ds = make_image_dataset(tmp_path / "imgs", n=6)
    m = _heads_model()
    paths = [ds.path(i) for i in range(6)]
    texts = ["thing 1", "a caption", "another one"]
    img, txt = m.encode(paths, modality="image"), m.encode(texts)
    m.save_pretrained(tmp_path / "model", results=[])
    for f in ("config.json", "model.safetensors", "README.md"):
        assert (tmp_path / "model" / f).exists()
    cfg = json.loads((tmp_path / "model/config.json").read_text())
    assert cfg["modalities"]["image"]["encoder"]["spec"] == "tiny-image"
    assert cfg["modalities"]["text"]["projection"]["type"] == "head"
    back = AlignedModel.from_pretrained(tmp_path / "model")
    assert np.array_equal(back.encode(paths, modality="image"), img)  # save/load: bit-identical
    assert np.array_equal(back.encode(texts), txt)
    assert back.logit_scale.item() == m.logit_scale.item() and back.info == {"note": "test"}


@pytest.mark.parametrize("name", ["procrustes", "asif", "cca", "lstsq"])
def test_closed_form_model_round_trip(tmp_path, name):
    rng = np.random.default_rng(0)
    al = make_closed_form(name, **({"k": 10} if name == "asif" else {})).fit(rng.normal(size=(40, 12)), rng.normal(size=(40, 16)))
    mx, my = al.projections_
    m = AlignedModel({"image": TinyImageEncoder(), "text": TinyTextEncoder()}, {"image": mx, "text": my})
    m.save_pretrained(tmp_path / "cf")
    back = AlignedModel.from_pretrained(tmp_path / "cf")
    texts = ["hello there", "general kenobi"]
    assert np.array_equal(back.encode(texts), m.encode(texts))  # the state round-trips exactly
    feats = TinyTextEncoder().encode(texts)
    np.testing.assert_allclose(m.encode(texts, normalize_embeddings=True), al.transform_y(feats), rtol=1e-5, atol=1e-6)


def test_classify_ranks_every_label(tmp_path):
    ds = make_image_dataset(tmp_path / "imgs", n=2)
    out = _heads_model().classify([ds.path(0)], ["cat", "dog", "car"], templates=["a photo of a {}."])
    labels = [l for l, _ in out[0]]
    probs = [p for _, p in out[0]]
    assert sorted(labels) == ["car", "cat", "dog"] and probs == sorted(probs, reverse=True)
    assert sum(probs) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(UnialignError):
        _heads_model().classify([ds.path(0)], [])


def test_load_errors_and_version_warning(tmp_path):
    with pytest.raises(UnialignError, match="not a saved unialign model"):
        AlignedModel.from_pretrained(tmp_path / "missing")
    m = _heads_model()
    m.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m/config.json").read_text())
    cfg["modalities"]["image"]["encoder"]["version"] = "other"
    (tmp_path / "m/config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="version"):
        AlignedModel.from_pretrained(tmp_path / "m")
    data = bytearray((tmp_path / "m/model.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (tmp_path / "m/model.safetensors").write_bytes(bytes(data))
    with pytest.raises(UnialignError, match="checksum mismatch"):
        AlignedModel.from_pretrained(tmp_path / "m")
    (tmp_path / "m/config.json").write_text("{ not json")
    with pytest.raises(UnialignError, match="not valid JSON"):
        AlignedModel.from_pretrained(tmp_path / "m")


def test_mismatched_projection_width_is_refused():
    with pytest.raises(UnialignError, match="takes 13-d features"):
        AlignedModel({"image": TinyImageEncoder(), "text": TinyTextEncoder()},
                     {"image": Tower("linear", 13, 8), "text": Tower("linear", 16, 8)})
