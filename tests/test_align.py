"""Heads, losses, STRUCTURE and the training loop, pinned on small hand-checkable inputs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unialign_train.align.pairs import Pairs
from unialign_train.features import Features
from unialign.projections import Tower, build_projection, projection_config
from unialign.projections.heads import HEADS, LayerMixHead, StarHead, Standardize, make_head
from unialign_train.align.losses import InfoNCE, SigLIP, multi_positive, structure_regularizer
from unialign_train.align.loop import TrainConfig, lr_at, train
from unialign_train.evaluate.metrics import retrieval_scores


def test_infonce_matches_hand_computation():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    loss = InfoNCE(temperature=0.5, learnable=False)
    logits = 2.0 * img @ txt.T  # [[2, 1.2], [0, 1.6]]
    ce = lambda l: -(math.log(math.exp(l[0][0]) / (math.exp(l[0][0]) + math.exp(l[0][1])))
                     + math.log(math.exp(l[1][1]) / (math.exp(l[1][0]) + math.exp(l[1][1])))) / 2
    expected = (ce(logits.tolist()) + ce(logits.T.tolist())) / 2
    assert loss(img, txt).item() == pytest.approx(expected, rel=1e-6)


def test_infonce_groups_hide_same_concept_negatives():
    torch.manual_seed(0)
    img, txt = torch.randn(4, 8), torch.randn(4, 8)
    groups = torch.tensor([0, 0, 1, 2])
    loss = InfoNCE(learnable=False)
    masked = loss(img, txt, groups)
    # removing a negative can only lower each row's cross-entropy
    assert masked.item() < loss(img, txt).item()
    # with all-distinct groups it equals the plain loss
    assert loss(img, txt, torch.arange(4)).item() == pytest.approx(loss(img, txt).item())


def test_temperature_is_clamped():
    loss = InfoNCE(temperature=0.07)
    with torch.no_grad():
        loss.log_scale.fill_(100.0)
    assert loss.temperature == pytest.approx(0.001)


def test_siglip_matches_hand_computation():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss = SigLIP(scale=20.0, bias=-10.0)
    # logits: diagonal 20-10=10 (label +1), off-diagonal -10 (label -1): every term is -log sigmoid(10)
    assert loss(img, txt).item() == pytest.approx(-math.log(1 / (1 + math.exp(-10))), rel=1e-5)
    txt2 = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # swapped: positives at -10, negatives at +10
    assert loss(img, txt2).item() == pytest.approx(-math.log(1 / (1 + math.exp(10))), rel=1e-5)


def test_multi_positive_averages_blocks():
    torch.manual_seed(1)
    loss = InfoNCE(learnable=False)
    img, t1, t2 = torch.randn(5, 4), torch.randn(5, 4), torch.randn(5, 4)
    assert multi_positive(loss, img, [t1, t2]).item() == pytest.approx((loss(img, t1) + loss(img, t2)).item() / 2)


def test_structure_zero_for_same_geometry_and_grows_when_shuffled():
    torch.manual_seed(0)
    z = torch.randn(64, 16)
    q, _ = torch.linalg.qr(torch.randn(16, 16))
    same = structure_regularizer(z, z @ q, levels=3)  # a rotation keeps every neighbourhood
    assert same.item() < 1e-6
    shuffled = structure_regularizer(z, z[torch.randperm(64)], levels=3)
    noisy = structure_regularizer(z, z + 0.3 * torch.randn_like(z), levels=3)
    assert shuffled.item() > noisy.item() > same.item()


def test_heads_shapes_and_registry():
    x = torch.randn(3, 12)
    for kind in HEADS:
        opts = {"layer_dims": [4, 8]} if kind in ("layermix", "temporal") else {}
        opts.update({"frames": 2, "width": 8, "heads": 2} if kind == "temporal" else {})
        out = 12 if kind == "identity" else 6  # the identity head keeps its input space
        assert make_head(kind, 12, out, **opts)(x).shape == (3, out)
    with pytest.raises(ValueError, match="choose one of"):
        make_head("nope", 3, 3)
    with pytest.raises(ValueError, match="head 'linear'"):
        make_head("linear", 3, 3, bogus=1)


def test_star_head_is_gated_and_8x_wide():
    h = StarHead(10, 4)
    assert h.f1.out_features == h.f2.out_features == 80
    x = torch.randn(2, 10)
    manual = h.g(F.relu6(h.f1(h.norm(x))) * h.f2(h.norm(x)))
    assert torch.allclose(h(x), manual)


def test_layermix_weights_are_a_softmax():
    h = LayerMixHead(12, 4, layer_dims=[4, 8], per_dim=True, width=16)
    w = h.mix_weights()
    assert w.shape == (2, 16) and torch.allclose(w.sum(0), torch.ones(16))


def test_standardize_fits_mean_and_std():
    x = torch.randn(1000, 3) * torch.tensor([1.0, 5.0, 0.1]) + 7
    s = Standardize(3).fit(x)
    y = s(x)
    assert torch.allclose(y.mean(0), torch.zeros(3), atol=1e-4) and torch.allclose(y.std(0), torch.ones(3), atol=1e-3)


def test_lr_schedule_warms_up_then_decays():
    lrs = [lr_at(s, 100, 10, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[50] < lrs[20] and lrs[-1] < 0.01


def _synthetic(n: int, seed: int = 0):
    """Paired features sharing a latent: image = relu(A z + noise) (non-negative, like CNN features), text = B z + noise."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 16))
    a, b = rng.normal(size=(16, 64)), rng.normal(size=(16, 32))
    img = np.maximum(z @ a + 0.3 * rng.normal(size=(n, 64)), 0).astype(np.float32)
    txt = (z @ b + 0.3 * rng.normal(size=(n, 32))).astype(np.float32)
    return img, txt


