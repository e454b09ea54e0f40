"""Image-text consistency: the DGM4-style builder, the token stores, Platt calibration, HAMMER-lite,
``AlignedModel.match`` and the server's ``/match``; fusion beats chance on held-out real emoji."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from unialign.errors import UnialignError
from unialign.model import AlignedModel
from unialign_train.data import Dataset, build_manipulated
from unialign_train.data.manipulated import attribute_slots, new_words, swap_attribute
from unialign_train.fuse.consistency import HammerLite, Pairs, fit_platt, hammer_scores, sigmoid, train_hammer
from unialign_train.fuse.data import prepare
from unialign_train.fuse.modules import ConcatMLP, LateFusion
from unialign_train.fuse.tokens import TokenStore, extract_tokens
from unialign_train.fuse.train import FuseConfig, evaluate, train_fusion

from tiny import make_image_dataset, tiny_model


# -- the manipulated pairs -------------------------------------------------------------------------------
def emoji_like() -> Dataset:
    """Two parts of toy emoji records in two styles: hearts (colour words), faces, people (gender words)."""
    concepts = [("h1", "red heart", "heart", "train"), ("h2", "blue heart", "heart", "train"),
                ("h3", "green heart", "heart", "test"), ("f1", "grinning face", "face", "train"),
                ("f2", "beaming face with smiling eyes", "face", "train"), ("f3", "melting face", "face", "test"),
                ("f4", "winking face", "face", "test"), ("p1", "man technologist", "person", "train")]
    recs = [{"id": f"{c}/{s}", "concept": c, "label": label, "style": s, "image": f"{s}/{c}.png", "text": [label],
             "category": "cat", "subcategory": sub, "part": part}
            for c, label, sub, part in concepts for s in ("a", "b")]
    return Dataset("toy", recs)


def test_each_record_gives_its_real_pair_and_one_manipulated_pair_within_its_part() -> None:
    ds = emoji_like()
    parts = {p: [i for i, r in enumerate(ds.records) if r["part"] == p] for p in ("train", "test")}
    pairs = build_manipulated(ds, parts, seed=0)
    assert len(pairs) == 2 * len(ds) and sum(r["fake"] for r in pairs.records) == len(ds)
    by_source = {}
    for r in pairs.records:
        by_source.setdefault(r["source"], []).append(r)
    concept_part = {r["concept"]: r["part"] for r in ds.records}
    for source, (real, fake) in by_source.items():
        assert real["manipulation"] == "real" and real["fake_words"] == [] and real["text"] == [real["label"]]
        assert fake["manipulation"] != "real" and fake["part"] == real["part"]
        if fake["manipulation"] == "attribute_swap":  # hearts and the man: one colour / gender word replaced
            assert fake["label"] in ("red heart", "blue heart", "green heart", "man technologist")
            assert fake["fake_words"] == [0] and fake["text"][0].split()[1:] == fake["label"].split()[1:]
            assert fake["text"][0] != fake["label"] and fake["image"] == real["image"]
        else:  # faces: a partner from the same subcategory and part (another face), same style for images
            partner = fake["text_concept"] if fake["manipulation"] == "text_swap" else fake["image_concept"]
            assert partner != fake["concept"] and partner.startswith("f") and concept_part[partner] == fake["part"]
            if fake["manipulation"] == "image_swap":
                assert fake["fake_words"] == [] and fake["image"] == f"{fake['style']}/{partner}.png"
            else:
                assert fake["image"] == real["image"] and fake["fake_words"]
    swapped = [r for r in pairs.records if r["manipulation"] == "attribute_swap" and r["text"][0] == "blue heart"]
    assert all(r["text_concept"] == "h2" for r in swapped)  # the swap names a real concept: recorded
    assert build_manipulated(ds, parts, seed=0).records == pairs.records  # seeded


def test_attribute_words_by_hand() -> None:
    assert attribute_slots("light rail") == [] and attribute_slots("traffic light") == []
    assert attribute_slots("medium-dark skin tone")[0][0] == 0
    assert [i for i, _ in attribute_slots("woman: red hair")] == [0, 1]
    new, words = swap_attribute("Man: beard", np.random.default_rng(0))
    assert words == [0] and new.split()[1:] == ["beard"] and new.split()[0][-1] == ":" and new[0].isupper()
    assert new.split()[0][:-1].lower() in ("woman", "person")
    assert new_words("kissing face with closed eyes", "smiling face with heart-eyes") == [0, 3]
    assert new_words("a b", "b a") == [0, 1]  # nothing new: every word counts


# -- token stores (real packaged encoders) ---------------------------------------------------------------
def test_text_tokens_pool_to_the_encoders_layer_and_know_their_words(real_emoji_features, tmp_path) -> None:
    enc = real_emoji_features.text_encoder
    captions = ["grinning face: cheerful, smile", "red heart", "a"]
    store = extract_tokens(captions, enc, "text", ["layer5", "layer6"], out=tmp_path / "t", show_progress=False,
                           log=lambda s: None)
    rows = store.rows(captions)
    batch = store.gather(rows)
    pooled = enc.encode(captions, convert_to_numpy=False).float()  # MiniLM's embedding: the mean of layer 6
    m = batch.mask[..., None].float()
    torch.testing.assert_close((batch.layers[1] * m).sum(1) / m.sum(1), pooled, atol=2e-3, rtol=2e-3)  # float16 store
    w = batch.words[0][batch.mask[0]].tolist()
    assert w[0] == -1 and w[-1] == -1 and sorted(set(w[1:-1])) == [0, 1, 2, 3]  # [CLS] grinning face: cheerful, smile [SEP]
    assert TokenStore.open(store.root).items == sorted(captions)  # reopened from disk, items sorted
    assert extract_tokens(captions[::-1], enc, "text", ["layer5", "layer6"], out=tmp_path / "t").root == store.root


def test_image_tokens_are_the_feature_map_whose_mean_is_the_pooled_layer(real_emoji_features, tmp_path) -> None:
    from unialign.encoders import load_encoder

    enc = load_encoder("effnet-lite0?image_size=64", device="cpu", backend="torch")
    ds = real_emoji_features.dataset
    paths = [ds.items(i, "image")[0] for i in range(3)]
    store = extract_tokens(paths, enc, "image", ["block15", "final"], grid=2, out=tmp_path / "i", show_progress=False,
                           log=lambda s: None)
    batch = store.gather(store.rows(paths))
    assert batch.layers[1].shape == (3, 4, 1280) and batch.mask.all()  # 64 px: a 2 x 2 final map
    pooled = enc.encode(paths, layers=["block15", "final"], convert_to_numpy=False).float()
    torch.testing.assert_close(torch.cat([batch.layers[0].mean(1), batch.layers[1].mean(1)], 1), pooled,
                               atol=1e-2, rtol=2e-3)  # float16 store of values up to 6


# -- calibration, HAMMER-lite ----------------------------------------------------------------------------
def test_platt_scaling_recovers_the_generating_curve() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=20000)
    y = rng.random(20000) < sigmoid(3.0 * x - 1.0)
    a, b = fit_platt(x, y)
    assert a == pytest.approx(3.0, abs=0.15) and b == pytest.approx(-1.0, abs=0.08)
    a, b = fit_platt([0.0, 1.0], [0, 1])  # separable: stays finite
    assert math.isfinite(a) and a > 0


def toy_pairs(n: int = 600, seed: int = 0) -> Pairs:
    """Image tokens carry a class vector; each caption word is a class vector. Real pairs: every word of
    the image's class. Fake pairs: one word of another class (that word manipulated). Only comparing the
    words with the image tells them apart."""
    rng = np.random.default_rng(seed)
    classes = rng.normal(size=(6, 16)).astype(np.float32) * 2
    recs, img_tok, txt_tok, offsets = [], [], [], [0]
    for i in range(n):
        c = int(rng.integers(6))
        fake = i % 2 == 1
        n_words = int(rng.integers(2, 5))
        words = [c] * n_words
        bad = []
        if fake:
            j = int(rng.integers(n_words))
            words[j] = (c + 1 + int(rng.integers(5))) % 6
            bad = [j]
        img_tok.append(classes[c] + rng.normal(scale=0.5, size=(4, 16)))
        txt_tok.append(np.stack([classes[w] + rng.normal(scale=0.3, size=16) for w in words]))
        offsets.append(offsets[-1] + n_words)
        recs.append({"id": str(i), "concept": str(c), "label": "", "style": "", "image": f"{i}.png",
                     "text": [" ".join(f"w{w}" for w in words)], "manipulation": "attribute_swap" if fake else "real",
                     "fake": fake, "fake_words": bad, "image_concept": str(c), "text_concept": "" if fake else str(c),
                     "part": ["train", "train", "train", "val", "test"][i % 5]})
    ds = Dataset("toy-pairs", recs)
    image = TokenStore(None, {"layers": ["final"], "layer_dims": {"final": 16}}, [f"{i}.png" for i in range(n)],
                       np.arange(0, 4 * n + 1, 4), np.full(4 * n, -1), {"final": np.concatenate(img_tok).astype(np.float16)})
    texts = [r["text"][0] for r in recs]
    words = np.concatenate([np.arange(len(t.split())) for t in texts])
    text = TokenStore(None, {"layers": ["final"], "layer_dims": {"final": 16}}, texts, np.asarray(offsets), words,
                      {"final": np.concatenate(txt_tok).astype(np.float16)})
    pairs = Pairs.build(ds)
    pairs.tokens = {"image": image, "text": text}
    pairs.token_rows = {"image": np.arange(n), "text": np.arange(n)}
    return pairs


def test_hammer_lite_detects_and_grounds_a_word_that_contradicts_the_image(one_thread) -> None:
    pairs = toy_pairs()
    t = train_hammer(pairs, FuseConfig(width=32, depth=1, hidden=32, epochs=15, batch_size=32, lr=2e-3, patience=0))
    s = hammer_scores(t.model, pairs)
    assert s["auc"] > 0.9 and s["accuracy"] > 0.8 and s["words"]["f1"] > 0.6, s
    assert s["by_type"]["real"]["flagged_words"] < 0.2


def test_mac_counts_only_pairs_with_a_positive() -> None:
    torch.manual_seed(0)
    model = HammerLite(8, 8, width=8, depth=1, heads=2, embed=4)
    emb = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    none = torch.zeros(3, 3, dtype=torch.bool)
    assert model.mac_loss(emb, emb, none).item() == 0.0
    one = none.clone()
    one[0, 0] = True  # pair 0 alone: image 0 -> text 0 and text 0 -> image 0, over all three candidates
    logits = model.log_scale.exp() * emb @ emb.T
    want = (-(torch.log_softmax(logits[0], 0)[0]) - torch.log_softmax(logits.T[0], 0)[0]) / 2
    torch.testing.assert_close(model.mac_loss(emb, emb, one), want)


# -- AlignedModel.match and /match -----------------------------------------------------------------------
def png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 12), color).save(buf, "PNG")
    return buf.getvalue()


def test_match_is_the_calibrated_sigmoid_of_the_cosine(tmp_path) -> None:
    model = AlignedModel.from_pretrained(tiny_model(tmp_path / "m"))
    images = [Image.open(io.BytesIO(png(c))) for c in ((200, 10, 10), (10, 200, 10))]
    texts = ["a red square", "a green square"]
    with pytest.raises(UnialignError, match="no match calibration"):
        model.match(images, texts)
    model.info["match"] = {"a": 6.0, "b": -1.0}
    cos = (model.encode(images, "image", normalize_embeddings=True) * model.encode(texts, normalize_embeddings=True)).sum(1)
    np.testing.assert_allclose(model.match(images, texts), sigmoid(6.0 * cos - 1.0), atol=1e-6)
    one = model.match(images[:1], texts)  # one image against each text
    np.testing.assert_allclose(one[0], model.match(images[:1], texts[:1])[0], atol=1e-6)
    with pytest.raises(UnialignError, match="pairs"):
        model.match(images, texts + ["x"])
    model.save_pretrained(tmp_path / "m")  # the calibration travels with the model
    np.testing.assert_allclose(AlignedModel.from_pretrained(tmp_path / "m").match(images, texts), model.match(images, texts))


def test_match_endpoint_answers_with_the_models_probabilities_or_409(tmp_path) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from unialign_serve.app import create_app

    folder = tiny_model(tmp_path / "m")
    with TestClient(create_app(folder)) as c:
        r = c.post("/match", files={"file": ("a.png", png((200, 10, 10)), "image/png")}, data={"texts": ["a red square"]})
        assert r.status_code == 409 and "calibration" in r.json()["error"]
    model = AlignedModel.from_pretrained(folder)
    model.info["match"] = {"a": 6.0, "b": -1.0, "fitted_on": "test"}
    model.save_pretrained(folder)
    with TestClient(create_app(folder)) as c:
        r = c.post("/match", files={"file": ("a.png", png((200, 10, 10)), "image/png")},
                   data={"texts": [" a red square ", "a green square"]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert [t["text"] for t in body["texts"]] == ["a red square", "a green square"]
        want = model.match([Image.open(io.BytesIO(png((200, 10, 10))))], ["a red square", "a green square"])
        np.testing.assert_allclose([t["probability"] for t in body["texts"]], want, atol=1e-6)
        assert body["calibration"]["a"] == 6.0
        assert c.post("/match", files={"file": ("a.png", b"not an image", "image/png")},
                      data={"texts": ["x"]}).status_code == 415
        assert c.post("/match", files={"file": ("a.png", png((1, 2, 3)), "image/png")}, data={"texts": [" "]}).status_code == 422


# -- fusion on real features, held-out concepts -----------------------------------------------------------
def test_fusion_predicts_the_category_of_held_out_concepts_far_above_chance(real_emoji_features, one_thread) -> None:
    """Image (EfficientNet-Lite0, 64 px) + caption (MiniLM) of 300 training concepts in three styles; test:
    100 unseen concepts in the unseen apple style; 10 categories (chance 10%)."""
    real = real_emoji_features
    ds = real.dataset
    train_concepts = sorted({ds.records[i]["concept"] for i in real.train})
    val_c = set(train_concepts[::6])
    parts = {"train": [i for i in real.train if ds.records[i]["concept"] not in val_c],
             "val": [i for i in real.train if ds.records[i]["concept"] in val_c], "test": list(real.heldout)}
    data = prepare(ds, parts, "category", "classification", real.cached)
    assert all("Smileys" not in (c or "") for c in data.items["text"])  # the captions never name the category
    cfg = FuseConfig(epochs=8, batch_size=64, patience=0)
    late = LateFusion(data.dims(), data.target.n_out)
    image = train_fusion(LateFusion({"image": data.dims()["image"]}, data.target.n_out), data, cfg).model
    text = train_fusion(LateFusion({"text": data.dims()["text"]}, data.target.n_out), data, cfg).model
    late.heads = torch.nn.ModuleDict({"image": image.heads["image"], "text": text.heads["text"]})
    concat = train_fusion(ConcatMLP(data.dims(), data.target.n_out), data, cfg).model
    scores = {name: evaluate(m, data, "test")["acc1"] for name, m in
              (("image", image), ("text", text), ("late", late), ("concat", concat))}
    assert min(scores.values()) > 0.3 and max(scores["late"], scores["concat"]) > 0.6, scores
    assert evaluate(late, data, "test", without=["text"])["acc1"] == scores["image"]  # the image head, alone


def test_consistency_command_scores_both_detectors_and_saves_the_calibration(tmp_path, monkeypatch, one_thread) -> None:
    import json

    from typer.testing import CliRunner

    from unialign_cli.main import app

    monkeypatch.setenv("UNIALIGN_HOME", str(tmp_path / "home"))
    base = make_image_dataset(tmp_path / "imgs", n=60)
    recs = [{**r, "concept": f"c{i % 20}", "label": f"thing {i % 20}", "text": [f"thing {i % 20}"]}
            for i, r in enumerate(base.records)]  # 20 concepts: every part has partners to swap with
    Dataset("tiny20", recs, base.root).save(tmp_path / "ds")
    folder = tiny_model(tmp_path / "model")
    sets = ["--set", f"data.dataset={tmp_path / 'ds'}", "--set", "encoders.image=tiny-image", "--set",
            "encoders.text=tiny-text", "--set", "extract.num_workers=0", "--set", "device=cpu"]
    res = CliRunner().invoke(app, ["fuse", "consistency", "--model", str(folder), "--seeds", "1", "--param", "epochs=2",
                                   "--param", "batch_size=16", "--save-calibration", "--out", str(tmp_path / "out"), *sets])
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "out" / "consistency.json").read_text())
    assert set(saved["results"]) == {"zero-shot (aligned space)", "HAMMER-lite"}
    zs = saved["results"]["zero-shot (aligned space)"][0]
    assert 0.0 <= zs["auc"] <= 1.0 and zs["fake_fraction"] == 0.5  # a real and a manipulated pair per record
    assert set(zs["by_type"]) <= {"real", "text_swap", "image_swap"}  # "thing k": no attribute word to swap
    cal = AlignedModel.from_pretrained(folder).info["match"]
    assert cal["a"] == pytest.approx(zs["calibration"]["a"]) and "val" in cal["fitted_on"]
    assert "| HAMMER-lite |" in (tmp_path / "out" / "consistency.md").read_text()
