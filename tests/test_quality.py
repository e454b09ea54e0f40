"""Issue 15's training-free pieces: CSA, concept prototypes, hubness correction, encoder-agnostic
layer names. Each is checked against a hand computation on small planted data (no files, milliseconds);
quality on held-out concepts is checked for every recipe by tests/test_recipes.py (CSA included)."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from unialign.errors import ConfigError
from unialign.projections import build_projection, projection_config
from unialign_train.align.closed_form import ASIF, CSA, ClosedFormConfigError, group_means, make_closed_form
from unialign_train.evaluate.hubness import bank_bias, corrected_scores
from unialign_train.select import auto_candidates, auto_sets, resolve_layer_names

from tiny import TinyImageEncoder, TinyTextEncoder


def _views(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two views sharing a 6-d latent (with different strengths) plus private noise, n >> d."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 6)) * np.array([3.0, 2.0, 1.5, 1.0, 0.7, 0.5])
    x = z @ rng.standard_normal((6, 10)) + 0.5 * rng.standard_normal((n, 10)) + 1.0
    y = z @ rng.standard_normal((6, 8)) + 0.5 * rng.standard_normal((n, 8)) - 2.0
    return x, y


def _normalised_centred(a: np.ndarray) -> np.ndarray:
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    return an - an.mean(0)


@pytest.mark.numerics
def test_csa_correlations_are_principal_angle_cosines_and_scores_are_the_csa_sum() -> None:
    x, y = _views()
    m = CSA(reg=0.0).fit(x, y)  # no ridge, n >> d: plain CCA
    xc, yc = _normalised_centred(x), _normalised_centred(y)
    # canonical correlations = cosines of the principal angles between the two column spaces
    angles = scipy.linalg.subspace_angles(xc, yc)
    np.testing.assert_allclose(m.canonical_correlations_, np.sort(np.cos(angles))[::-1], atol=1e-8)
    assert m.out_dim == 8  # s = min(d_x, d_y, n - 1)
    # the CSA score by hand: canonical coordinates from an independent solve (sklearn-free: QR + SVD)
    qx, rx = np.linalg.qr(xc)
    qy, ry = np.linalg.qr(yc)
    u, rho, vt = np.linalg.svd(qx.T @ qy)
    a, b = np.linalg.solve(rx, u), np.linalg.solve(ry, vt.T)  # directions (up to a per-axis scale and sign)
    # transform centres by the fit-set mean, not the query batch's: redo that by hand
    mu_x, mu_y = (x / np.linalg.norm(x, axis=1, keepdims=True)).mean(0), (y / np.linalg.norm(y, axis=1, keepdims=True)).mean(0)
    px = (x[:20] / np.linalg.norm(x[:20], axis=1, keepdims=True) - mu_x) @ a[:, :8] * np.sqrt(len(x) - 1)
    py = (y[:30] / np.linalg.norm(y[:30], axis=1, keepdims=True) - mu_y) @ b[:, :8] * np.sqrt(len(y) - 1)
    px, py = px / np.linalg.norm(px, axis=1, keepdims=True), py / np.linalg.norm(py, axis=1, keepdims=True)
    hand = (px * rho[:8]) @ py.T  # sum_i rho_i x_i y_i
    sim = m.similarity(x[:20], y[:30])
    # the cosine is the CSA score over the image embedding's norm |rho * x| (a positive per-query scale,
    # so each query ranks the candidates as the CSA score does; compared with a tolerance: two solves)
    scale = np.linalg.norm(px * rho[:8], axis=1, keepdims=True)
    np.testing.assert_allclose(sim, hand / scale, atol=1e-5)


def test_csa_s_caps_the_space_and_validates() -> None:
    x, y = _views()
    m = CSA(s=3, reg=0.1).fit(x, y)
    assert m.out_dim == 3 and m.transform_x(x[:4]).shape == (4, 3) and m.transform_y(y[:4]).shape == (4, 3)
    assert np.all(np.diff(m.canonical_correlations_) <= 0) and m.canonical_correlations_[0] < 1
    for bad in ({"s": 0}, {"reg": -1.0}, {"prototypes": "yes"}):
        with pytest.raises(ClosedFormConfigError):
            make_closed_form("csa", **bad)


def test_csa_round_trips_as_a_projection_module() -> None:
    x, y = _views(n=120)
    m = CSA(s=5).fit(x, y)
    for mod, feats in zip(m.projections_, (x, y)):
        twin = build_projection(projection_config(mod))
        twin.load_state_dict(mod.state_dict())
        t = torch.from_numpy(feats[:7])
        torch.testing.assert_close(twin(t), mod(t), rtol=0, atol=0)


def test_prototype_anchors_are_group_means() -> None:
    x, y = _views(n=90)
    groups = np.repeat(np.arange(30), 3)  # 30 concepts, 3 "styles" each
    m = ASIF(k=None, p=1.0, prototypes=True).fit(x, y, groups=groups)
    assert m.n_anchors == 30
    protos, labels = group_means(_normalised_centred(x), groups)
    assert labels.tolist() == list(range(30))
    want = protos / np.linalg.norm(protos, axis=1, keepdims=True)
    np.testing.assert_allclose(m.projections_[0].anchors.numpy()[m.projections_[0].inverse.numpy()], want, atol=1e-6)
    # without groups the option changes nothing
    plain = ASIF(k=None, p=1.0).fit(x, y)
    np.testing.assert_array_equal(ASIF(k=None, p=1.0, prototypes=True).fit(x, y).transform_x(x[:5]), plain.transform_x(x[:5]))
    assert CSA(prototypes=True).fit(x, y, groups=groups).out_dim == 8


def test_hubness_nnn_alpha_zero_is_the_identity_and_demotes_hubs() -> None:
    g = torch.Generator().manual_seed(0)
    hub = torch.zeros(16)
    hub[0] = 1.0  # a direction every query shares
    q = torch.nn.functional.normalize(torch.randn(50, 16, generator=g) + 2 * hub, dim=1)
    bank = torch.nn.functional.normalize(torch.randn(200, 16, generator=g) + 2 * hub, dim=1)  # training queries
    c = torch.nn.functional.normalize(torch.randn(10, 16, generator=g), dim=1)
    c[0] = torch.nn.functional.normalize(c[0] + 6 * hub, dim=0)  # near every query: a hub
    plain = q @ c.T
    assert torch.equal(corrected_scores(q, c, bank, None, "nnn", 0.0, 10), plain)
    assert torch.equal(corrected_scores(q, c, bank, None, "none", 0.5, 10), plain)
    wins = lambda s: int((s.argmax(1) == 0).sum())  # noqa: E731
    assert wins(plain) >= 20 and wins(corrected_scores(q, c, bank, None, "nnn", 1.0, 10)) <= wins(plain) // 2
    r_c = torch.stack([torch.topk(bank @ c[j], 10).values.mean() for j in range(10)])  # by hand
    torch.testing.assert_close(bank_bias(bank, c, 10), r_c)
    r_q = bank_bias(c, q, 3)
    torch.testing.assert_close(corrected_scores(q, c, bank, c, "csls", 1.0, 10) + r_c[None] + bank_bias(c, q, 10)[:, None],
                               2 * plain)
    assert r_q.shape == (50,)
    with pytest.raises(ValueError, match="accepted"):
        corrected_scores(q, c, bank, None, "zca", 1.0, 10)


def test_layer_names_are_encoder_agnostic() -> None:
    img, txt = TinyImageEncoder(), TinyTextEncoder()
    assert resolve_layer_names(img, "last-2") == ["hidden", "final"]
    assert resolve_layer_names(img, ["final", "hidden", "last-1"]) == ["hidden", "final"]
    assert resolve_layer_names(txt, ["last-1"]) == ["final"]
    assert resolve_layer_names(img, "last-4") == ["hidden", "final"]  # fewer layers than asked: all of them
    assert auto_candidates(img) == ["final", "hidden"]
    assert auto_sets(img) == {"last-1": ["final"], "last-2": ["hidden", "final"]}  # the rest repeat last-2
    assert resolve_layer_names(img, ["last-8", "shallow-3"]) == ["hidden", "final"]  # a two-layer encoder: all
    for bad, msg in (("last-0", "no layer"), ("shallow-0", "no layer"), ("block3", "not a layer"),
                     (["auto", "final"], "chosen")):
        with pytest.raises(ConfigError, match=msg):
            resolve_layer_names(img, bad)


def test_shallow_layers_spread_over_the_shallower_half() -> None:
    """``shallow-N``: the layers at positions ``i * len(half) // N`` of the shallower half, from the shallowest;
    on EfficientNet-Lite0's 18 layers (stem, block0-15, final) the default's ``shallow-3`` is stem, block2, block5."""
    from types import SimpleNamespace

    from unialign_train.select.layer_names import shallow_layers

    lite0 = ["stem"] + [f"block{i}" for i in range(16)] + ["final"]
    enc = SimpleNamespace(spec="lite0-like", layer_dims={n: 8 for n in lite0})
    assert resolve_layer_names(enc, "shallow-3") == ["stem", "block2", "block5"]
    assert resolve_layer_names(enc, ["last-8", "shallow-3"]) == ["stem", "block2", "block5"] + lite0[-8:]
    sets = auto_sets(enc)  # ``auto`` compares the default's set too, and extracts each layer once
    assert list(sets) == ["last-1", "last-2", "last-3", "last-4", "last-6", "last-8", "last-4,shallow-3", "last-8,shallow-3"]
    assert sets["last-8,shallow-3"] == resolve_layer_names(enc, ["last-8", "shallow-3"])
    assert auto_candidates(enc) == ["final", "stem", "block2", "block5"] + lite0[-8:-1]
    assert shallow_layers(lite0, 1) == ["stem"]
    assert shallow_layers(lite0, 5) == ["stem", "block0", "block2", "block4", "block6"]  # spread, not bunched
    assert shallow_layers(lite0, 9) == lite0[:9]  # the whole shallower half
    assert shallow_layers(lite0, 20) == lite0[:9]  # never past it
    assert shallow_layers(["layer0", "final"], 3) == ["layer0"]
    assert shallow_layers(["final"], 2) == ["final"]


def test_layers_auto_keeps_the_informative_layer_set_on_style_held_out_folds(real_emoji_features):
    """``choose_layers`` on real features: candidate "final" (EfficientNet's embedding) against
    "final" + a loud layer of noise; the folds hold out one training style each and never touch the
    held-out concepts, and the noise-free set wins."""
    from unialign_train.choose import choose_layers, validation_folds
    from unialign_train.data import Splits
    from unialign_train.features import Cached, Features, ModalityFeatures

    r = real_emoji_features
    img = r.cached["image"]
    noise = np.random.default_rng(0).standard_normal((len(img.features), 64)).astype(np.float32) * 50
    loud = ModalityFeatures("image", img.store, Features([img.features.arrays[0], noise], ["final", "noise"]),
                            img.offsets, img.flat)
    cached = Cached(r.dataset, {"image": loud, "text": r.cached["text"]})
    concepts = sorted({r.dataset.records[int(i)]["concept"] for i in r.train})
    val_c = set(concepts[::4])  # a quarter of the training concepts validate
    train = np.array([i for i in r.train if r.dataset.records[int(i)]["concept"] not in val_c])
    val = np.array([i for i in r.train if r.dataset.records[int(i)]["concept"] in val_c])
    splits = Splits(train, val, r.heldout, {"train": [], "val": sorted(val_c), "test": []},
                    ["google", "twitter", "openmoji"], ["apple"])
    folds = validation_folds(cached, splits)
    assert [f[0] for f in folds] == [f"held-out style {s}" for s in ("google", "twitter", "openmoji")]
    for name, tr, va in folds:
        style = name.rsplit(" ", 1)[1]
        assert {r.dataset.records[int(i)]["style"] for i in va} == {style}
        assert style not in {r.dataset.records[int(i)]["style"] for i in tr}
        assert not set(va.tolist()) & set(tr.tolist()) and not set(va.tolist()) & set(r.heldout.tolist())
    best, table = choose_layers(cached, splits, "asif", None, ("image", "text"), "image", r.text_encoder, ["final"],
                                "emoji", {"last-1": ["final"], "last-2": ["noise", "final"]}, log=lambda s: None)
    assert best == ["final"] and [row["set"] for row in table] == ["last-1", "last-2"]
    assert table[0]["val_acc1"] > 3 * (1 / len(val_c)) and table[0]["score"] > table[1]["score"]
    assert cached["image"] is loud  # the candidate store is left as it was


def test_a_store_with_more_layers_serves_a_subset_request(tmp_path, monkeypatch):
    """Choosing layers costs no second extraction: a default-path store of ``final, hidden`` answers a
    request for ``final`` alone (the same rows), while a store of other inputs is never borrowed."""
    from tiny import make_image_dataset
    from unialign_train.features.extract import default_store_path, extract

    monkeypatch.setenv("UNIALIGN_HOME", str(tmp_path / "home"))
    ds = make_image_dataset(tmp_path / "imgs", n=12)
    wide = extract(ds, TinyImageEncoder(), layers=["hidden"], shard_size=8, num_workers=0, show_progress=False)
    narrow = extract(ds, TinyImageEncoder(), layers=["final"], shard_size=8, num_workers=0, show_progress=False)
    assert narrow.root == wide.root and not default_store_path(ds, TinyImageEncoder()).exists()
    np.testing.assert_array_equal(narrow.array("final")[np.arange(12)], wide.array("final")[np.arange(12)])
    other = extract(ds, TinyImageEncoder(), layers=["final"], shard_size=4, num_workers=0, show_progress=False)
    assert other.root != wide.root and other.layers == ["final"]  # another shard size: its own store


def test_prototype_pairs_average_a_concepts_images_and_pool_its_captions():
    from unialign_train.align.pairs import Pairs
    from unialign_train.align.prototypes import prototype_pairs
    from unialign_train.features import Features

    rng = np.random.default_rng(0)
    img = rng.standard_normal((6, 4)).astype(np.float32)
    hidden = rng.standard_normal((6, 3)).astype(np.float32)
    # records: concept 7 in three styles (images 0, 1, 2; captions shared), concept 3 in two (images 3, 4)
    pairs = Pairs.from_lists([0, 1, 2, 3, 4], [[10, 11], [10, 11], [10, 12], [20], [21]], [7, 7, 7, 3, 3])
    feats, proto = prototype_pairs(Features([img, hidden], ["final", "hidden"]), pairs)
    assert feats.names == ["final", "hidden"] and feats.dims == [4, 3] and len(proto) == 2
    np.testing.assert_allclose(feats[np.array([0])][0], np.concatenate([img[:3].mean(0), hidden[:3].mean(0)]), rtol=1e-6)
    np.testing.assert_allclose(feats[np.array([1])][0], np.concatenate([img[3:5].mean(0), hidden[3:5].mean(0)]), rtol=1e-6)
    xr, yr, g = proto.all_pairs()
    assert xr.tolist() == [0, 0, 0, 1, 1] and yr.tolist() == [10, 11, 12, 20, 21] and g.tolist() == [7, 7, 7, 3, 3]


@pytest.mark.slow
@pytest.mark.parametrize("recipe,overrides", [("linear", {"prototypes": True, "max_steps": 150, "batch_size": 128,
                                                          "warmup_steps": 10, "eval_every": 0, "patience": 0,
                                                          "checkpoint_every": 0, "seed": 0}),
                                              ("unialign", {"prototypes": True}), ("csa", {"prototypes": True})])
def test_prototype_options_learn_held_out_concepts(recipe, overrides, real_emoji_features):
    """Trained (pair sampling) and closed-form prototypes: well above chance on 100 held-out concepts in
    the held-out apple style, and the fit really ran on one pair per training concept."""
    from unialign_train.align import fit, get_recipe, make_pairs
    from unialign_train.evaluate import validator

    r = real_emoji_features
    pairs = make_pairs(r.cached, r.train, "image", "text")
    torch.manual_seed(0)
    fitted = fit(get_recipe(recipe), overrides, r.cached["image"].features, r.cached["text"].features, pairs,
                 ("image", "text"), device="cpu", log=lambda *_: None)
    if recipe == "unialign":
        assert fitted.projections["image"].n_anchors == len(np.unique(pairs.groups))
    s = validator(r.cached, r.text_encoder, ["final"], r.heldout, "image", "emoji")(torch.nn.ModuleDict(fitted.projections))
    n_classes = len({r.dataset.records[int(i)]["concept"] for i in r.heldout})
    assert s["val_acc1"] >= 5 / n_classes, f"{recipe}: acc1 {s['val_acc1']:.3f} among {n_classes} held-out concepts"


@pytest.mark.slow
def test_main_job_chooses_layers_on_validation(tmp_path):
    """``layers: {image: auto}`` in the main job: candidate layers extracted once, each candidate set scored on
    held-out-style folds, the best one saved in the model (and its table in the model's info); the model
    then classifies unseen concepts in the unseen style well above chance."""
    from unialign.model import AlignedModel
    from unialign_train.config import load_config
    from unialign_train.pipeline import run
    from unialign_train.select.layer_names import AUTO_SETS

    cfg = load_config(overrides={"output": str(tmp_path / "run"), "encoders.image": "effnet-lite0?image_size=64",
                                 "layers.image": "auto", "recipe": "asif", "eval.zero_shot_sets": {},
                                 "data.train_styles": ["google", "twitter"], "data.test_styles": ["apple"]})
    out = run(cfg, log=lambda s: None)
    model = AlignedModel.from_pretrained(tmp_path / "run" / "model")
    table = model.info["layers_auto"]["image"]
    assert sorted(r["set"] for r in table) == sorted(AUTO_SETS)
    assert model.layers["image"] == table[0]["layers"] and table[0]["score"] == max(r["score"] for r in table)
    zs = next(r for r in out["records"] if r["task"] == "zeroshot_classification")
    assert zs["metrics"]["acc1"] >= 10 * zs["chance"]["acc1"]


def _loud_noise_pairs(n_concepts: int = 120, per: int = 3, seed: int = 0):
    """Planted pairs: images have an informative 8-d layer "final" (the concept's text direction plus
    a little noise) and a 64-d layer "hidden" of pure noise 40 times louder; texts are the concept's
    direction in their own 6-d space. Concepts 0..79 fit, 80..119 are held out."""
    from unialign_train.align.pairs import Pairs
    from unialign_train.features import Features

    rng = np.random.default_rng(seed)
    topic = rng.standard_normal((n_concepts, 6))
    mix = rng.standard_normal((6, 8))
    concept = np.repeat(np.arange(n_concepts), per)
    final = (topic[concept] @ mix + 0.3 * rng.standard_normal((len(concept), 8))).astype(np.float32)
    hidden = (40 * rng.standard_normal((len(concept), 64))).astype(np.float32)
    text = topic.astype(np.float32)
    fit_rows = np.flatnonzero(concept < 80)
    pairs = Pairs.from_lists(fit_rows.tolist(), [[int(concept[i])] for i in fit_rows], concept[fit_rows].tolist())
    held = np.flatnonzero(concept >= 80)
    return Features([hidden, final], ["hidden", "final"]), Features([text], ["final"]), pairs, held, concept


def _held_out_acc1(fitted, img, txt, held, concept) -> float:
    with torch.no_grad():
        q = fitted.projections["image"](torch.from_numpy(img[held]))
        classes = np.unique(concept[held])
        c = fitted.projections["text"](torch.from_numpy(txt[classes]))
    pred = classes[(torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(c, dim=-1).T).argmax(1).numpy()]
    return float((pred == concept[held]).mean())


def test_layer_weights_balance_layers_so_a_loud_noise_layer_no_longer_drowns_the_signal() -> None:
    """Raw concatenation lets a loud noise layer decide every cosine (near chance on held-out concepts);
    balanced layers with the informative one weighted up recover it. The scales are weight / mean centred
    norm of each layer over the *training* rows, the model is LayerScale -> the aligner's map, and a
    one-layer modality is left as it was."""
    from unialign.projections import Chain, LayerScale
    from unialign_train.align import fit, get_recipe

    img, txt, pairs, held, concept = _loud_noise_pairs()
    recipe = get_recipe("asif")
    raw = fit(recipe, {"k": 20, "p": 2.0}, img, txt, pairs, ("image", "text"), device="cpu", log=lambda *_: None)
    bal = fit(recipe, {"k": 20, "p": 2.0}, img, txt, pairs, ("image", "text"), device="cpu", log=lambda *_: None,
              layer_weights={"final": 4.0, "absent": 9.0})
    chance = 1 / 40
    assert _held_out_acc1(raw, img, txt, held, concept) < 4 * chance
    assert _held_out_acc1(bal, img, txt, held, concept) > 0.5
    chain = bal.projections["image"]
    assert isinstance(chain, Chain) and isinstance(chain.parts[0], LayerScale)
    assert not isinstance(bal.projections["text"], Chain)  # one layer: nothing to balance
    rows = np.unique(pairs.x_flat)
    norms = [np.linalg.norm(a[rows] - a[rows].mean(0), axis=1).mean() for a in img.arrays]
    np.testing.assert_allclose(chain.parts[0].scale.numpy(), [1.0 / norms[0], 4.0 / norms[1]], rtol=1e-5)
    assert bal.info["layer_scales"]["image"].keys() == {"hidden", "final"}


def test_layer_weights_reach_the_closed_form_parts_of_unpaired_and_hybrid_recipes() -> None:
    """The semi-supervised recipe's map and the anchor head's closed-form inputs see balanced layers too:
    with the loud noise layer the unpaired recipe is near chance raw and well above it balanced, and the
    anchor head's image projection starts with the fitted LayerScale (so a saved model applies it)."""
    from unialign.projections import LayerScale
    from unialign_train.align import fit, get_recipe

    img, txt, pairs, held, concept = _loud_noise_pairs()
    quiet = lambda *_: None  # noqa: E731
    rows = (np.unique(pairs.x_flat)[::2], np.unique(pairs.y_flat))  # unpaired: half the training images, all texts
    recipe = get_recipe("unialign-unpaired")
    ov = {"k": 20, "nuisance_rank": 2}
    raw = fit(recipe, ov, img, txt, pairs, ("image", "text"), device="cpu", log=quiet, unpaired=rows)
    bal = fit(recipe, ov, img, txt, pairs, ("image", "text"), device="cpu", log=quiet, unpaired=rows,
              layer_weights={"final": 2.0})
    assert _held_out_acc1(raw, img, txt, held, concept) < 4 / 40
    assert _held_out_acc1(bal, img, txt, held, concept) > 0.5
    head = fit(get_recipe("anchor-head"), {"epochs": 1, "batch_size": 64}, img, txt, pairs, ("image", "text"),
               device="cpu", log=quiet, layer_weights={"final": 2.0})
    first = head.projections["image"].parts[0]  # Chain([closed-form map, trained head])
    assert isinstance(first.parts[0], LayerScale)
    assert not any(isinstance(m, LayerScale) for m in head.projections["text"].modules())  # one text layer
    fused = fit(get_recipe("fused"), {"epochs": 1, "batch_size": 64}, img, txt, pairs, ("image", "text"),
                device="cpu", log=quiet, layer_weights={"final": 2.0})
    trained, closed = fused.projections["image"].parts  # WeightedConcat([trained heads, closed-form map])
    assert isinstance(closed.parts[0], LayerScale) and not any(isinstance(m, LayerScale) for m in trained.modules())


def test_layer_scale_round_trips_and_rejects_a_layer_that_does_not_vary() -> None:
    from unialign.errors import DataError
    from unialign_train.align import fit, get_recipe
    from unialign_train.align.layer_weights import fit_layer_scale
    from unialign_train.features import Features

    img, txt, pairs, held, _ = _loud_noise_pairs()
    fitted = fit(get_recipe("unialign"), {"k": 20, "nuisance_rank": 2}, img, txt, pairs, ("image", "text"),
                 device="cpu", log=lambda *_: None, layer_weights={"final": 2.0})
    chain = fitted.projections["image"]
    again = build_projection(projection_config(chain))
    again.load_state_dict(chain.state_dict())
    x = torch.from_numpy(img[held])
    with torch.no_grad():  # the same module tree and state: bit-identical
        assert torch.equal(again(x), chain(x))
    flat = Features([img.arrays[1], np.ones((len(img), 3), np.float32)], ["final", "constant"])
    with pytest.raises(DataError, match="'constant'.*do not vary"):
        fit_layer_scale(flat, np.arange(10), {})
    assert fit_layer_scale(Features([img.arrays[1]], ["final"]), np.arange(10), {"final": 2.0}) is None


def test_layer_weights_config_defaults_validates_and_switches_off() -> None:
    from unialign_train.config import load_config

    assert load_config().layer_weights == {"final": 2.0}
    assert load_config(overrides={"layer_weights": None}).layer_weights is None
    assert load_config(overrides={"layer_weights": {}}).layer_weights == {}
    with pytest.raises(ConfigError, match="layer_weights"):
        load_config(overrides={"layer_weights.final": -1})


def test_the_default_job_runs_unialign_wide_and_unialign_stays_the_rank_32_preset() -> None:
    """The default job's recipe is ``unialign`` with 64 style directions removed; naming ``unialign`` gives
    the preset of the recipe tables (32), and no setting of one leaks into another recipe."""
    from unialign_train.align import get_recipe
    from unialign_train.config import load_config

    cfg = load_config()
    wide, base = get_recipe(cfg.recipe), get_recipe("unialign")
    assert cfg.recipe == "unialign-wide" and cfg.train == {}
    assert wide.params == {**base.params, "nuisance_rank": 64} and base.params["nuisance_rank"] == 32
    assert load_config(overrides={"recipe": "linear"}).train == {}


def test_a_users_layer_weights_replace_the_defaults_and_a_misspelt_layer_is_an_error(tmp_path) -> None:
    """A file's ``layer_weights`` are exactly its own (not added to the default's ``final: 2``); a weight
    for a layer the run did not select is allowed, one that names no layer of any encoder is a ConfigError."""
    from types import SimpleNamespace

    from unialign_train.align import check_weight_names
    from unialign_train.config import load_config

    f = tmp_path / "job.yaml"
    f.write_text("layer_weights:\n  block15: 3.0\n", encoding="utf-8")
    assert load_config(f).layer_weights == {"block15": 3.0}
    f.write_text("layer_weights: null\n", encoding="utf-8")
    assert load_config(f).layer_weights is None
    f.write_text("layers:\n  image: [last-4]\n", encoding="utf-8")
    assert load_config(f).layer_weights == {"final": 2.0}  # not given: the default's
    encoders = {"image": SimpleNamespace(spec="img", layer_dims={"block14": 8, "block15": 8, "final": 4}),
                "text": SimpleNamespace(spec="txt", layer_dims={"layer5": 6, "final": 6})}
    check_weight_names({"final": 2.0, "layer5": 1.5, "block14": 1.0}, encoders)
    check_weight_names(None, encoders)
    with pytest.raises(ConfigError, match="'fianl' is not a layer of any encoder.*img: block14, block15, final"):
        check_weight_names({"fianl": 2.0}, encoders)
