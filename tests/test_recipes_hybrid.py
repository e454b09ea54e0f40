"""FuseMix latent mixup, ShareLock's one-side-frozen heads, hybrid (anchor-input, fused) recipes and the
semi-supervised unpaired refinement: each checked by a property that can be worked out by hand, on the
real emoji features of ``real_emoji_features`` (tests/conftest.py) where a fit is involved. That every
registered recipe (these included) beats chance on held-out concepts and embeds batch-independently is
tests/test_recipes.py's parametrised test.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unialign.errors import ConfigError
from unialign.model import AlignedModel
from unialign.projections import Chain, Tower, WeightedConcat, build_projection, projection_config
from unialign_train.align import Recipe, fit, get_recipe, loop, make_pairs
from unialign_train.align.hybrid import remap_pairs
from unialign_train.align.pairs import Pairs
from unialign_train.features import Features
from unialign_train.align.unpaired import pseudo_pairs, sinkhorn, with_pseudo_pairs
from unialign_train.evaluate import validator

from test_recipes import assert_batch_independent

SHORT = {"max_steps": 30, "batch_size": 64, "warmup_steps": 5, "eval_every": 0, "patience": 0,
         "checkpoint_every": 0, "seed": 0}
quiet = lambda *_: None  # noqa: E731


def _fit(r, name, overrides=None, validate=None, pairs=None, **kw):
    pairs = pairs if pairs is not None else make_pairs(r.cached, r.train, "image", "text")
    rec = get_recipe(name)
    return fit(rec, ({**SHORT, **(overrides or {})} if rec.trained else overrides), r.cached["image"].features,
               r.cached["text"].features, pairs, ("image", "text"), validate, device="cpu", log=quiet, **kw)


# ------------------------------------------------------------------------------------------ FuseMix
def test_latent_mixup_mixes_both_modalities_with_one_lambda_and_partner():
    g = torch.Generator().manual_seed(0)
    x, y1, y2 = torch.randn(6, 5, generator=g), torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    partner = torch.tensor([3, 0, 5, 1, 2, 4])
    same_x, same_ys = loop.latent_mixup(x, [y1, y2], 1.0, partner)
    assert torch.equal(same_x, x) and torch.equal(same_ys[0], y1) and torch.equal(same_ys[1], y2)  # lambda 1: no mixup
    mx, (my, _) = loop.latent_mixup(x, [y1, y2], 0.25, partner)
    torch.testing.assert_close(mx[2], 0.25 * x[2] + 0.75 * x[5])
    torch.testing.assert_close(my[2], 0.25 * y1[2] + 0.75 * y1[5])  # the caption mixes with the same partner
    lam, perm = loop.mixup_draw(1.0, 0, 7, 6)
    assert 0.0 <= lam <= 1.0 and sorted(perm.tolist()) == list(range(6))
    assert loop.mixup_draw(1.0, 0, 7, 6)[0] == lam and loop.mixup_draw(1.0, 0, 8, 6)[0] != lam  # (seed, step) decide


def test_mixup_with_lambda_one_trains_exactly_like_no_mixup(real_emoji_features, monkeypatch, one_thread):
    r = real_emoji_features
    plain = _fit(r, "linear")
    monkeypatch.setattr(loop, "mixup_draw", lambda alpha, seed, step, n: (1.0, torch.randperm(n)))
    mixed = _fit(r, "linear", {"mixup": 1.0})
    assert mixed.info["train_config"]["mixup"] == 1.0
    for m in ("image", "text"):
        for (k, a), b in zip(plain.projections[m].state_dict().items(), mixed.projections[m].state_dict().values()):
            assert torch.equal(a, b), f"{m} {k}"


# ----------------------------------------------------------------------------------------- ShareLock
@pytest.mark.parametrize("name,frozen,trained", [("sharelock", "image", "text"), ("sharelock-mirror", "text", "image")])
def test_sharelock_frozen_side_is_its_fixed_transform(name, frozen, trained, real_emoji_features, one_thread):
    r = real_emoji_features
    fitted = _fit(r, name)
    fixed, head = fitted.projections[frozen], fitted.projections[trained]
    feats = torch.from_numpy(r.cached[frozen].features[np.arange(20)])
    with torch.no_grad():
        expected = (feats - fixed.standardize.mean) / fixed.standardize.std
        assert torch.equal(fixed(feats), expected)  # standardisation, then nothing
        assert sum(p.numel() for p in fixed.parameters()) == 0
        assert head.out_dim == fixed.in_dim == r.cached[frozen].features.dim  # the other side maps into this space
        other = torch.from_numpy(r.cached[trained].features[np.arange(5)])
        assert head(other).shape == (5, fixed.in_dim)


def test_shared_dim_refuses_two_identity_sides_of_different_widths():
    assert loop.shared_dim(256, ["identity", "mlp"], 1280, 384) == 1280
    assert loop.shared_dim(256, ["linear", "linear"], 1280, 384) == 256
    with pytest.raises(ValueError, match="both sides"):
        loop.shared_dim(256, ["identity", "identity"], 1280, 384)


# ------------------------------------------------------------------------------------------ hybrids
@pytest.mark.numerics
def test_weighted_concat_cosine_is_the_weighted_sum_of_cosines():
    torch.manual_seed(0)
    a, b = Tower("linear", 12, 4).eval(), Tower("mlp", 12, 6, {"hidden": 8}).eval()  # eval: no dropout
    x, y = torch.randn(5, 12), torch.randn(7, 12)
    cos = lambda m: F.normalize(m(x), dim=-1) @ F.normalize(m(y), dim=-1).T  # noqa: E731
    with torch.no_grad():
        fused = WeightedConcat([a, b], [0.3, 0.7])
        torch.testing.assert_close(fused(x).norm(dim=-1), torch.ones(5))  # already unit length
        torch.testing.assert_close(fused(x) @ fused(y).T, 0.3 * cos(a) + 0.7 * cos(b))
        only_a = WeightedConcat([a, b], [2.0, 0.0])  # weights are normalised; a 0 part contributes nothing
        torch.testing.assert_close(only_a(x) @ only_a(y).T, cos(a))
    with pytest.raises(ValueError, match="one weight per part"):
        WeightedConcat([a, b], [1.0])


def test_remap_pairs_points_into_compact_rows():
    pairs = Pairs.from_lists([[10], [30]], [[7, 9], [9]], [0, 1])
    xs, ys = np.array([10, 30]), np.array([7, 9])
    m = remap_pairs(pairs, xs, ys)
    assert xs[m.x_flat].tolist() == pairs.x_flat.tolist() and ys[m.y_flat].tolist() == pairs.y_flat.tolist()


def test_anchor_head_chains_the_anchor_map_and_a_head(real_emoji_features, one_thread):
    r = real_emoji_features
    fitted = _fit(r, "anchor-head")
    img, txt = fitted.projections["image"], fitted.projections["text"]
    assert isinstance(img, Chain) and [type(p).__name__ for p in img.parts] == ["AnchorMap", "Tower"]
    n_anchors = len(make_pairs(r.cached, r.train, "image", "text").all_pairs()[0])
    assert img.parts[0].out_dim == n_anchors == fitted.info["anchor_dim"] == img.parts[1].in_dim
    feats = torch.from_numpy(r.cached["image"].features[np.arange(9)])
    with torch.no_grad():
        assert torch.equal(img(feats), img.parts[1](img.parts[0](feats)))
        rebuilt = build_projection(projection_config(img))  # what a saved model's config rebuilds
        rebuilt.load_state_dict(img.state_dict())
        assert torch.equal(rebuilt(feats), img(feats))
    assert txt.out_dim == 256  # the loop's default width


def test_fused_recipe_picks_its_weight_on_validation(real_emoji_features, one_thread):
    r = real_emoji_features
    concepts = sorted({r.dataset.records[int(i)]["concept"] for i in r.train})
    val_c = set(concepts[::5])  # a fifth of the training concepts validates; the rest trains
    val = np.array([i for i in r.train if r.dataset.records[int(i)]["concept"] in val_c])
    train = np.array([i for i in r.train if r.dataset.records[int(i)]["concept"] not in val_c])
    validate = validator(r.cached, r.text_encoder, ["final"], val, "image", "emoji")
    recipe = Recipe.model_validate({**get_recipe("fused").model_dump(), "train": {"head": "linear"},  # quick heads
                                    "fuse": {"recipe": "unialign", "weights": [0.0, 0.5, 1.0]}})
    fitted = fit(recipe, SHORT, r.cached["image"].features, r.cached["text"].features,
                 make_pairs(r.cached, train, "image", "text"), ("image", "text"), validate, device="cpu", log=quiet)
    choice = fitted.info["fuse"]
    scores = {float(k): v for k, v in choice["validation"].items()}
    assert choice["weight"] == max(scores, key=lambda w: (scores[w], -w))  # best, first of equals
    assert validate(torch.nn.ModuleDict(fitted.projections))["score"] == pytest.approx(scores[choice["weight"]], abs=1e-12)
    assert scores[choice["weight"]] >= max(scores[0.0], scores[1.0])  # never worse than either part alone
    assert_batch_independent(AlignedModel({"image": r.image_encoder, "text": r.text_encoder}, fitted.projections),
                             r.dataset, r.heldout)


# ------------------------------------------------------------------------------------ unpaired data
@pytest.mark.numerics
def test_sinkhorn_plan_has_uniform_marginals_and_recovers_a_permutation():
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(40, generator=g)
    scores = 0.1 * torch.rand(40, 40, generator=g)
    scores[torch.arange(40), perm] += 0.5  # row i matches column perm[i]
    plan = sinkhorn(scores, 0.1, 100)
    tol = 100 * torch.finfo(torch.float32).eps / 40  # float32 sums of 40 terms around 1/40
    torch.testing.assert_close(plan.sum(dim=1), torch.full((40,), 1 / 40), atol=tol, rtol=0)
    torch.testing.assert_close(plan.sum(dim=0), torch.full((40,), 1 / 40), atol=tol, rtol=0)
    rows, cols = pseudo_pairs(plan, 1.0)
    assert len(rows) == 40 and (perm[rows].numpy() == cols).all()
    assert len(pseudo_pairs(plan, 0.25)[0]) == 10


def test_with_pseudo_pairs_adds_one_new_group_per_pair():
    pairs = Pairs.from_lists([[0], [1]], [[5], [6]], [3, 3])
    out = with_pseudo_pairs(pairs, np.array([8, 9]), np.array([2, 4]))
    assert len(out) == 4 and out.groups.tolist() == [3, 3, 4, 5]
    assert out.x_flat.tolist() == [0, 1, 8, 9] and out.y_flat.tolist() == [5, 6, 2, 4]


@pytest.mark.slow
def test_unpaired_refinement_finds_true_pairs_among_unpaired_data(real_emoji_features):
    """Half the training concepts keep their pairs; the other half's images and captions come unpaired.
    The pseudo-pairs the teacher proposes are mostly right (same concept), far above chance."""
    r = real_emoji_features
    ds = r.dataset
    concepts = sorted({ds.records[int(i)]["concept"] for i in r.train})
    paired_c = set(concepts[::2])
    paired = np.array([i for i in r.train if ds.records[int(i)]["concept"] in paired_c])
    other = np.array([i for i in r.train if ds.records[int(i)]["concept"] not in paired_c])
    ux = np.unique(np.concatenate([r.cached["image"].rows(int(i)) for i in other]))
    uy = np.unique(np.concatenate([r.cached["text"].rows(int(i)) for i in other]))
    fitted = _fit(r, "unialign-unpaired", pairs=make_pairs(r.cached, paired, "image", "text"), unpaired=(ux, uy))
    assert fitted.info["pseudo_pairs"] > 0 and fitted.info["n_unpaired"] == [len(ux), len(uy)]
    concept_of = {}
    for m in ("image", "text"):
        for i in other:
            for row in r.cached[m].rows(int(i)):
                concept_of[(m, int(row))] = ds.records[int(i)]["concept"]
    a, b = fitted.projections["image"], fitted.projections["text"]
    # the refitted map holds the pseudo-pairs as anchors: each added image anchor's caption is its match
    n_paired = len(make_pairs(r.cached, paired, "image", "text").all_pairs()[0])
    assert a.n_anchors == n_paired + fitted.info["pseudo_pairs"] == b.n_anchors
    # precision of the proposals, recomputed from the teacher: well above the 1/len(other concepts) chance
    teacher = _fit(r, "unialign", pairs=make_pairs(r.cached, paired, "image", "text"))
    with torch.no_grad():
        ex = F.normalize(teacher.projections["image"](torch.from_numpy(r.cached["image"].features[ux])), dim=-1)
        ey = F.normalize(teacher.projections["text"](torch.from_numpy(r.cached["text"].features[uy])), dim=-1)
    i, j = pseudo_pairs(sinkhorn(ex @ ey.T, 0.05, 100), 0.5)
    assert len(i) == fitted.info["pseudo_pairs"]
    right = np.mean([concept_of[("image", int(ux[p]))] == concept_of[("text", int(uy[q]))] for p, q in zip(i, j)])
    chance = 1 / len(concepts[1::2])
    assert right >= 10 * chance, f"pseudo-pair precision {right:.3f}, chance {chance:.4f}"


@pytest.mark.slow
def test_fused_anchor_head_model_saves_and_loads_bit_identically(real_emoji_features, tmp_path):
    """A composite model (score fusion of an anchor-input head and unialign's map) is one saved folder:
    reloaded, it embeds exactly as before (same code path, so bit-identical)."""
    r = real_emoji_features
    recipe = Recipe.model_validate({**get_recipe("anchor-head").model_dump(), "name": "anchor-head-fused",
                                    "fuse": {"recipe": "unialign", "default": 0.4}})
    fitted = fit(recipe, SHORT, r.cached["image"].features, r.cached["text"].features,
                 make_pairs(r.cached, r.train, "image", "text"), ("image", "text"), device="cpu", log=quiet)
    assert fitted.info["fuse"]["weight"] == 0.4  # no validation data: the stated default
    model = AlignedModel({"image": r.image_encoder, "text": r.text_encoder}, fitted.projections)
    loaded = AlignedModel.from_pretrained(model.save_pretrained(tmp_path / "m"), device="cpu")
    prompts = ["an emoji of a cat.", "a red heart"]
    images = [r.dataset.path(int(i)) for i in r.heldout[:4]]
    np.testing.assert_array_equal(loaded.encode(prompts, "text"), model.encode(prompts, "text"))
    np.testing.assert_array_equal(loaded.encode(images, "image"), model.encode(images, "image"))


def test_the_main_job_gives_a_low_data_run_its_left_out_training_records_as_unpaired_data(tmp_path, monkeypatch):
    """``recipe: unialign-unpaired`` in ``unialign run``: the training records ``data.max_train_concepts``
    leaves out become unpaired rows (never a validation or test record); without the cut there are none
    and the recipe is its teacher."""
    from tiny import make_image_dataset, register_tiny
    from unialign_train.config import load_config
    from unialign_train.data import Dataset, load_dataset, make_splits, unpaired_training
    from unialign_train.pipeline import train_model

    register_tiny()
    monkeypatch.setenv("UNIALIGN_HOME", str(tmp_path / "home"))
    base = make_image_dataset(tmp_path / "imgs", n=80)
    recs = [{**r, "concept": f"c{i % 20}", "label": f"thing {i % 20}", "text": [f"thing {i % 20}", f"a {i % 20}"]}
            for i, r in enumerate(base.records)]
    Dataset("tiny20", recs, base.root).save(tmp_path / "ds")
    over = {"data.dataset": str(tmp_path / "ds"), "encoders.image": "tiny-image", "encoders.text": "tiny-text",
            "layers.image": ["final"], "extract.num_workers": 0, "device": "cpu", "output": str(tmp_path / "run"),
            "recipe": "unialign-unpaired", "train.k": 8, "train.nuisance_rank": 1, "data.train_styles": None,
            "data.test_styles": None}
    lines: list[str] = []
    cfg = load_config(overrides={**over, "data.max_train_concepts": 4})
    model, cached, splits = train_model(cfg, log=lines.append)
    left = unpaired_training(load_dataset(str(tmp_path / "ds")), cfg.data, splits)
    assert len(left) > 0 and not set(left.tolist()) & set(splits.train.tolist())
    assert not set(left.tolist()) & (set(splits.val.tolist()) | set(splits.test.tolist()))
    assert model.info["n_unpaired"] == [len(left), len({t for i in left for t in recs[int(i)]["text"]})]
    assert any(f"{len(left)} training records left unpaired" in s for s in lines)
    full = load_config(overrides=over)
    model, _, splits = train_model(full, log=lines.append)
    assert len(unpaired_training(load_dataset(str(tmp_path / "ds")), full.data, splits)) == 0
    assert model.info["pseudo_pairs"] == 0
    with pytest.raises(ConfigError, match="'fianl' is not a layer of any encoder"):  # checked before any fit
        train_model(load_config(overrides={**over, "layer_weights": {"fianl": 2.0}}), log=lines.append)


def test_unpaired_data_beyond_max_rows_is_a_seeded_draw():
    """The transport plan is dense (rows x rows): more unpaired rows than ``max_rows`` per side are a seeded
    draw, said in the log, and the same draw on a rerun."""
    rng = np.random.default_rng(0)
    img = Features([rng.standard_normal((60, 8)).astype(np.float32)], ["final"])
    txt = Features([rng.standard_normal((60, 6)).astype(np.float32)], ["final"])
    pairs = Pairs.from_lists(list(range(20)), [[i] for i in range(20)], [i // 2 for i in range(20)])
    base = get_recipe("unialign-unpaired")
    recipe = base.model_copy(update={"unpaired": base.unpaired.model_copy(update={"max_rows": 15})})
    lines: list[str] = []
    unpaired = (np.arange(20, 60), np.arange(20, 60))
    fits = [fit(recipe, {"k": 5, "nuisance_rank": 1}, img, txt, pairs, ("image", "text"), device="cpu",
                log=lines.append, unpaired=unpaired) for _ in range(2)]
    assert fits[0].info["n_unpaired"] == [15, 15]
    assert any("a seeded draw of 15 of 40 unpaired image" in s for s in lines)
    with torch.no_grad():  # a rerun along one code path, the same seeded draw: bit-identical
        x = torch.from_numpy(img[np.arange(60)])
        assert torch.equal(fits[0].projections["image"](x), fits[1].projections["image"](x))