def test_training_generalises_to_held_out_pairs():
    img, txt = _synthetic(1200)
    tr = np.arange(1000)
    pairs = Pairs.from_lists(tr.tolist(), [[i] for i in tr], tr.tolist())
    cfg = TrainConfig(head="linear", dim=32, batch_size=128, epochs=15, eval_every=0, seed=0, device="cpu")
    res = train(Features([img]), Features([txt]), pairs, cfg, log=None)
    te = np.arange(1000, 1200)
    with torch.no_grad():
        zi = F.normalize(res.model["image"](torch.from_numpy(img[te])), dim=-1)
        zt = F.normalize(res.model["text"](torch.from_numpy(txt[te])), dim=-1)
    r1 = retrieval_scores(zi, zt, np.arange(200))["image_retrieval_recall@1"]
    assert r1 > 0.3  # chance is 0.005


def test_layermix_training_mixes_the_stored_layers():
    """With several stored layers the layer-mixing head gets their boundaries (not one block of all of them)
    and learns to lean on the informative layer: here layer 1 is pure noise."""
    img, txt = _synthetic(1200)
    noise = np.random.default_rng(1).normal(size=(1200, 24)).astype(np.float32)
    tr = np.arange(1000)
    pairs = Pairs.from_lists(tr.tolist(), [[i] for i in tr], tr.tolist())
    cfg = TrainConfig(head="layermix", text_head="linear", dim=32, batch_size=128, epochs=15, eval_every=0, seed=0,
                      device="cpu")
    res = train(Features([img, noise], ["block", "noise"]), Features([txt]), pairs, cfg, log=None)
    head = res.model["image"].head
    assert head.layer_dims == [64, 24] and res.model["image"].config()["options"]["layer_dims"] == [64, 24]
    w = head.mix_weights().mean(-1)
    assert w[0] > w[1], w
    te = np.arange(1000, 1200)
    with torch.no_grad():
        zi = F.normalize(res.model["image"](torch.from_numpy(np.concatenate([img[te], noise[te]], 1))), dim=-1)
        zt = F.normalize(res.model["text"](torch.from_numpy(txt[te])), dim=-1)
    assert retrieval_scores(zi, zt, np.arange(200))["image_retrieval_recall@1"] > 0.3  # chance 0.005


def test_resumed_training_equals_uninterrupted(tmp_path):
    img, txt = _synthetic(300, seed=1)
    tr = np.arange(300)
    pairs = Pairs.from_lists(tr.tolist(), [[i, (i + 1) % 300] for i in tr], (tr // 2).tolist())
    cfg = TrainConfig(head="mlp", head_options={"all": {"hidden": 32, "dropout": 0.1}}, dim=16, batch_size=64,
                      epochs=6, eval_every=5, checkpoint_every=7, seed=3, device="cpu")
    val = lambda m: {"score": float(m["image"](torch.from_numpy(img[:50])).detach().sum())}  # any deterministic score
    full = train(Features([img]), Features([txt]), pairs, cfg, val, log=None)
    ck = tmp_path / "ck.pt"
    part = train(Features([img]), Features([txt]), pairs, cfg, val, checkpoint=ck, log=None, stop_after=14)
    assert part.steps == 14 and ck.exists()
    resumed = train(Features([img]), Features([txt]), pairs, cfg, val, checkpoint=ck, log=None)
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    # a checkpoint of another configuration is ignored, not silently resumed: training with it present
    # gives exactly the weights of a fresh run of that configuration (resuming would not)
    other_cfg = cfg.model_copy(update={"seed": 4})
    fresh = train(Features([img]), Features([txt]), pairs, other_cfg, val, log=None)
    other = train(Features([img]), Features([txt]), pairs, other_cfg, val, checkpoint=ck, log=None)
    for (k, a), b in zip(fresh.model.state_dict().items(), other.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert any(not torch.equal(a, b) for a, b in zip(fresh.model.state_dict().values(), full.model.state_dict().values()))


def test_tower_config_round_trip():
    tower = Tower("residual", 10, 4)
    clone = build_projection(projection_config(tower))
    clone.load_state_dict(tower.state_dict())
    x = torch.randn(2, 10)
    tower.eval(), clone.eval()
    assert torch.equal(tower(x), clone(x))  # the same weights through the same module: bit-identical


def test_train_config_names_the_bad_field():
    from pydantic import ValidationError

    for bad, field in [({"lr": 0}, "lr"), ({"head": "nope"}, "head"), ({"betas": [0.9]}, "betas"),
                       ({"sampling": "random"}, "sampling"), ({"dim": 0}, "dim"), ({"colour": 1}, "colour")]:
        with pytest.raises(ValidationError) as e:
            TrainConfig(**bad)
        assert e.value.errors()[0]["loc"][0] == field
